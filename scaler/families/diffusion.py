"""Diffusion (DDPM): epsilon-prediction training, ancestral or DDIM sampling.

Training (Ho et al. 2020): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t ~ U{0..T-1},
loss |eps - net(x_t, t)|^2. Sampling runs the reverse process from x ~ N(0, I):
`ancestral` takes all T stochastic steps; `ddim` (Song et al. 2021) takes `sampler.steps`
steps with noise scale `eta`: 0 is deterministic, 1 over all T steps is ancestral again.

Class-conditional (`condition: class`), with classifier-free guidance (Ho & Salimans
2022): the net sees the label y, replaced by the null label with probability
`label_dropout` in training, so one net learns eps(x_t, t, y) and eps(x_t, t, null).
Sampling mixes them, eps = eps_u + w (eps_c - eps_u): w = 0 is unconditional, w = 1 the
conditional model, w > 1 trades diversity for fidelity to the class.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from scaler.config import Named, at_least, choice, fraction, one_of, param, positive, unit
from scaler.errors import UserError
from scaler.families import schedules
from scaler.families.base import FamilyDefaults, LossOut, Update

@dataclasses.dataclass(frozen=True)
class AncestralConfig:
  """All T stochastic reverse steps (Ho et al.); nothing to set."""


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
  steps: int = param(100, positive)   # reverse steps, at most num_timesteps
  eta: float = param(0.0, unit)       # noise: 0 deterministic, 1 as ancestral


SAMPLERS = {"ancestral": AncestralConfig, "ddim": DDIMConfig}


@dataclasses.dataclass(frozen=True)
class UnconditionalConfig:
  """The data's labels, if it has any, are not used."""


@dataclasses.dataclass(frozen=True)
class ClassConfig:
  """The data's classes condition the denoiser, with classifier-free guidance."""
  label_dropout: float = param(0.1, fraction)      # P(label -> null) in training
  guidance_scale: float = param(1.0, at_least(0.0))  # w at sampling; `scaler sample --guidance`


CONDITIONS = {"none": UnconditionalConfig, "class": ClassConfig}


def _clip(x):
  if x in (None, "none", "auto"):
    return None
  return None if isinstance(x, (int, float)) and x > 0 else (
      "must be auto, none, or a positive bound on the predicted x_0")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  num_timesteps: int = param(1000, positive)
  schedule: str = param("cosine", one_of(*schedules.SCHEDULES))
  sampler: Named = choice(SAMPLERS, "ddim")
  condition: Named = choice(CONDITIONS, "none")
  # Clip the predicted x_0 to [-clip, clip] while sampling. auto: 1.0 for images (their
  # range is [-1, 1]), none for vectors (standardised vectors need ~3 or more).
  clip: float | str | None = param("auto", _clip)

  def __post_init__(self):
    if self.sampler.name == "ddim" and self.sampler.cfg.steps > self.num_timesteps:
      raise UserError(f"family.sampler.steps={self.sampler.cfg.steps} is more than "
                      f"family.num_timesteps={self.num_timesteps}: DDIM takes 1 to "
                      f"{self.num_timesteps} steps")


def q_sample(schedule: schedules.Schedule, x0, t_B, noise):
  """A draw of x_t ~ q(x_t | x_0), given the noise: (B, ...) with one t per row."""
  shape = (-1,) + (1,) * (x0.ndim - 1)
  return (schedule.sqrt_alphas_cumprod[t_B].reshape(shape) * x0
          + schedule.sqrt_one_minus_alphas_cumprod[t_B].reshape(shape) * noise)


def ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """`steps` timesteps floor(i * T / steps), i = 0..steps-1 ("leading" spacing).

  The stride is T / steps as a real number, so the first reverse step always starts
  within one stride of the end (T=1000, 501 steps: at t=998). An integer stride
  T // steps would start 501 steps at t=500, from pure noise at abar = 0.49.

  Why not end at T-1: under the cosine schedule abar_{T-1} is about 2e-9, and the x_0
  that DDIM infers there multiplies the denoiser's error by 1/sqrt(abar) ~ 2e4. Vector
  data is not clipped, so that error survives to the samples (measured on two moons:
  sliced W1 196 with both ends, 0.026 with leading spacing). Song et al. and diffusers
  use this spacing too.
  """
  return (np.arange(steps) * num_timesteps // steps).astype(np.int32)


def _masked_mean(x_B, mask_B):
  return jnp.sum(jnp.where(mask_B, x_B, 0.0)) / jnp.maximum(jnp.sum(mask_B), 1)


class DiffusionFamily(FamilyDefaults):
  """One network, "denoiser": net(x_t, t_B[, y_B]) -> the noise in x_t, same shape as x_t."""

  def __init__(self, cfg: DiffusionConfig, net_cls, net_cfg, spec, precision):
    self.cfg, self.net_cls, self.net_cfg = cfg, net_cls, net_cfg
    self.data_shape, self.precision = tuple(spec.shape), precision
    # Labels 0..K-1 from the data; K is the null label.
    self.num_classes = spec.num_classes if cfg.condition.name == "class" else 0
    if cfg.condition.name == "class" and not spec.num_classes:
      raise UserError("family.condition=class needs data with classes (digits, two_moons, "
                      "eight_gaussians, npz with data.label_key, image_folder, array_record); "
                      "this data has none: use condition: none")
    self.schedule = schedules.make(cfg.schedule, cfg.num_timesteps)
    # Images are normalised to [-1, 1], so a predicted x_0 outside it is plain error;
    # standardised vectors have no such bound and clipping them would cut the tails.
    if cfg.clip == "auto":
      self.clip = 1.0 if len(self.data_shape) == 3 else None
    else:
      self.clip = None if cfg.clip in (None, "none") else float(cfg.clip)
    self._reverse = {"ancestral": self.ancestral, "ddim": self.ddim}[cfg.sampler.name]

  def init(self, rngs):
    return {"denoiser": self.net_cls(self.net_cfg, self.data_shape, num_classes=self.num_classes,
                                     precision=self.precision, rngs=rngs)}

  @property
  def updates(self):
    return (Update("denoiser", ("denoiser",), self.loss),)

  def _denoiser(self, net, y_B):
    """net as a function of (x, t_B): with the labels y_B bound if conditional."""
    if not self.num_classes:
      return net
    return lambda x, t_B: net(x, t_B, y_B)

  def _errors(self, net, x0, rng, y_B=None):
    """Per-example eps-MSE at a random timestep, and the timesteps drawn."""
    t_rng, noise_rng = jax.random.split(rng)
    t_B = jax.random.randint(t_rng, x0.shape[:1], 0, self.cfg.num_timesteps)
    # Drawn for the whole (global) batch at once: with threefry_partitionable the numbers
    # are the same however the batch is sharded.
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    eps = self._denoiser(net, y_B)(q_sample(self.schedule, x0, t_B, noise), t_B)
    return jnp.mean(jnp.square(eps - noise).reshape(x0.shape[0], -1), axis=1), t_B

  def _labels(self, batch, rng, dropout: float):
    """The batch's labels, each replaced by the null label with probability `dropout`."""
    if not self.num_classes:
      return None
    y_B = batch["label"].astype(jnp.int32)
    if dropout == 0:
      return y_B
    # fold_in(rng, 2): a stream of its own; split(rng) gives fold_in(rng, 0) and (rng, 1).
    drop_B = jax.random.bernoulli(jax.random.fold_in(rng, 2), dropout, y_B.shape)
    return jnp.where(drop_B, self.num_classes, y_B)

  def evaluate(self, nets, extra, batch, rng):
    """Held-out eps-MSE per example (the training loss, without the gradient or dropout)."""
    err_B, _ = self._errors(nets["denoiser"], batch["x"], rng, self._labels(batch, rng, 0.0))
    return {"mse": err_B}

  def loss(self, nets, extra, batch, rng, step):
    x0 = batch["x"]
    dropout = self.cfg.condition.label_dropout if self.num_classes else 0.0
    err_B, t_B = self._errors(nets["denoiser"], x0, rng, self._labels(batch, rng, dropout))
    mse = jnp.mean(err_B)
    # eps-MSE is high at low noise (eps is a tiny residual of x_0) and low at high noise
    # (x_t is nearly eps); the split tells which end a plateau or a regression is at.
    low = t_B < self.cfg.num_timesteps // 2
    return LossOut(mse, {"mse": mse, "mse_low_noise": _masked_mean(err_B, low),
                         "mse_high_noise": _masked_mean(err_B, ~low)})

  def sample(self, nets, rng, num, label: int | None = None, guidance: float | None = None,
             extra=None):
    """`num` samples in model space, (num, *data_shape), with the configured sampler.

    Conditional runs: all of class `label`, or classes 0, 1, ..., K-1, 0, ... without
    one; guided with scale `guidance` (default `condition.guidance_scale`).
    """
    init_rng, loop_rng = jax.random.split(rng)
    x = jax.random.normal(init_rng, (num, *self.data_shape))
    return self._reverse(self._sampling_denoiser(nets["denoiser"], num, label, guidance),
                         x, loop_rng)

  def _sampling_denoiser(self, net, num, label, guidance):
    """eps(x, t_B) for the sampler: the net itself, or guided in one batched call."""
    if not self.num_classes:
      if label is not None or guidance is not None:
        raise UserError("--label and --guidance need a class-conditional run "
                        "(family.condition: class); this run is unconditional")
      return net
    if label is not None and not 0 <= label < self.num_classes:
      raise UserError(f"--label {label}: the data's classes are 0 to {self.num_classes - 1}")
    w = self.cfg.condition.guidance_scale if guidance is None else guidance
    if not w >= 0:
      raise UserError(f"--guidance {w}: the guidance scale must be 0 or more")
    y_B = (jnp.full((num,), label, jnp.int32) if label is not None
           else jnp.arange(num, dtype=jnp.int32) % self.num_classes)
    y_2B = jnp.concatenate([y_B, jnp.full((num,), self.num_classes, jnp.int32)])

    def eps(x, t_B):
      # Conditional and unconditional halves in one call: one pass over the weights.
      eps_2B = net(jnp.concatenate([x, x]), jnp.concatenate([t_B, t_B]), y_2B)
      eps_c, eps_u = eps_2B[:num], eps_2B[num:]
      return eps_u + w * (eps_c - eps_u)

    return eps

  def _x0(self, x, t, eps):
    """The x_0 that (x_t, eps) imply, clipped for images; and the eps that clipped x_0 implies."""
    s = self.schedule
    x0 = s.sqrt_recip_alphas_cumprod[t] * x - s.sqrt_recipm1_alphas_cumprod[t] * eps
    if self.clip is None:
      return x0, eps
    x0 = jnp.clip(x0, -self.clip, self.clip)
    return x0, (s.sqrt_recip_alphas_cumprod[t] * x - x0) / s.sqrt_recipm1_alphas_cumprod[t]

  def ancestral(self, net, x, rng):
    """From x = x_T, T steps of x_{t-1} ~ N(mu~(x_t, x_0), beta~_t), x_0 predicted (eq. 7)."""
    s = self.schedule

    def step(x, t):
      x0, _ = self._x0(x, t, net(x, jnp.full(x.shape[:1], t)))
      mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * x
      # The noise of step t is keyed by t, as in `ddim`, so the two samplers agree.
      z = jax.random.normal(jax.random.fold_in(rng, t), x.shape, x.dtype)
      std = jnp.where(t > 0, jnp.exp(0.5 * s.posterior_log_variance_clipped[t]), 0.0)
      return mean + std * z, None

    ts = jnp.arange(self.cfg.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    return jax.lax.scan(step, x, ts)[0]

  def ddim(self, net, x, rng):
    """From x = x_T, `steps` DDIM steps (Song et al. eq. 12), noise scale `eta`."""
    eta = self.cfg.sampler.cfg.eta
    ts = ddim_timesteps(self.cfg.num_timesteps, self.cfg.sampler.cfg.steps)
    abar = self.schedule.alphas_cumprod
    abar_prev = jnp.concatenate([jnp.ones((1,)), abar[ts[:-1]]])  # step 0 lands on x_0
    abar_t = abar[ts]
    sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    direction = jnp.sqrt(jnp.maximum(1 - abar_prev - sigma ** 2, 0.0))

    def step(x, xs):
      t, a_prev, sig, dirn = xs
      x0, eps = self._x0(x, t, net(x, jnp.full(x.shape[:1], t)))
      x = jnp.sqrt(a_prev) * x0 + dirn * eps
      if eta > 0:  # eta = 0 draws nothing: the path is a function of x_T alone
        x = x + sig * jax.random.normal(jax.random.fold_in(rng, t), x.shape, x.dtype)
      return x, None

    xs = (jnp.asarray(ts), abar_prev, sigma, direction)
    return jax.lax.scan(step, x, jax.tree.map(lambda a: a[::-1], xs))[0]
