"""Pixel levels, vector bins, and the units a log-likelihood is reported in.

The model sees normalised data (scaler/data/spec.py): images mapped from their value
range [lo, hi] to [-1, 1], vectors standardised per feature, y = (x - shift) / scale. A
likelihood is reported where the data lives, so runs with other normalisations compare:

  * images, in bits per dimension over the pixel levels: the discrete probability of
    the integer pixel values (autoregressive models), or for a density, its value on
    the pixels dequantised with uniform noise in unit-width bins, a lower bound on that
    probability (Theis et al. 2016). Level k of L sits at model value -1 + k * step,
    step = 2 / (L - 1); a bin of unit width in pixel space is `step` wide in model
    space, so -log p_pixels = -log p_model - D log(step).
  * vectors, in nats per example in data space: -log p_x = -log p_y + sum log(scale).
    Discretised into bins of width w (in model space), a bin's probability P is a
    density P / w on it: -log p_y = -log P + D log(w).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from scaler.errors import UserError

LN2 = math.log(2.0)


def auto_levels(spec) -> int:
  """The levels of integer pixel values over the data's range: hi - lo + 1 (digits:
  0..16 is 17; 8-bit images 256)."""
  return int(round(2 * float(np.max(spec.scale)))) + 1


class Units:
  """-log p in model space -> nats per example where the data lives, and bits per dim."""

  def __init__(self, spec, log_volume: float):
    self.dims = math.prod(spec.shape)
    # log |d model / d reported space| summed over the dimensions: added to -log p.
    self.log_volume = float(log_volume)

  def nats(self, nll_model_B):
    return nll_model_B + self.log_volume

  def bits_per_dim(self, nats_B):
    return nats_B / (self.dims * LN2)


class Levels:
  """Integer pixel levels of images: tokens, dequantisation, and the units."""

  def __init__(self, spec, levels: int | None, key: str = "family.levels"):
    self.num = auto_levels(spec) if levels is None else int(levels)
    if self.num < 2:
      raise UserError(f"{key}={self.num}: pixel levels must be at least 2 (the data's range "
                      f"gives {auto_levels(spec)}); set {key} to the number of pixel values")
    self.step = 2.0 / (self.num - 1)
    # A density on dequantised pixels (a flow) is converted; a distribution over the
    # levels themselves (an autoregressive model) is in pixel units already.
    self.density_units = Units(spec, -math.prod(spec.shape) * math.log(self.step))
    self.discrete_units = Units(spec, 0.0)

  def tokens(self, x):
    """Model values in [-1, 1] -> level indices 0..L-1 (int32)."""
    return jnp.clip(jnp.round((x + 1.0) / self.step), 0, self.num - 1).astype(jnp.int32)

  def values(self, k):
    return k.astype(jnp.float32) * self.step - 1.0

  def dequantize(self, x, rng):
    """x plus uniform noise over its level's bin, [k - 1/2, k + 1/2) in pixel units."""
    return x + (jax.random.uniform(rng, x.shape) - 0.5) * self.step

  def quantize(self, x):
    return self.values(self.tokens(x))


class Bins:
  """Vectors discretised per dimension into `num` bins over [-bound, bound] (in standard
  deviations; values beyond fall in the end bins)."""

  def __init__(self, spec, bins: int, bound: float):
    if bins < 2:
      raise UserError(f"family.bins={bins}: needs at least 2 bins")
    self.num, self.bound = int(bins), float(bound)
    self.width = 2 * self.bound / self.num
    dims = math.prod(spec.shape)
    self.units = Units(spec, dims * math.log(self.width)
                       + float(np.sum(np.log(np.broadcast_to(spec.scale, spec.shape)))))

  def tokens(self, y):
    k = jnp.floor((y + self.bound) / self.width)
    return jnp.clip(k, 0, self.num - 1).astype(jnp.int32)

  def values(self, k, rng):
    """A draw from the piecewise-uniform density: uniform within each token's bin."""
    return -self.bound + (k + jax.random.uniform(rng, k.shape)) * self.width


def data_space_units(spec) -> Units:
  """For a density on vectors: data space is model space times the per-feature scale."""
  return Units(spec, float(np.sum(np.log(np.broadcast_to(spec.scale, spec.shape)))))
