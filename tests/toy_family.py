"""A tiny family for testing the train loop itself, independent of the real families."""

import dataclasses

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


class NormNet(nnx.Module):
  """A BatchNorm (running statistics) and a Dropout (an RNG count) between two layers."""

  def __init__(self, rngs):
    kw = dict(precision=FLOAT32, rngs=rngs)
    # No bias before a BatchNorm: its gradient is zero up to rounding, which Adam would
    # blow up to full-size steps of random sign.
    self.a = layers.dense(2, 64, None, "embed", use_bias=False, **kw)
    self.bn = layers.batch_norm(64, role="embed", momentum=0.5, **kw)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.c = layers.dense(64, 2, "embed", None, **kw)

  def __call__(self, x):
    return self.c(self.drop(jax.nn.silu(self.bn(self.a(x)))))


class NormFamily(DenoiseFamily):
  """Trains NormNet; the metric `mask_code` encodes 16 bits of a dropout mask drawn from
  the network's own RNG stream, so two steps with the same mask show the same code."""

  def init(self, rngs):
    return {"net": NormNet(rngs)}

  def loss(self, nets, extra, batch, rng, step):
    x = batch["x"]
    net = nets["net"]
    kept = net.drop(jnp.ones((1, 16)))[0] > 0
    code = jnp.sum(jnp.where(kept, 2.0 ** jnp.arange(16), 0.0))
    err = jnp.mean((net(x) - x) ** 2)
    return LossOut(err, {"mask_code": code})


class ShiftNet(nnx.Module):
  """A net with an input shift that only a data-dependent initialisation sets."""

  def __init__(self, rngs):
    self.shift = nnx.Param(jnp.zeros((2,)), out_sharding=(None,))
    self.net = Net(rngs)

  def __call__(self, x):
    return self.net(x - self.shift[...])


@dataclasses.dataclass(frozen=True)
class HooksConfig:
  """No keys: a family config for the registry."""


class HooksFamily(FamilyDefaults):
  """Uses every optional hook: data_init, extra state with a `batch` role, evaluate."""

  BUFFER = 64

  def __init__(self, cfg=None, net_cls=None, net_cfg=None, spec=None, precision=None):
    pass

  def init(self, rngs):
    return {"net": ShiftNet(rngs)}

  def init_extra(self, rng):
    return {"buffer": jax.random.normal(rng, (self.BUFFER, 2))}

  def extra_roles(self):
    return {"buffer": jax.sharding.PartitionSpec("batch", None)}

  def data_init(self, nets, batch, rng):
    nets["net"].shift[...] = jnp.mean(batch["x"], axis=0)

  @property
  def updates(self):
    return (Update("net", ("net",), self.loss),)

  def loss(self, nets, extra, batch, rng, step):
    x = batch["x"]
    err = jnp.mean((nets["net"](x) - x) ** 2)
    # Half the buffer's rows move towards the batch: a replay buffer's write, in small.
    buffer = extra["buffer"].at[: self.BUFFER // 2].set(x[: self.BUFFER // 2])
    return LossOut(err, {"buffer_mean": jnp.mean(buffer)}, {"buffer": buffer})

  def evaluate(self, nets, extra, batch, rng):
    x = batch["x"]
    return {"mse": jnp.mean((nets["net"](x) - x) ** 2, axis=1)}

  def sample(self, nets, rng, num, **kw):
    return nets["net"](jax.random.normal(rng, (num, 2)))
