"""Energy networks: x -> E(x), one scalar per example, for energy-based models.

`energy_mlp` takes vectors (any shape, flattened to D); `energy_conv` takes NHWC images.
Both use SiLU (Swish with beta = 1, as Du & Mordatch 2019) or leaky ReLU, and optional
spectral normalisation (Miyato et al. 2018) of every layer: each kernel W is divided by
an estimate of its largest singular value, which bounds the network's Lipschitz
constant and so the Langevin gradients. The estimate's power-iteration vector `u` is
non-gradient module state: `power_iterate()` advances it (the family calls it once per
update), the train step writes it back, and it is sharded like the kernel's output
dimension. Calling the network never changes it, so a Langevin chain sees one energy.

Shapes: B batch, D data, E/M hidden widths (`embed`/`mlp`), F fan-in, O fan-out.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from scaler.config import one_of, param, positive
from scaler.errors import UserError
from scaler.nn import layers
from scaler.nn.layers import Precision

ACTIVATIONS = {"silu": jax.nn.silu, "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.2)}


class PowerIteration(nnx.Variable):
  """A spectral norm's power-iteration vector: module state, never a gradient target."""


def _unit(v):
  return v / (jnp.linalg.norm(v) + 1e-12)


class Spectral(nnx.Module):
  """y = layer(x) / sigma(W) + b for a bias-free dense or conv `layer` with kernel W.

  sigma(W) = |W_FxO u|, with u the stored estimate of W's top right-singular vector;
  gradients flow through W only (Miyato et al. 2018, Algorithm 1).
  """

  def __init__(self, layer, out_features: int, out_role, *, precision: Precision, rngs):
    self.layer, self.precision = layer, precision
    self.bias = nnx.Param(jnp.zeros((out_features,), precision.params))
    self.bias.set_metadata(**layers.roles(out_role))
    self.u = PowerIteration(_unit(jax.random.normal(rngs.params(), (out_features,))))
    self.u.set_metadata(**layers.roles(out_role))

  def _kernel_FxO(self):
    w = self.layer.kernel[...]
    return w.reshape(-1, w.shape[-1])

  def power_iterate(self):
    w_FxO = jax.lax.stop_gradient(self._kernel_FxO())
    self.u[...] = _unit(w_FxO.T @ _unit(w_FxO @ self.u[...]))

  def __call__(self, x):
    sigma = jnp.linalg.norm(self._kernel_FxO() @ jax.lax.stop_gradient(self.u[...]))
    y = self.layer(x) / sigma.astype(self.precision.compute)
    return y + self.bias[...].astype(self.precision.compute)


def _dense(d_in, d_out, in_role, out_role, spectral, *, precision, rngs):
  if not spectral:
    return layers.dense(d_in, d_out, in_role, out_role, precision=precision, rngs=rngs)
  inner = layers.dense(d_in, d_out, in_role, out_role, use_bias=False, precision=precision,
                       rngs=rngs)
  return Spectral(inner, d_out, out_role, precision=precision, rngs=rngs)


def _conv(c_in, c_out, in_role, spectral, *, precision, rngs, **kw):
  conv = lambda **b: layers.conv(c_in, c_out, (3, 3), in_role=in_role, precision=precision,
                                 rngs=rngs, **kw, **b)
  if not spectral:
    return conv()
  return Spectral(conv(use_bias=False), c_out, "conv_out", precision=precision, rngs=rngs)


class _Energy(nnx.Module):
  def power_iterate(self):
    """One power iteration of every spectrally normalised layer (no-op without them)."""
    for _, m in nnx.iter_modules(self):
      if isinstance(m, Spectral):
        m.power_iterate()


@dataclasses.dataclass(frozen=True)
class EnergyMLPConfig:
  hidden: int = param(256, positive)        # width of every hidden layer
  depth: int = param(3, positive)           # hidden layers
  activation: str = param("silu", one_of(*ACTIVATIONS))
  spectral_norm: bool = False               # divide every kernel by its spectral norm


