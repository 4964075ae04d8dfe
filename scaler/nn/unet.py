"""A small DDPM-style UNet for NHWC images: eps_BxHxWxC = net(x_BxHxWxC, t_B).

Levels run over `mults`; each has `num_res_blocks` residual blocks (GroupNorm, SiLU,
conv, plus a per-channel time shift) and all but the last halve the resolution. The up
path mirrors it, concatenating the down path's output at each level. No attention: at
8x8 to 28x28 the receptive field of two levels already spans most of the image.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from scaler.errors import UserError
from scaler.config import one_of, param, positive
from scaler.nn import layers
from scaler.nn.layers import Precision
from scaler.nn.mlp import timestep_embedding


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  base: int = param(32, positive)            # channels at full resolution
  mults: tuple[int, ...] = (1, 2)            # channel multiplier per level; len-1 downsamplings
  num_res_blocks: int = param(1, positive)   # residual blocks per level, down and up
  groups: int = param(8, positive)           # GroupNorm groups; must divide every channel count
  time_dim: int = param(64, positive)        # sinusoidal time features
  remat: str = param("none", one_of(*layers.REMAT))  # activation checkpointing per ResBlock


class ResBlock(nnx.Module):
  """x + conv2(silu(norm2(conv1(silu(norm1(x))) + time(temb)))), 1x1 conv skip if needed."""

  def __init__(self, c_in, c_out, time_dim, groups, *, precision: Precision, rngs):
    kw = dict(precision=precision, rngs=rngs)
    self.norm1 = layers.group_norm(c_in, groups, role="conv_in", **kw)
    self.conv1 = layers.conv(c_in, c_out, (3, 3), **kw)
    self.time = layers.dense(time_dim, c_out, "time", "conv_out", **kw)
    self.norm2 = layers.group_norm(c_out, groups, role="conv_out", **kw)
    self.conv2 = layers.conv(c_out, c_out, (3, 3), **kw)
    self.skip = layers.conv(c_in, c_out, (1, 1), **kw) if c_in != c_out else None

  def __call__(self, x_BxHxWxI, temb_BxT):
    h_BxHxWxO = self.conv1(jax.nn.silu(self.norm1(x_BxHxWxI)))
    h_BxHxWxO = h_BxHxWxO + self.time(temb_BxT)[:, None, None, :]
    h_BxHxWxO = self.conv2(jax.nn.silu(self.norm2(h_BxHxWxO)))
    skip = x_BxHxWxI if self.skip is None else self.skip(x_BxHxWxI)
    return skip + h_BxHxWxO


def _upsample(h_BxHxWxC):
  """Nearest-neighbour x2; the conv that follows smooths it (no checkerboard artefacts)."""
  return jnp.repeat(jnp.repeat(h_BxHxWxC, 2, axis=1), 2, axis=2)


def check_shape(cfg: UNetConfig, data_shape) -> None:
  """UserErrors for images this UNet cannot take, naming the setting to change."""
  if len(data_shape) != 3:
    raise UserError(f"model unet needs images (H, W, C); the data has shape {tuple(data_shape)}")
  if not cfg.mults or cfg.num_res_blocks < 1 or cfg.base < 1:
    raise UserError(f"model unet: mults={list(cfg.mults)}, num_res_blocks={cfg.num_res_blocks}, "
                    f"base={cfg.base}: needs at least one level, one block and one channel")
  factor = 2 ** (len(cfg.mults) - 1)
  h, w, _ = data_shape
  if h % factor or w % factor:
    raise UserError(
        f"model.mults={list(cfg.mults)} halves the resolution {len(cfg.mults) - 1} times, "
        f"so height and width must be divisible by {factor}; the images are {h}x{w}")
  for m in (1, *cfg.mults):
    if (cfg.base * m) % cfg.groups:
      raise UserError(
          f"model.groups={cfg.groups} must divide base and every base*mult; "
          f"base={cfg.base} x {m} = {cfg.base * m} is not divisible")


class UNet(nnx.Module):
  """Predicts the noise in an NHWC image x_t from (x_t, t) and, if conditional, a label.

  A label embedding (num_classes + 1 rows, the last the null label) is added to the time
  embedding, as in guided diffusion (Dhariwal & Nichol 2021).
  """

  def __init__(self, cfg: UNetConfig, data_shape: tuple[int, ...], *, num_classes: int = 0,
               precision: Precision, rngs: nnx.Rngs):
    check_shape(cfg, data_shape)
    self.cfg, self.data_shape, self.precision = cfg, tuple(data_shape), precision
    self.num_classes = num_classes
    kw = dict(precision=precision, rngs=rngs)
    c = data_shape[-1]
    chans = [cfg.base * m for m in cfg.mults]
    last = len(chans) - 1
    self.time = layers.dense(cfg.time_dim, cfg.time_dim, None, "time", **kw)
    self.label = layers.label_embed(num_classes, cfg.time_dim, "time", **kw)
    # The image channels (1 or 3) are never sharded: they have no role.
    self.conv_in = layers.conv(c, cfg.base, (3, 3), in_role=None, **kw)
    blocks = lambda c_in, c_out: nnx.List([
        ResBlock(c_in if i == 0 else c_out, c_out, cfg.time_dim, cfg.groups, **kw)
        for i in range(cfg.num_res_blocks)])
    self.down = nnx.List([
        blocks(cfg.base if i == 0 else chans[i - 1], chans[i]) for i in range(last + 1)])
    self.downsample = nnx.List([
        layers.conv(chans[i], chans[i], (3, 3), strides=2, **kw) for i in range(last)])
    self.mid = ResBlock(chans[last], chans[last], cfg.time_dim, cfg.groups, **kw)
    # Up level i takes the level below it (upsampled) plus down level i's output.
    self.upsample = nnx.List([
        layers.conv(chans[i + 1], chans[i + 1], (3, 3), **kw) for i in range(last)])
    self.up = nnx.List([
        blocks(chans[min(i + 1, last)] + chans[i], chans[i]) for i in range(last + 1)])
    self.norm_out = layers.group_norm(chans[0], cfg.groups, role="conv_in", **kw)
    # Zero init: the untrained net predicts eps = 0, so the first loss is E|eps|^2 = 1.
    self.conv_out = layers.conv(chans[0], c, (3, 3), out_role=None, **kw,
                                kernel_init=nnx.initializers.zeros_init())

  def __call__(self, x_BxHxWxC, t_B, y_B=None):
    cast = self.precision.cast
    temb_BxT = self.time(cast(timestep_embedding(t_B, self.cfg.time_dim)))
    temb_BxT = jax.nn.silu(layers.add_label(self.label, temb_BxT, y_B, self.num_classes))
    call = layers.checkpointed(self.cfg.remat)
    h = self.conv_in(cast(x_BxHxWxC))
    skips = []
    for i, level in enumerate(self.down):
      for block in level:
        h = call(block, h, temb_BxT)
      skips.append(h)
      if i < len(self.downsample):
        h = self.downsample[i](h)
    h = call(self.mid, h, temb_BxT)
    for i in reversed(range(len(self.up))):
      if i < len(self.upsample):
        h = self.upsample[i](_upsample(h))
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      for block in self.up[i]:
        h = call(block, h, temb_BxT)
    return self.precision.output(self.conv_out(jax.nn.silu(self.norm_out(h))))
