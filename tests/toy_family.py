"""A tiny family for testing the train loop itself, independent of the real families."""

import jax
import jax.numpy as jnp
from flax import nnx

from scaler.families.base import FamilyDefaults, LossOut, Update
from scaler.nn import layers
from scaler.nn.layers import FLOAT32


class Net(nnx.Module):
  def __init__(self, rngs, hidden=64, in_role=None):
    kw = dict(precision=FLOAT32, rngs=rngs)
    self.a = layers.dense(2, hidden, in_role, "embed", **kw)
    self.b = layers.dense(hidden, hidden, "embed", "mlp", **kw)
    self.c = layers.dense(hidden, 2, "mlp", None, **kw)

  def __call__(self, x):
    return self.c(jax.nn.silu(self.b(jax.nn.silu(self.a(x)))))


class DenoiseFamily(FamilyDefaults):
  """Denoises x + noise; `noisy=False` makes the loss a pure function of the batch."""

  def __init__(self, noisy=True, hidden=64, in_role=None):
    self.noisy, self.hidden, self.in_role = noisy, hidden, in_role

  def init(self, rngs):
    return {"net": Net(rngs, self.hidden, self.in_role)}

  @property
  def updates(self):
    return (Update("net", ("net",), self.loss),)

  def loss(self, nets, extra, batch, rng, step):
    x = batch["x"]
    noise = jax.random.normal(rng, x.shape) if self.noisy else jnp.zeros_like(x)
    err = jnp.mean((nets["net"](x + 0.1 * noise) - x) ** 2)
    return LossOut(err, {"mse": err})

  def sample(self, nets, rng, num, **kw):
    return nets["net"](jax.random.normal(rng, (num, 2)))


class TwoNetFamily(DenoiseFamily):
  """Two networks, two updates, a counter as extra state: the shape of a GAN with a buffer."""

  def init(self, rngs):
    return {"g": Net(rngs, self.hidden), "d": Net(rngs, self.hidden)}

  def init_extra(self, rng):
    return {"count": jnp.zeros((), jnp.int32)}

  @property
  def updates(self):
    return (Update("d", ("d",), self.d_loss), Update("g", ("g",), self.g_loss))

  def d_loss(self, nets, extra, batch, rng, step):
    err = jnp.mean((nets["d"](batch["x"]) - batch["x"]) ** 2)
    return LossOut(err, {}, {"count": extra["count"] + 1})

  def g_loss(self, nets, extra, batch, rng, step):
    err = jnp.mean((nets["d"](nets["g"](batch["x"])) - batch["x"]) ** 2)
    return LossOut(err, {"d_calls": extra["count"].astype(jnp.float32)})
