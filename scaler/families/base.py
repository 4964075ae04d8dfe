"""What a family is: a small object the one train loop drives.

A family builds its named networks (`init`), says which optimizer updates make one
train step (`updates`: one for diffusion, a critic and a generator update for a GAN),
and draws samples. Each update's loss returns its auxiliary metrics explicitly, and may
return new extra state (an EBM replay buffer); nothing travels through side channels.

Everything else is optional, with the defaults of `FamilyDefaults`:

  init_extra(rng)          extra state carried in the train state (None: none)
  extra_roles()            the roles of its dimensions, like a parameter's: a pytree of
                           tuples matching init_extra's arrays (a `batch` role shards a
                           replay buffer along the data axes); None replicates it
  sampled_networks         the networks `sample` uses; the EMA covers these only
  data_init(nets, batch, rng)   initialises modules from the first global batch of a
                           fresh run (Glow's ActNorm), once, identically on any mesh;
                           the result is saved, so a resume never repeats it
  evaluate(nets, extra, batch, rng) -> {name: per-example values (B,)}: held-out
                           metrics that `scaler/evaluate.py` averages over a split
  reconstruct(nets, batch, rng) -> x_hat (B, ...): an autoencoder's reconstructions in
                           model space; a run then writes held-out ones as a picture
  check_batch(batch_size, shards)   refuses, with a UserError naming the key, settings
                           that the global batch or the data x fsdp device count rule
                           out (an EBM's buffer size), before anything compiles
  sample_views             {title: keyword arguments of `sample`}: the variants the
                           final picture shows side by side (an EBM: from noise, from
                           its buffer)

`sample` receives the family's extra state as `extra=` (None when it has none), so a
sampler may start from it (an EBM's replay buffer).

The loss sees the global step (a KL warm-up, a critic schedule), and the batch carries
`label` (int32, (B,)) when the data has classes; `spec.num_classes` says how many.
Modules' non-parameter state (BatchNorm statistics, a Dropout's RNG count, a VQ
codebook) is written back after every update: mutate it in the loss as NNX modules do.
"""

from typing import Any, Callable, NamedTuple, Protocol

import jax
from flax import nnx


class LossOut(NamedTuple):
  loss: jax.Array                       # scalar to minimise
  metrics: dict[str, jax.Array]         # named scalars, logged as `<update>/<name>`
  extra: Any = None                     # new extra state, or None to keep it


# loss(nets, extra, batch, rng, step) -> LossOut. `nets` maps network names to live NNX
# modules; only the networks of the update receive gradients; `step` is the global
# train step (int32 scalar), the same for every update and micro-batch of a step.
LossFn = Callable[[dict[str, nnx.Module], Any, dict[str, jax.Array], jax.Array, jax.Array],
                  LossOut]


class Update(NamedTuple):
  """One optimizer update inside a train step, applied in the family's order.

  `repeat` > 1 applies it that many times in a row (a WGAN critic's n_critic), each on
  its own 1/repeat slice of the global batch; the networks' optimizers and learning
  rate schedules count every application.
  """
  name: str
  networks: tuple[str, ...]   # the networks this loss moves
  loss: LossFn
  repeat: int = 1


class Family(Protocol):
  """The protocol every family implements (see scaler/families/diffusion.py)."""

  def init(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    """Builds the named networks (abstractly under jax.eval_shape, then sharded)."""

  @property
  def updates(self) -> tuple[Update, ...]:
    """The optimizer updates of one train step, in order."""

  def sample(self, nets: dict[str, nnx.Module], rng: jax.Array, num: int, *, extra=None,
             **kw) -> jax.Array:
    """`num` samples in model space, shape `(num, *data_shape)`; `extra` is the train
    state's extra state."""


class FamilyDefaults:
  """The optional part of the protocol, as a family that has none of it."""

  def init_extra(self, rng):
    return None

  def extra_roles(self):
    return None

  @property
  def sampled_networks(self) -> tuple[str, ...] | None:
    return None  # all of them

  def check_batch(self, batch_size: int, shards: int) -> None:
    pass

  sample_views = {"samples": {}}

  data_init = None      # or a method (nets, batch, rng) -> None, mutating the modules
  evaluate = None       # or a method (nets, extra, batch, rng) -> {name: (B,) values}
  reconstruct = None    # or a method (nets, batch, rng) -> (B, ...) in model space
