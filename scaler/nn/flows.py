"""The invertible layers of normalizing flows: couplings, ActNorm, 1x1 convolutions, MADE.

Every layer has `forward(x) -> (y, logdet_B)`, with logdet_B = log |det dy/dx| per example,
and `inverse(y) -> x`. The networks inside the couplings and MADE run in the compute
dtype through the `layers` helpers; the flow's own arithmetic (scales, log-determinants,
the inverse of a 1x1 convolution) stays in float32, since a log-determinant summed over
every dimension loses its digits in bfloat16.

Shapes: B batch, D data dimensions (vectors), H W C image, M hidden width.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaler.nn import layers
from scaler.nn.layers import Precision

_zeros = nnx.initializers.zeros_init()


class Fixed(nnx.Variable):
  """A constant drawn at init and never trained (a 1x1 convolution's permutation):
  carried as non-parameter state, replicated, and saved with the parameters."""


def soft_clamp(s, bound: float):
  """bound * tanh(s / bound): the identity near 0, never past +-bound, so exp(s) cannot
  overflow early in training (RealNVP's tanh-scaled s, with a bound one can set)."""
  return bound * jnp.tanh(s / bound)


def squeeze(x_BxHxWxC, f: int = 2):
  """(B, H, W, C) -> (B, H/f, W/f, C f^2): each f x f patch becomes channels."""
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // f, w // f, f * f * c)


def unsqueeze(x_BxHxWxC, f: int = 2):
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h, w, f, f, c // (f * f)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * f, w * f, c // (f * f))


def _sum_per_example(x):
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


# --- conditioning networks -----------------------------------------------------------


class MLPNet(nnx.Module):
  """A coupling's network for vectors: D_in -> M -> ... -> D_out, the last layer zero, so
  the coupling starts as the identity. Kernels alternate (embed, mlp), (mlp, embed)."""

  def __init__(self, d_in, d_out, hidden, depth, *, precision: Precision, rngs):
    kw = dict(precision=precision, rngs=rngs)
    self.precision = precision
    roles = ["embed", "mlp"]
    self.inp = layers.dense(d_in, hidden, None, "embed", **kw)
    self.hidden = nnx.List([layers.dense(hidden, hidden, roles[i % 2], roles[(i + 1) % 2], **kw)
                            for i in range(depth - 1)])
    self.out = layers.dense(hidden, d_out, roles[(depth - 1) % 2], None, kernel_init=_zeros,
                            **kw)

  def __call__(self, x_BxD):
    h = jax.nn.relu(self.inp(self.precision.cast(x_BxD)))
    for layer in self.hidden:
      h = jax.nn.relu(layer(h))
    return self.precision.output(self.out(h))


class ConvNet(nnx.Module):
  """A coupling's network for images: 3x3 conv, (depth - 1) 1x1 convs, a zero 3x3 conv
  (Glow's NN(), sec. 3.3), so the coupling starts as the identity."""

  def __init__(self, c_in, c_out, hidden, depth, *, precision: Precision, rngs):
    kw = dict(precision=precision, rngs=rngs)
    self.precision = precision
    self.inp = layers.conv(c_in, hidden, (3, 3), in_role=None, **kw)
    self.hidden = nnx.List([layers.conv(hidden, hidden, (1, 1), **kw) for _ in range(depth - 1)])
    self.out = layers.conv(hidden, c_out, (3, 3), out_role=None, kernel_init=_zeros, **kw)

  def __call__(self, x_BxHxWxC):
    h = jax.nn.relu(self.inp(self.precision.cast(x_BxHxWxC)))
    for layer in self.hidden:
      h = jax.nn.relu(layer(h))
    return self.precision.output(self.out(h))


# --- couplings -------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def coupling_mask(shape: tuple, kind: str, parity: int) -> np.ndarray:
  """The fixed binary mask b of a coupling (1: passed through and conditioned on).

  `halves` (vectors, shape (D,)): the first floor(D/2) dimensions, or the rest when
  `parity` is 1. `checkerboard` (images, shape (H, W, C)): pixels with (i + j) % 2 ==
  parity, every channel (RealNVP fig. 3).
  """
  if kind == "halves":
    (d,) = shape
    b = (np.arange(d) < d // 2).astype(np.float32)
    return 1.0 - b if parity else b
  h, w, c = shape
  grid = (np.add.outer(np.arange(h), np.arange(w)) % 2 == parity).astype(np.float32)
  return np.broadcast_to(grid[:, :, None], (h, w, c)).copy()


class MaskedCoupling(nnx.Module):
  """RealNVP's affine coupling with a fixed mask b (Dinh et al. 2017, eq. 9):

      y = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x)),   log det = sum (1 - b) s

  with s soft-clamped. `net` maps a masked input to 2x its channels (s, t).
  """

  def __init__(self, net, shape, kind: str, parity: int, clamp: float):
    self.net, self.shape, self.kind, self.parity, self.clamp = net, tuple(shape), kind, parity, clamp

  def _st(self, masked, b):
    s, t = jnp.split(self.net(masked), 2, axis=-1)
    return soft_clamp(s, self.clamp) * (1 - b), t * (1 - b)

  def forward(self, x):
    b = jnp.asarray(coupling_mask(self.shape, self.kind, self.parity))
    s, t = self._st(x * b, b)
    return b * x + (1 - b) * (x * jnp.exp(s) + t), _sum_per_example(s)

  def inverse(self, y):
    b = jnp.asarray(coupling_mask(self.shape, self.kind, self.parity))
    s, t = self._st(y * b, b)
    return b * y + (1 - b) * ((y - t) * jnp.exp(-s))


class ChannelCoupling(nnx.Module):
  """Glow's affine coupling over channels (sec. 3.3): x = (x_a, x_b), (s, t) = NN(x_a),
  y_b = x_b * exp(s) + t; `flip` conditions on the second half instead."""

  def __init__(self, channels: int, hidden: int, depth: int, clamp: float, flip: bool, *,
               precision: Precision, rngs):
    self.ca = channels // 2 if not flip else channels - channels // 2
    self.cb = channels - self.ca
    self.flip, self.clamp = flip, clamp
    self.net = ConvNet(self.ca, 2 * self.cb, hidden, depth, precision=precision, rngs=rngs)

  def _halves(self, x):
    if self.flip:
      return x[..., self.cb:], x[..., :self.cb]
    return x[..., :self.ca], x[..., self.ca:]

  def _join(self, a, b):
    return jnp.concatenate([b, a] if self.flip else [a, b], axis=-1)

  def forward(self, x):
    xa, xb = self._halves(x)
    s, t = jnp.split(self.net(xa), 2, axis=-1)
    s = soft_clamp(s, self.clamp)
    return self._join(xa, xb * jnp.exp(s) + t), _sum_per_example(s)

  def inverse(self, y):
    ya, yb = self._halves(y)
    s, t = jnp.split(self.net(ya), 2, axis=-1)
    return self._join(ya, (yb - t) * jnp.exp(-soft_clamp(s, self.clamp)))


# --- Glow's ActNorm and invertible 1x1 convolution ---------------------------------------


class ActNorm(nnx.Module):
  """y = (x + bias) * exp(log_scale), per channel (Glow sec. 3.1).

  Data-dependent init: `forward(x, init=True)` first sets bias and scale so that this
  batch's output has zero mean and unit variance per channel; the family runs it once,
  on the first global batch (scaler's `data_init` hook), and the result is saved.
  """

  def __init__(self, channels: int, *, precision: Precision):
    zeros = jnp.zeros((channels,), precision.params)
    self.bias = nnx.Param(zeros, **layers.roles(None))
    self.log_scale = nnx.Param(zeros, **layers.roles(None))

  def forward(self, x, init: bool = False):
    if init:
      axes = tuple(range(x.ndim - 1))
      # Statistics of the whole global batch: a mean over a sharded axis is one
      # all-reduce, so every mesh computes the same numbers.
      self.bias[...] = -jnp.mean(x, axis=axes)
      self.log_scale[...] = -jnp.log(jnp.std(x, axis=axes) + 1e-6)
    log_scale = self.log_scale[...]
    pixels = math.prod(x.shape[1:-1])
    logdet = pixels * jnp.sum(log_scale) * jnp.ones(x.shape[:1])
    return (x + self.bias[...]) * jnp.exp(log_scale), logdet

  def inverse(self, y):
    return y * jnp.exp(-self.log_scale[...]) - self.bias[...]


class InvConv1x1(nnx.Module):
  """An invertible 1x1 convolution, W = P L (U + diag(sign * exp(log_s))) (Glow sec. 3.2,
  LU-decomposed): log |det W| = sum log_s costs O(C), not O(C^3).

  W starts as a random rotation; P and the signs stay fixed, L, U and log_s train.
  """

  def __init__(self, channels: int, *, precision: Precision, rngs):
    w = jnp.linalg.qr(jax.random.normal(rngs.params(), (channels, channels)))[0]
    p, lower, upper = jax.scipy.linalg.lu(w)
    diag = jnp.diag(upper)
    dt, r = precision.params, layers.roles(None, None)
    self.perm = Fixed(p.astype(dt), **r)
    self.sign = Fixed(jnp.sign(diag).astype(dt), **layers.roles(None))
    self.lower = nnx.Param(jnp.tril(lower, -1).astype(dt), **r)
    self.upper = nnx.Param(jnp.triu(upper, 1).astype(dt), **r)
    self.log_s = nnx.Param(jnp.log(jnp.abs(diag)).astype(dt), **layers.roles(None))

  def weight(self):
    c = self.log_s.shape[0]
    lower = jnp.tril(self.lower[...], -1) + jnp.eye(c)
    upper = jnp.triu(self.upper[...], 1) + jnp.diag(self.sign[...] * jnp.exp(self.log_s[...]))
    return self.perm[...] @ lower @ upper

  def forward(self, x):
    y = jnp.einsum("...i,oi->...o", x, self.weight())
    pixels = math.prod(x.shape[1:-1])
    return y, pixels * jnp.sum(self.log_s[...]) * jnp.ones(x.shape[:1])

  def inverse(self, y):
    return jnp.einsum("...i,oi->...o", y, jnp.linalg.inv(self.weight()))


# --- MADE and the MAF block ------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def made_masks(order: tuple, hidden: int, depth: int) -> tuple:
  """MADE's masks (Germain et al. 2015, eq. 12-13) for the autoregressive `order`
  (order[i]: the place of dimension i, 0-based): hidden unit k has degree
  k mod (D - 1) + 1, an input of degree d feeds units of degree >= d, and output d sees
  only units of degree < its own, so output d depends on inputs earlier in the order."""
  d = len(order)
  deg_in = np.asarray(order) + 1
  deg_h = np.arange(hidden) % max(d - 1, 1) + 1
  masks = [(deg_h[None, :] >= deg_in[:, None])]
  masks += [(deg_h[None, :] >= deg_h[:, None])] * (depth - 1)
  out = deg_in[None, :] > deg_h[:, None]
  masks.append(np.concatenate([out, out], axis=1))   # (mu, alpha) for every dimension
  return tuple(m.astype(np.float32) for m in masks)


class MADE(nnx.Module):
  """x_BxD -> (mu_BxD, alpha_BxD), output i a function of the inputs before i in `order`."""

  def __init__(self, d: int, hidden: int, depth: int, order: tuple, *, precision: Precision,
               rngs):
    kw = dict(precision=precision, rngs=rngs)
    self.order, self.hidden_width, self.depth, self.precision = tuple(order), hidden, depth, precision
    roles = ["embed", "mlp"]
    self.inp = layers.dense(d, hidden, None, "embed", **kw)
    self.hidden = nnx.List([layers.dense(hidden, hidden, roles[i % 2], roles[(i + 1) % 2], **kw)
                            for i in range(depth - 1)])
    self.out = layers.dense(hidden, 2 * d, roles[(depth - 1) % 2], None, kernel_init=_zeros,
                            **kw)

  def _masked(self, linear, h, mask):
    # The kernel times its fixed mask, then the layer's own matmul and bias.
    cast = self.precision.cast
    kernel = linear.kernel[...] * jnp.asarray(mask, linear.kernel.dtype)
    return cast(h) @ cast(kernel) + cast(linear.bias[...])

  def __call__(self, x_BxD):
    masks = made_masks(self.order, self.hidden_width, self.depth)
    h = jax.nn.relu(self._masked(self.inp, x_BxD, masks[0]))
    for layer, mask in zip(self.hidden, masks[1:-1]):
      h = jax.nn.relu(self._masked(layer, h, mask))
    mu, alpha = jnp.split(self.precision.output(self._masked(self.out, h, masks[-1])), 2, -1)
    return mu, alpha


class MAFBlock(nnx.Module):
  """One MAF layer (Papamakarios et al. 2017, eq. 2-4): u = (x - mu(x)) exp(-alpha(x)).

  Density in one pass of MADE; the inverse, x_i = u_i exp(alpha_i) + mu_i, is sequential:
  D passes, pass k fixing the dimension at place k of the order.
  """

  def __init__(self, d, hidden, depth, order, clamp, *, precision: Precision, rngs):
    self.made = MADE(d, hidden, depth, order, precision=precision, rngs=rngs)
    self.clamp, self.d = clamp, d

  def forward(self, x_BxD):
    mu, alpha = self.made(x_BxD)
    alpha = soft_clamp(alpha, self.clamp)
    return (x_BxD - mu) * jnp.exp(-alpha), -jnp.sum(alpha, axis=1)

  def inverse(self, u_BxD):
    def one_pass(_, x_BxD):
      mu, alpha = self.made(x_BxD)
      return u_BxD * jnp.exp(soft_clamp(alpha, self.clamp)) + mu
    return jax.lax.fori_loop(0, self.d, one_pass, jnp.zeros_like(u_BxD))
