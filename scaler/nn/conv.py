"""Convolutional pairs for NHWC images: a VAE's encoder and decoder (`conv_vae`), a
DCGAN's generator and discriminator (`dcgan`, Radford et al. 2016).

Both are the same two bodies. The encoder goes down: a 3x3 conv to `channels[0]`, then
one strided 4x4 conv per further level, each halving H and W. Its head is a dense layer
on the flattened features (a vector: a Gaussian posterior, a critic's score) or a 1x1
conv (a grid of code vectors for a VQ-VAE). The decoder mirrors it with strided 4x4
transposed convs. Shapes: B batch, H W C the image, h w c the lowest level, F = h*w*c
flattened features, L latent, K classes.

Labels: an embedding of the class is added, per channel, to the first feature map of
the encoder and of the decoder (generator); the discriminator takes it by projection
(Miyato & Koyama 2018): D(x, y) = w.phi(x) + b + embed(y).phi(x).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from scaler import partitioning
from scaler.config import one_of, param, positive
from scaler.errors import UserError
from scaler.nn import layers
from scaler.nn.layers import Precision
from scaler.nn.mlp_pair import ACTIVATIONS

NORMS = ("none", "batch", "group", "layer")

# The roles of an activation's dimensions. Every feature map is pinned (under the run's
# rules, see partitioning.constrain): its examples split like the batch, its channels like
# the conv that made them. Left to propagation, a batch that nothing ties to the batch
# axes (a GAN's generated one) let XLA 0.10.2 split these convs over their windows, and
# on fsdp=2 x tensor=2 (or x 4) it then summed each partial product over the tensor
# replicas too: gradients `tensor` times too large or small (tests/test_pairs.py).
FEATURE_MAP = ("batch", None, None, "conv_out")
IMAGE = ("batch", None, None, None)        # image channels (or a code grid's) have no role
VECTOR = ("batch", None)


def pin(x, roles):
  return partitioning.constrain(x, roles)


@dataclasses.dataclass(frozen=True)
class ConvVAEConfig:
  channels: tuple[int, ...] = (32, 64)   # per level; each level after the first halves H, W
  norm: str = param("group", one_of(*NORMS))
  groups: int = param(8, positive)       # GroupNorm groups (norm: group)


@dataclasses.dataclass(frozen=True)
class DCGANConfig:
  channels: tuple[int, ...] = (64, 128)  # per level, as conv_vae (discriminator order)
  # The DCGAN paper's choices: BatchNorm in the generator and the discriminator. A
  # WGAN-GP critic needs per-example gradients: layer (or none), never batch.
  generator_norm: str = param("batch", one_of(*NORMS))
  discriminator_norm: str = param("none", one_of(*NORMS))
  groups: int = param(8, positive)


def check_image_shape(name: str, channels, data_shape) -> None:
  """UserErrors for images this pair cannot take, naming the setting to change."""
  if len(data_shape) != 3:
    raise UserError(f"model {name} needs images (H, W, C); the data has shape "
                    f"{tuple(data_shape)} (use the mlp pair for vectors)")
  if not channels or min(channels) < 1:
    raise UserError(f"model.channels={list(channels)}: needs at least one positive level")
  factor = 2 ** (len(channels) - 1)
  h, w, _ = data_shape
  if h % factor or w % factor:
    raise UserError(f"model.channels={list(channels)} halves the resolution "
                    f"{len(channels) - 1} times, so height and width must be divisible by "
                    f"{factor}; the images are {h}x{w}")


def _norm(kind: str, c: int, groups: int, *, precision, rngs):
  kw = dict(precision=precision, rngs=rngs)
  if kind == "batch":
    return layers.batch_norm(c, role="conv_out", **kw)
  if kind == "group":
    if c % groups:
      raise UserError(f"model.groups={groups} must divide every channel count; {c} is not "
                      "divisible")
    return layers.group_norm(c, groups, role="conv_out", **kw)
  if kind == "layer":
    # Per example over H, W and C: WGAN-GP's choice for a critic.
    return nnx.LayerNorm(c, reduction_axes=(-3, -2, -1), feature_axes=-1, rngs=rngs,
                         dtype=precision.compute, param_dtype=precision.params,
                         scale_metadata=layers.roles("conv_out"),
                         bias_metadata=layers.roles("conv_out"))
  return None


class NormAct(nnx.Module):
  """norm (optional) then activation; BatchNorm uses batch statistics when training."""

  def __init__(self, kind, c, groups, act, *, precision, rngs):
    self.norm = _norm(kind, c, groups, precision=precision, rngs=rngs)
    self.batch = kind == "batch"
    self.act = ACTIVATIONS[act]

  def __call__(self, h, train: bool):
    if self.norm is not None:
      h = self.norm(h, use_running_average=not train) if self.batch else self.norm(h)
    return self.act(h)


class ConvEncoder(nnx.Module):
  """x (B, H, W, C) -> (B, *out_shape): (O,) through a dense head, or (h, w, D) through
  a 1x1 conv head."""

  def __init__(self, channels, data_shape, out_shape, num_classes=0, *, norm="none",
               groups=8, act="silu", precision: Precision, rngs, name="conv_vae"):
    check_image_shape(name, channels, data_shape)
    kw = dict(precision=precision, rngs=rngs)
    self.precision, self.out_shape = precision, tuple(out_shape)
    h, w, c = data_shape
    scale = 2 ** (len(channels) - 1)
    self.grid = (h // scale, w // scale)
    # The image channels (1 or 3) are never sharded: they have no role.
    self.conv_in = layers.conv(c, channels[0], (3, 3), in_role=None, **kw)
    self.label = layers.embed(num_classes, channels[0], None, "conv_out", **kw) \
        if num_classes else None
    self.act_in = NormAct("none", channels[0], groups, act, **kw)
    # No bias before a normalisation: BatchNorm removes it (its gradient is zero up to
    # rounding, which Adam blows up to full-size steps of random sign), the others mostly.
    bias = norm == "none"
    self.down = nnx.List([
        layers.conv(channels[i - 1], channels[i], (4, 4), strides=2, use_bias=bias, **kw)
        for i in range(1, len(channels))])
    self.norms = nnx.List([NormAct(norm, channels[i], groups, act, **kw)
                           for i in range(1, len(channels))])
    self.features_dim = self.grid[0] * self.grid[1] * channels[-1]
    if len(self.out_shape) == 3:   # a grid of code vectors
      if self.out_shape[:2] != self.grid:
        raise ValueError(f"grid {self.out_shape[:2]} != the encoder's {self.grid}")
      self.head = layers.conv(channels[-1], self.out_shape[-1], (1, 1), out_role=None, **kw)
    else:
      self.head = layers.dense(self.features_dim, math.prod(self.out_shape), "embed", None,
                               **kw)

  def feature_map(self, x_BxHxWxC, label_B=None, train: bool = True):
    h = pin(self.conv_in(self.precision.cast(pin(x_BxHxWxC, IMAGE))), FEATURE_MAP)
    if self.label is not None:
      h = h + self.label(label_B)[:, None, None, :]
    h = self.act_in(h, train)
    for conv, norm in zip(self.down, self.norms):
      h = norm(pin(conv(h), FEATURE_MAP), train)
    return h                                                     # (B, h, w, c)

  def features(self, x, label_B=None, train: bool = True):
    h = self.feature_map(x, label_B, train)
    return h.reshape(h.shape[0], -1)                             # (B, F)

  def __call__(self, x, label_B=None, train: bool = True):
    if len(self.out_shape) == 3:
      y = self.head(self.feature_map(x, label_B, train))
    else:
      y = self.head(self.features(x, label_B, train)).reshape(x.shape[0], *self.out_shape)
    return self.precision.output(y)


class ConvDecoder(nnx.Module):
  """z (B, L) or (B, h, w, D) -> (B, H, W, C_out)."""

  def __init__(self, channels, latent_shape, data_shape, num_classes=0, *, norm="none",
               groups=8, act="silu", out_act=None, precision: Precision, rngs,
               name="conv_vae"):
    check_image_shape(name, channels, data_shape)
    kw = dict(precision=precision, rngs=rngs)
    self.precision, self.latent_shape = precision, tuple(latent_shape)
    h, w, c = data_shape
    scale = 2 ** (len(channels) - 1)
    self.grid = (h // scale, w // scale, channels[-1])
    bias = norm == "none"   # none before a normalisation, as in the encoder
    if len(self.latent_shape) == 3:
      self.inp = layers.conv(self.latent_shape[-1], channels[-1], (3, 3), in_role=None,
                             use_bias=bias, **kw)
    else:
      # The first feature map, flattened: it plays a conv's output channels. Why not
      # `embed`: with it on fsdp (fsdp_tensor rules) XLA 0.10.2 computes wrong gradients
      # for this dense -> reshape -> transposed conv -> conv on 2x2 and 2x4 fsdp x tensor
      # meshes (missing reduction; openxla/xla#40034 looks alike); on tensor they are right.
      self.inp = layers.dense(math.prod(self.latent_shape), math.prod(self.grid), None,
                              "conv_out", use_bias=bias, **kw)
    self.label = layers.embed(num_classes, channels[-1], None, "conv_out", **kw) \
        if num_classes else None
    self.act_in = NormAct(norm, channels[-1], groups, act, **kw)
    self.up = nnx.List([
        layers.conv_transpose(channels[i], channels[i - 1], (4, 4), strides=2,
                              use_bias=bias, **kw)
        for i in range(len(channels) - 1, 0, -1)])
    self.norms = nnx.List([NormAct(norm, channels[i - 1], groups, act, **kw)
                           for i in range(len(channels) - 1, 0, -1)])
    self.conv_out = layers.conv(channels[0], c, (3, 3), out_role=None, **kw)
    self.out_act = out_act

  def __call__(self, z, label_B=None, train: bool = True):
    z = self.precision.cast(z)
    if len(self.latent_shape) == 3:
      h = self.inp(pin(z, IMAGE))
    else:
      z = pin(z.reshape(z.shape[0], -1), VECTOR)
      h = self.inp(z).reshape(z.shape[0], *self.grid)
    h = pin(h, FEATURE_MAP)
    if self.label is not None:
      h = h + self.label(label_B)[:, None, None, :]
    h = self.act_in(h, train)
    for conv, norm in zip(self.up, self.norms):
      h = norm(pin(conv(h), FEATURE_MAP), train)
    y = pin(self.conv_out(h), IMAGE)
    if self.out_act == "tanh":
      y = jnp.tanh(y)
    return self.precision.output(y)


class ConvDiscriminator(nnx.Module):
  """x (B, H, W, C) -> logits (B,); with classes, a projection discriminator."""

  def __init__(self, cfg: DCGANConfig, data_shape, num_classes=0, *, precision, rngs):
    kw = dict(precision=precision, rngs=rngs)
    self.precision = precision
    self.body = ConvEncoder(cfg.channels, data_shape, (1,), norm=cfg.discriminator_norm,
                            groups=cfg.groups, act="leaky_relu", name="dcgan", **kw)
    self.project = layers.embed(num_classes, self.body.features_dim, None, "embed", **kw) \
        if num_classes else None

  def __call__(self, x, label_B=None, train: bool = True):
    phi_BxF = self.body.features(x, None, train)
    out_B = self.body.head(phi_BxF)[:, 0]
    if self.project is not None:
      out_B = out_B + jnp.sum(self.project(label_B) * phi_BxF, axis=-1)
    return self.precision.output(out_B)


class ConvVAE:
  """`conv_vae`: the encoder and decoder of a VAE or VQ-VAE for images."""

  @staticmethod
  def encoder(cfg: ConvVAEConfig, data_shape, out_shape, num_classes=0, *, precision, rngs):
    return ConvEncoder(cfg.channels, data_shape, out_shape, num_classes, norm=cfg.norm,
                       groups=cfg.groups, precision=precision, rngs=rngs)

  @staticmethod
  def decoder(cfg: ConvVAEConfig, latent_shape, data_shape, num_classes=0, *, precision,
              rngs):
    return ConvDecoder(cfg.channels, latent_shape, data_shape, num_classes, norm=cfg.norm,
                       groups=cfg.groups, precision=precision, rngs=rngs)

  @staticmethod
  def code_grid(cfg: ConvVAEConfig, data_shape):
    """The (h, w) grid of a VQ-VAE's codes: the encoder's lowest resolution."""
    check_image_shape("conv_vae", cfg.channels, data_shape)
    scale = 2 ** (len(cfg.channels) - 1)
    return (data_shape[0] // scale, data_shape[1] // scale)


class DCGAN:
  """`dcgan`: strided transposed convs up (ReLU, tanh out), strided convs down (leaky ReLU)."""

  @staticmethod
  def generator(cfg: DCGANConfig, latent_dim, data_shape, num_classes=0, *, precision, rngs):
    return ConvDecoder(cfg.channels, (latent_dim,), data_shape, num_classes,
                       norm=cfg.generator_norm, groups=cfg.groups, act="relu",
                       out_act="tanh", precision=precision, rngs=rngs, name="dcgan")

  discriminator = ConvDiscriminator
