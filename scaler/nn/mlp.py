"""A residual MLP denoiser for vector data: eps_BxD = net(x_BxD, t_B).

Shapes: B batch, D data (the flattened data shape), E hidden (`embed`), M block width
(`mlp`), T time embedding (`time`). Kernels alternate (embed, mlp) / (mlp, embed), so
the FSDP rules split one dimension of each and the tensor rules split the other.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from scaler.config import one_of, param, positive
from scaler.nn import layers
from scaler.nn.layers import Precision


def timestep_embedding(t_B, dim: int, max_period=10_000.0):
  """Sinusoidal features of (integer or real) timesteps, (B,) -> (B, dim)."""
  half = dim // 2
  freqs_H = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args_BxH = t_B.astype(jnp.float32)[:, None] * freqs_H[None]
  emb_BxT = jnp.concatenate([jnp.sin(args_BxH), jnp.cos(args_BxH)], axis=-1)
  if dim % 2:
    emb_BxT = jnp.pad(emb_BxT, ((0, 0), (0, 1)))
  return emb_BxT


@dataclasses.dataclass(frozen=True)
class MLPDenoiserConfig:
  hidden: int = param(256, positive)   # width of the residual stream (embed)
  depth: int = param(3, positive)      # residual blocks
  time_dim: int = param(64, positive)  # sinusoidal time features
  mlp_ratio: int = param(1, positive)  # block width = mlp_ratio * hidden (mlp)
  remat: str = param("none", one_of(*layers.REMAT))  # activation checkpointing per block


class Block(nnx.Module):
  """h + fc2(silu(fc1(silu(norm(h))) + time(temb))): pre-norm, time added in the middle."""

  def __init__(self, hidden, width, time_dim, *, precision: Precision, rngs):
    kw = dict(precision=precision, rngs=rngs)
    self.norm = layers.layer_norm(hidden, role="embed", **kw)
    self.fc1 = layers.dense(hidden, width, "embed", "mlp", **kw)
    self.time = layers.dense(time_dim, width, "time", "mlp", **kw)
    self.fc2 = layers.dense(width, hidden, "mlp", "embed", **kw)

  def __call__(self, h_BxE, temb_BxT):
    u_BxM = self.fc1(jax.nn.silu(self.norm(h_BxE))) + self.time(temb_BxT)
    return h_BxE + self.fc2(jax.nn.silu(u_BxM))


class MLPDenoiser(nnx.Module):
  """Predicts the noise in x_t from (x_t, t) and, if conditional, a label; any data
  shape, flattened to D. A label embedding (num_classes + 1 rows, the last the null
  label) is added to the time embedding."""

  def __init__(self, cfg: MLPDenoiserConfig, data_shape: tuple[int, ...], *,
               num_classes: int = 0, precision: Precision, rngs: nnx.Rngs):
    self.cfg, self.data_shape, self.precision = cfg, tuple(data_shape), precision
    self.num_classes = num_classes
    kw = dict(precision=precision, rngs=rngs)
    d = math.prod(self.data_shape)
    # The data dimension (2 for two moons) is never sharded: it has no role.
    self.inp = layers.dense(d, cfg.hidden, None, "embed", **kw)
    self.time = layers.dense(cfg.time_dim, cfg.time_dim, None, "time", **kw)
    self.label = layers.label_embed(num_classes, cfg.time_dim, "time", **kw)
    self.blocks = nnx.List([
        Block(cfg.hidden, cfg.mlp_ratio * cfg.hidden, cfg.time_dim, **kw)
        for _ in range(cfg.depth)])
    self.norm = layers.layer_norm(cfg.hidden, role="embed", **kw)
    # Zero init: the untrained net predicts eps = 0, so the first loss is E|eps|^2 = 1.
    self.out = layers.dense(cfg.hidden, d, "embed", None, **kw,
                            kernel_init=nnx.initializers.zeros_init())

  def __call__(self, x, t_B, y_B=None):
    cast = self.precision.cast
    x_BxD = cast(x.reshape(x.shape[0], -1))
    temb_BxT = self.time(cast(timestep_embedding(t_B, self.cfg.time_dim)))
    temb_BxT = jax.nn.silu(layers.add_label(self.label, temb_BxT, y_B, self.num_classes))
    h_BxE = self.inp(x_BxD)
    h_BxE = layers.chain(self.blocks, self.cfg.remat, h_BxE, temb_BxT)
    eps_BxD = self.out(jax.nn.silu(self.norm(h_BxE)))
    return self.precision.output(eps_BxD).reshape(x.shape)
