"""Energy-based models: contrastive divergence with Langevin negatives and a replay buffer.

p(x) ~ exp(-E(x)). Each update lowers the energy of data x+ and raises that of negatives
x- drawn by a short Langevin chain (`langevin.py`), with the energy-magnitude
regulariser of Du & Mordatch (2019):

    L = mean E(x+) - mean E(x-) + alpha * mean(E(x+)^2 + E(x-)^2)

Chains start from a persistent replay buffer (Tieleman 2008; Du & Mordatch's 95% buffer
/ 5% fresh uniform noise, `reinit`) and write their end points back into it. The
buffer is train state (`extra`), sharded along the batch axes (role `batch`), drawn
from and written to without a gather, donated, checkpointed, and resharded on restore.
Negatives get no gradient through the chain: it runs on a stop-gradient copy of E.

Sampling runs a longer chain (`sample_steps`, `sample_step_size`) from fresh uniform
noise, or from the buffer (`scaler sample --from-buffer`).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from scaler.config import at_least, param, positive, unit
from scaler.errors import UserError
from scaler.families import langevin
from scaler.families.base import FamilyDefaults, LossOut, Update


def _positive_or(*words):
  def check(x):
    if x in words or (isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0):
      return None
    return f"must be {' or '.join(words)} or a positive number"
  return check


@dataclasses.dataclass(frozen=True)
class EBMConfig:
  buffer_size: int = param(10000, positive)    # replay buffer rows (examples)
  reinit: float = param(0.05, unit)            # share of chains started from fresh noise
  langevin_steps: int = param(60, at_least(1))  # chain length in every update
  step_size: float = param(10.0, positive)     # h in x - (h/2) grad E + sqrt(h) s z
  noise_scale: float = param(0.005, at_least(0.0))  # s: 1 samples exp(-E), less is colder
  grad_clip: float | str | None = param(0.03, _positive_or("none"))  # per-example |grad E| bound
  # Samples are clipped to [-bound, bound], where fresh noise is drawn. auto: 1 for images
  # (normalised to [-1, 1]), 3 for vectors (standardised: 3 standard deviations).
  bound: float | str = param("auto", _positive_or("auto"))
  alpha: float = param(1.0, at_least(0.0))     # weight of the energy-magnitude regulariser
  sample_steps: int = param(200, at_least(1))  # chain length of `scaler sample`
  sample_step_size: float = param(10.0, positive)


def frozen(module):
  """A copy of `module` whose state is a constant to autodiff: a chain run on it is not
  differentiated, so nothing of it is kept for the backward pass."""
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def _mean_where(x_B, ok_B):
  return jnp.sum(jnp.where(ok_B, x_B, 0.0)) / jnp.maximum(jnp.sum(ok_B), 1)


def _rows(mask_B, x):
  """A per-example mask, broadcastable against x (B, ...)."""
  return mask_B.reshape(mask_B.shape + (1,) * (x.ndim - 1))


class EBMFamily(FamilyDefaults):
  """One network, "energy": x -> E(x), one scalar per example."""

  # The final picture: chains from fresh noise and chains from the buffer, side by side.
  sample_views = {"from noise": {}, "from the buffer": {"from_buffer": True}}

  def __init__(self, cfg: EBMConfig, net_cls, net_cfg, spec, precision):
    self.cfg, self.net_cls, self.net_cfg = cfg, net_cls, net_cfg
    self.data_shape, self.precision = tuple(spec.shape), precision
    if cfg.bound == "auto":
      self.bound = 1.0 if spec.kind == "image" else 3.0
    else:
      self.bound = float(cfg.bound)
    self.grad_clip = None if cfg.grad_clip in (None, "none") else float(cfg.grad_clip)

  def init(self, rngs):
    return {"energy": self.net_cls(self.net_cfg, self.data_shape, precision=self.precision,
                                   rngs=rngs)}

  def init_extra(self, rng):
    return {"buffer": self._noise(rng, self.cfg.buffer_size)}

  def extra_roles(self):
    return {"buffer": jax.sharding.PartitionSpec("batch", *[None] * len(self.data_shape))}

  def check_batch(self, batch_size: int, shards: int):
    n = self.cfg.buffer_size
    if n < batch_size:
      raise UserError(f"family.buffer_size={n} is smaller than train.batch_size={batch_size}: "
                      f"every step draws {batch_size} distinct starting points from it; use "
                      f"at least {batch_size}")
    if n % shards:
      lo, hi = n - n % shards, n - n % shards + shards
      nearest = f"{lo} or {hi}" if lo >= batch_size else f"{hi}"
      raise UserError(f"family.buffer_size={n} is not divisible by the {shards} data-parallel "
                      f"devices (mesh data x fsdp), which hold equal slices of it; the nearest "
                      f"sizes that work: {nearest}")

  @property
  def updates(self):
    return (Update("energy", ("energy",), self.loss),)

  def _noise(self, rng, num):
    return jax.random.uniform(rng, (num, *self.data_shape), jnp.float32, -self.bound, self.bound)

  def _chain(self, energy, x, rng, steps, step_size):
    return langevin.langevin(frozen(energy), x, rng, steps=steps, step_size=step_size,
                             noise_scale=self.cfg.noise_scale, grad_clip=self.grad_clip,
                             bound=self.bound)

  def loss(self, nets, extra, batch, rng, step):
    energy, x_pos = nets["energy"], batch["x"]
    energy.power_iterate()   # spectral norm's estimate: one step per update, before the chain
    draw_rng, fresh_rng, noise_rng, chain_rng = jax.random.split(rng, 4)
    n = x_pos.shape[0]
    start, slots = langevin.draw(extra["buffer"], n, draw_rng)
    fresh_B = jax.random.uniform(fresh_rng, (n,)) < self.cfg.reinit
    start = jnp.where(_rows(fresh_B, start), self._noise(noise_rng, n), start)
    x_neg, grad_norm = self._chain(energy, start, chain_rng, self.cfg.langevin_steps,
                                   self.cfg.step_size)
    x_neg = jax.lax.stop_gradient(x_neg)
    # A diverged chain's rows go into the buffer, where the finiteness check names them;
    # the update uses the finite rows only, so the parameters do not hide the cause.
    ok_B = jnp.all(jnp.isfinite(x_neg.reshape(n, -1)), axis=1)
    e_pos = energy(x_pos)
    e_neg = energy(jnp.where(_rows(ok_B, x_neg), x_neg, 0.0))
    mean_pos, mean_neg = jnp.mean(e_pos), _mean_where(e_neg, ok_B)
    # Contrastive divergence plus alpha * (E(x+)^2 + E(x-)^2) (Du & Mordatch 2019).
    reg = jnp.mean(e_pos ** 2) + _mean_where(e_neg ** 2, ok_B)
    loss = mean_pos - mean_neg + self.cfg.alpha * reg
    metrics = {"energy_pos": mean_pos, "energy_neg": mean_neg, "energy_gap": mean_neg - mean_pos,
               "langevin_grad_norm": grad_norm,
               # Rows of the buffer restarted from fresh noise this update, as a share.
               "buffer_refreshed": jnp.sum(fresh_B) / self.cfg.buffer_size}
    return LossOut(loss, metrics, {"buffer": langevin.write(extra["buffer"], slots, x_neg)})

  def sample(self, nets, rng, num, extra=None, from_buffer=False, **kw):
    """`num` samples: a `sample_steps` chain from fresh uniform noise, or from rows of the
    replay buffer (drawn without replacement when it holds `num`)."""
    if kw:
      raise UserError(f"sampling options {', '.join(sorted(kw))} do not apply to an EBM")
    start_rng, chain_rng = jax.random.split(rng)
    if from_buffer:
      if extra is None:
        raise ValueError("from_buffer=True needs the train state's extra state (the buffer)")
      buffer = extra["buffer"]
      rows = jax.random.choice(start_rng, buffer.shape[0], (num,), replace=num > buffer.shape[0])
      start = buffer[rows]
    else:
      start = self._noise(start_rng, num)
    x, _ = self._chain(nets["energy"], start, chain_rng, self.cfg.sample_steps,
                       self.cfg.sample_step_size)
    return x
