"""What a family is: a small object the one train loop drives.

A family builds its named networks (`init`), says which optimizer updates make one
train step (`updates`: one for diffusion, two for a GAN), and draws samples. Each
update's loss returns its auxiliary metrics explicitly, and may return new extra state
(an EBM replay buffer); nothing travels through side channels.
"""

from typing import Any, Callable, NamedTuple, Protocol

import jax
from flax import nnx


class LossOut(NamedTuple):
  loss: jax.Array                       # scalar to minimise
  metrics: dict[str, jax.Array]         # named scalars, logged as `<update>/<name>`
  extra: Any = None                     # new extra state, or None to keep it


# loss(nets, extra, batch, rng) -> LossOut. `nets` maps network names to live NNX
# modules; only the networks of the update receive gradients.
LossFn = Callable[[dict[str, nnx.Module], Any, dict[str, jax.Array], jax.Array], LossOut]


class Update(NamedTuple):
  """One optimizer update inside a train step, applied in the family's order."""
  name: str
  networks: tuple[str, ...]   # the networks this loss moves
  loss: LossFn


class Family(Protocol):
  """The protocol every family implements (see scaler/families/diffusion.py)."""

  def init(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    """Builds the named networks (abstractly under jax.eval_shape, then sharded)."""

  def init_extra(self, rng: jax.Array) -> Any:
    """Extra non-trained state carried in the train state (None if the family has none)."""

  @property
  def updates(self) -> tuple[Update, ...]:
    """The optimizer updates of one train step, in order."""

  def sample(self, nets: dict[str, nnx.Module], rng: jax.Array, num: int) -> jax.Array:
    """`num` samples in model space, shape `(num, *data_shape)`."""
