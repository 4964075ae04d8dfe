"""MLP pairs for vector data: a VAE's encoder and decoder, a GAN's generator and critic.

A model choice here names a *pair* of networks (`model: {name: mlp_vae, ...}` builds an
encoder and a decoder, `mlp_gan` a generator and a discriminator); the family asks the
pair for each network with the shapes it needs, so one model config sizes both.

Shapes: B batch, D data (flattened), L latent (or code) dimension, E hidden (`embed`),
K classes. Labels condition a network by an embedding added to its first hidden layer;
the discriminator takes them by projection instead (Miyato & Koyama 2018), as the
conv discriminator does.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from scaler.config import one_of, param, positive
from scaler.nn import layers
from scaler.nn.layers import Precision

ACTIVATIONS = {"silu": jax.nn.silu, "relu": jax.nn.relu,
               "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.2)}


@dataclasses.dataclass(frozen=True)
class MLPPairConfig:
  hidden: int = param(256, positive)    # width of every hidden layer (embed)
  depth: int = param(3, positive)       # hidden layers per network
  # Normalisation of the hidden layers: none or layer (per example, so a WGAN-GP critic
  # keeps its per-example input gradients; BatchNorm would mix the examples).
  norm: str = param("none", one_of("none", "layer"))


def hidden_role(i: int) -> str:
  """Hidden layer i's role: embed, mlp, embed, ... so no kernel names one role twice (the
  fsdp rules split one dimension of each kernel, the tensor rules the other)."""
  return "embed" if i % 2 == 0 else "mlp"


class MLP(nnx.Module):
  """x_BxI -> y_BxO through `depth` hidden layers; an optional label embedding is added
  to the first one. `features` gives the last hidden layer (a projection critic reads it)."""

  def __init__(self, cfg: MLPPairConfig, in_dim: int, out_dim: int, act: str,
               num_classes: int = 0, *, precision: Precision, rngs):
    kw = dict(precision=precision, rngs=rngs)
    self.precision, self.act = precision, ACTIVATIONS[act]
    h, last = cfg.hidden, hidden_role(cfg.depth - 1)
    self.feature_role = last
    # Data and latent dimensions (2, 16) are never sharded: they have no role.
    self.inp = layers.dense(in_dim, h, None, "embed", **kw)
    self.label = layers.embed(num_classes, h, None, "embed", **kw) if num_classes else None
    self.hidden = nnx.List([layers.dense(h, h, hidden_role(i), hidden_role(i + 1), **kw)
                            for i in range(cfg.depth - 1)])
    self.norms = nnx.List([layers.layer_norm(h, role=hidden_role(i), **kw)
                           if cfg.norm == "layer" else None for i in range(cfg.depth)])
    self.out = layers.dense(h, out_dim, last, None, **kw)

  def _norm(self, i, h):
    return h if self.norms[i] is None else self.norms[i](h)

  def features(self, x_BxI, label_B=None):
    h_BxE = self.inp(self.precision.cast(x_BxI))
    if self.label is not None:
      h_BxE = h_BxE + self.label(label_B)
    h_BxE = self.act(self._norm(0, h_BxE))
    for i, layer in enumerate(self.hidden):
      h_BxE = self.act(self._norm(i + 1, layer(h_BxE)))
    return h_BxE

  def __call__(self, x_BxI, label_B=None):
    return self.precision.output(self.out(self.features(x_BxI, label_B)))


class MLPEncoder(nnx.Module):
  """x (B, *data_shape) -> (B, *out_shape): a Gaussian posterior's mean and log-variance
  side by side (out_shape (2L,)), or a VQ-VAE's one-position code grid ((1, L))."""

  def __init__(self, cfg: MLPPairConfig, data_shape, out_shape, num_classes=0, *,
               precision: Precision, rngs):
    self.out_shape = tuple(out_shape)
    self.net = MLP(cfg, math.prod(data_shape), math.prod(out_shape), "silu", num_classes,
                   precision=precision, rngs=rngs)

  def __call__(self, x, label_B=None, train: bool = True):
    y = self.net(x.reshape(x.shape[0], -1), label_B)
    return y.reshape(x.shape[0], *self.out_shape)


class MLPDecoder(nnx.Module):
  """z (B, *latent_shape) -> (B, *data_shape): a likelihood's mean or logits, or a
  generator's sample."""

  def __init__(self, cfg: MLPPairConfig, latent_shape, data_shape, num_classes=0, *,
               precision: Precision, rngs, act: str = "silu"):
    self.data_shape = tuple(data_shape)
    self.net = MLP(cfg, math.prod(latent_shape), math.prod(data_shape), act, num_classes,
                   precision=precision, rngs=rngs)

  def __call__(self, z, label_B=None, train: bool = True):
    y = self.net(z.reshape(z.shape[0], -1), label_B)
    return y.reshape(z.shape[0], *self.data_shape)


class MLPDiscriminator(nnx.Module):
  """x (B, *data_shape) -> logits (B,); with classes, the projection critic
  D(x, y) = w.phi(x) + b + embed(y).phi(x)."""

  def __init__(self, cfg: MLPPairConfig, data_shape, num_classes=0, *,
               precision: Precision, rngs):
    kw = dict(precision=precision, rngs=rngs)
    self.precision = precision
    self.net = MLP(cfg, math.prod(data_shape), 1, "leaky_relu", **kw)
    self.project = (layers.embed(num_classes, cfg.hidden, None, self.net.feature_role, **kw)
                    if num_classes else None)

  def __call__(self, x, label_B=None, train: bool = True):
    phi_BxE = self.net.features(x.reshape(x.shape[0], -1))
    out_B = self.net.out(phi_BxE)[:, 0]
    if self.project is not None:
      out_B = out_B + jnp.sum(self.project(label_B) * phi_BxE, axis=-1)
    return self.precision.output(out_B)


class MLPVAE:
  """`mlp_vae`: the encoder and decoder of a VAE (or VQ-VAE) for vectors."""
  encoder = MLPEncoder
  decoder = MLPDecoder

  @staticmethod
  def code_grid(cfg, data_shape):
    """A VQ-VAE's code positions: one code vector per example."""
    return (1,)


class MLPGAN:
  """`mlp_gan`: the generator and discriminator of a GAN for vectors (2D toys)."""

  @staticmethod
  def generator(cfg, latent_dim, data_shape, num_classes=0, *, precision, rngs):
    # ReLU-family generator; the output is unbounded, as standardised vectors are.
    return MLPDecoder(cfg, (latent_dim,), data_shape, num_classes, precision=precision,
                      rngs=rngs, act="leaky_relu")

  discriminator = MLPDiscriminator