class EnergyMLP(_Energy):
  """E(x) for vectors: D -> hidden x depth -> 1. Kernels alternate (embed, mlp) and
  (mlp, embed), so fsdp splits one dimension of each and tensor the other."""

  def __init__(self, cfg: EnergyMLPConfig, data_shape, *, precision: Precision, rngs):
    self.precision, self.act = precision, ACTIVATIONS[cfg.activation]
    kw = dict(precision=precision, rngs=rngs)
    sn = cfg.spectral_norm
    roles = ["embed" if i % 2 == 0 else "mlp" for i in range(cfg.depth)]
    # The data dimension (2 for toy data) is never sharded: it has no role.
    self.inp = _dense(math.prod(data_shape), cfg.hidden, None, roles[0], sn, **kw)
    self.hidden = nnx.List([_dense(cfg.hidden, cfg.hidden, roles[i - 1], roles[i], sn, **kw)
                            for i in range(1, cfg.depth)])
    self.out = _dense(cfg.hidden, 1, roles[-1], None, sn, **kw)

  def __call__(self, x):
    h_BxE = self.act(self.inp(self.precision.cast(x.reshape(x.shape[0], -1))))
    for layer in self.hidden:
      h_BxE = self.act(layer(h_BxE))
    return self.precision.output(self.out(h_BxE))[:, 0]


@dataclasses.dataclass(frozen=True)
class EnergyConvConfig:
  channels: tuple[int, ...] = (32, 64, 128)  # per level; every level after the first halves H, W
  activation: str = param("silu", one_of(*ACTIVATIONS))
  spectral_norm: bool = False


def check_image_shape(cfg: EnergyConvConfig, data_shape) -> None:
  if len(data_shape) != 3:
    raise UserError(f"model energy_conv needs images (H, W, C); the data has shape "
                    f"{tuple(data_shape)} (use energy_mlp for vectors)")
  if not cfg.channels or min(cfg.channels) < 1:
    raise UserError(f"model.channels={list(cfg.channels)}: needs at least one positive level")
  factor = 2 ** (len(cfg.channels) - 1)
  if data_shape[0] % factor or data_shape[1] % factor:
    raise UserError(f"model.channels has {len(cfg.channels)} levels, halving the resolution "
                    f"{len(cfg.channels) - 1} times: height and width must be divisible by "
                    f"{factor}; the images are {data_shape[0]}x{data_shape[1]}")


class EnergyConv(_Energy):
  """E(x) for NHWC images: 3x3 convs (stride 2 after the first level), then a dense
  layer from the flattened last level to one number. Flattened, not pooled: at 8x8 a
  digit's strokes are told apart by where they are, which a global mean forgets."""

  def __init__(self, cfg: EnergyConvConfig, data_shape, *, precision: Precision, rngs):
    check_image_shape(cfg, data_shape)
    self.precision, self.act = precision, ACTIVATIONS[cfg.activation]
    kw = dict(precision=precision, rngs=rngs)
    sn, ch = cfg.spectral_norm, cfg.channels
    # The image channels (1 or 3) are never sharded: they have no role.
    convs = [_conv(data_shape[-1], ch[0], None, sn, **kw)]
    convs += [_conv(ch[i - 1], ch[i], "conv_in", sn, strides=2, **kw) for i in range(1, len(ch))]
    self.convs = nnx.List(convs)
    factor = 2 ** (len(ch) - 1)
    features = (data_shape[0] // factor) * (data_shape[1] // factor) * ch[-1]
    # Positions x channels, flattened: no single role names it, and it is small.
    self.out = _dense(features, 1, None, None, sn, **kw)

  def __call__(self, x_BxHxWxC):
    h = self.precision.cast(x_BxHxWxC)
    for conv in self.convs:
      h = self.act(conv(h))
    return self.precision.output(self.out(h.reshape(h.shape[0], -1)))[:, 0]
