"""PixelCNN (van den Oord et al. 2016): masked convolutions, gated blocks, a softmax per
pixel channel over its levels.

    logits_BxSxV = net(tokens_BxS)     # S = H*W*C in raster order (row, column, channel)

Output s sees only inputs before s in that order: the first convolution is masked type A
(the centre pixel's own channel and later channels hidden), every later one type B (the
centre's earlier and own channels visible: the features there already exclude the
pixel's value). With C > 1 channels the features are split into C groups, group c
carrying what channel c may see (sec. 3.4).

Blocks are gated residual blocks, h + conv1x1(tanh(a) * sigmoid(b)) with (a, b) from a
masked k x k convolution (the gated activation of "Conditional Image Generation with
PixelCNN Decoders", eq. 2). Shapes: B batch, H W C image, M features, V levels.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaler.config import one_of, param, positive
from scaler.errors import UserError
from scaler.nn import layers
from scaler.nn.layers import Precision
from scaler.nn.tokens import sample_logits


@dataclasses.dataclass(frozen=True)
class PixelCNNConfig:
  features: int = param(64, positive)    # M, a multiple of the image's channels
  blocks: int = param(4, positive)       # gated residual blocks
  kernel: int = param(3, positive)       # side of the blocks' type-B convolutions (odd)
  first_kernel: int = param(7, positive)  # side of the first, type-A, convolution (odd)
  remat: str = param("none", one_of(*layers.REMAT))


@functools.lru_cache(maxsize=64)
def conv_mask(k: int, groups_in: tuple, groups_out: tuple, kind: str) -> np.ndarray:
  """(k, k, Cin, Cout): 1 above the centre row and left of the centre; at the centre,
  input group g feeds output group g' when g < g' (type A) or g <= g' (type B)."""
  c = k // 2
  gi, go = np.asarray(groups_in)[:, None], np.asarray(groups_out)[None, :]
  mask = np.zeros((k, k, len(groups_in), len(groups_out)), np.float32)
  mask[:c] = 1.0
  mask[c, :c] = 1.0
  mask[c, c] = (gi < go) if kind == "A" else (gi <= go)
  return mask


def _groups(n: int, channels: int, repeat: int = 1) -> tuple:
  """The colour group of each of n features: `channels` contiguous groups (tiled
  `repeat` times, for a gated layer's two halves)."""
  per = n // repeat
  return tuple(int(g) for g in np.tile(np.arange(per) * channels // per, repeat))


class MaskedConv(nnx.Module):
  def __init__(self, c_in, c_out, k, groups_in, groups_out, kind, *, precision: Precision,
               rngs, in_role="conv_in", out_role="conv_out", **kw):
    self.conv = layers.conv(c_in, c_out, (k, k), in_role=in_role, out_role=out_role,
                            precision=precision, rngs=rngs, **kw)
    self.k, self.groups_in, self.groups_out, self.kind = k, groups_in, groups_out, kind

  def __call__(self, x):
    mask = conv_mask(self.k, self.groups_in, self.groups_out, self.kind)
    kernel = self.conv.kernel[...] * jnp.asarray(mask, self.conv.kernel.dtype)
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.conv.bias[...].astype(y.dtype)


class GatedBlock(nnx.Module):
  def __init__(self, m, k, channels, *, precision: Precision, rngs):
    kw = dict(precision=precision, rngs=rngs)
    g = _groups(m, channels)
    self.gate = MaskedConv(m, 2 * m, k, g, _groups(2 * m, channels, 2), "B", **kw)
    self.proj = MaskedConv(m, m, 1, g, g, "B", **kw)

  def __call__(self, h):
    a, b = jnp.split(self.gate(h), 2, axis=-1)
    return h + self.proj(jnp.tanh(a) * jax.nn.sigmoid(b))


class PixelCNN(nnx.Module):
  """Tokens (B, H*W*C) of V levels -> logits (B, H*W*C, V)."""

  def __init__(self, cfg: PixelCNNConfig, token_shape, vocab: int, *, precision: Precision,
               rngs):
    if len(token_shape) != 3:
      raise UserError(f"model pixelcnn needs images (H, W, C); the data has shape "
                      f"{tuple(token_shape)}: use model transformer for vectors")
    h, w, c = token_shape
    if cfg.features % c:
      raise UserError(f"model.features={cfg.features} must be a multiple of the image's "
                      f"{c} channels (one group of features per channel)")
    for key in ("kernel", "first_kernel"):
      if getattr(cfg, key) % 2 == 0:
        raise UserError(f"model.{key}={getattr(cfg, key)} must be odd (a centre pixel)")
    self.cfg, self.shape, self.vocab, self.precision = cfg, (h, w, c), vocab, precision
    kw = dict(precision=precision, rngs=rngs)
    m, g = cfg.features, _groups(cfg.features, c)
    self.inp = MaskedConv(c, m, cfg.first_kernel, tuple(range(c)), g, "A", in_role=None, **kw)
    self.blocks = nnx.List([GatedBlock(m, cfg.kernel, c, **kw) for _ in range(cfg.blocks)])
    self.hidden = MaskedConv(m, m, 1, g, g, "B", **kw)
    out_groups = tuple(int(i) for i in np.repeat(np.arange(c), vocab))
    self.out = MaskedConv(m, c * vocab, 1, g, out_groups, "B", out_role=None, **kw)

  def __call__(self, tokens_BxS):
    b = tokens_BxS.shape[0]
    # The levels as values in [-1, 1]: nearby levels look alike to the first layer.
    x = tokens_BxS.reshape(b, *self.shape).astype(jnp.float32) * (2.0 / max(self.vocab - 1, 1)) - 1
    return self.logits(x)

  def logits(self, x_BxHxWxC):
    """Logits (B, S, V) of the levels given as values in [-1, 1]: differentiable in its
    input, so the tests can read the causal structure off the Jacobian."""
    b = x_BxHxWxC.shape[0]
    h = self.inp(self.precision.cast(x_BxHxWxC))
    call = layers.checkpointed(self.cfg.remat)
    for block in self.blocks:
      h = call(block, h)
    logits = self.out(jax.nn.relu(self.hidden(jax.nn.relu(h))))
    return self.precision.output(logits).reshape(b, -1, self.vocab)

  def sample(self, rng, num: int, temperature: float, top_k: int):
    """Tokens (num, S), one position at a time: S passes of the whole network."""
    seq = int(np.prod(self.shape))

    def one(s, tokens):
      logits = self(tokens)[:, s]
      return tokens.at[:, s].set(sample_logits(jax.random.fold_in(rng, s), logits,
                                               temperature, top_k))

    return jax.lax.fori_loop(0, seq, one, jnp.zeros((num, seq), jnp.int32))
