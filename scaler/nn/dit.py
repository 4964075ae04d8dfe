"""DiT (Peebles & Xie 2023): a transformer on image patches, eps_BxHxWxC = net(x, t_B, y_B).

Patchify (a linear map of each P x P patch), add fixed 2D sin-cos or learned positions,
N blocks with adaLN-Zero conditioning on c = time embedding (+ label embedding), a final
adaptive LayerNorm, a linear map back to patch values, unpatchify. adaLN-Zero: each
block's shift, scale and gates are a linear function of c initialised to zero, so every
block starts as the identity and the untrained net predicts eps = 0 (first loss 1).

Shapes: B batch, H W C image, P patch side, N = (H/P)(W/P) tokens, D = P*P*C values per
patch, E width (`embed`), A heads (`heads`), K = E/A head width (`kv`), M MLP width
(`mlp`). Under `fsdp_tensor` the heads and the MLP hidden split over `tensor` (Megatron:
q/k/v and fc1 column-parallel, the output projection and fc2 row-parallel), and every
E dimension over `fsdp`.
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
from scaler.nn.mlp import timestep_embedding

# name -> (depth, width, heads): the paper's Table 1, and a tiny one for tests.
PRESETS = {
    "tiny": (2, 64, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
TIME_FEATURES = 256   # sinusoidal features of t, as in the paper


def _positive_or_none(x):
  return None if x is None or x > 0 else "must be positive (or null: the size's value)"


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  size: str = param("S", one_of(*PRESETS))          # depth, width, heads of a preset
  patch: int = param(2, positive)                   # patch side P; "DiT-B/2" is size B, patch 2
  depth: int | None = param(None, _positive_or_none)   # overrides the size's
  width: int | None = param(None, _positive_or_none)
  heads: int | None = param(None, _positive_or_none)
  mlp_ratio: int = param(4, positive)               # M = mlp_ratio * E
  pos: str = param("sincos", one_of("sincos", "learned"))   # positions: fixed 2D, or learned
  remat: str = param("none", one_of(*layers.REMAT))  # activation checkpointing per block

  @property
  def shape(self) -> tuple[int, int, int]:
    """(depth, width, heads): the preset's, with any set explicitly taking precedence."""
    depth, width, heads = PRESETS[self.size]
    return self.depth or depth, self.width or width, self.heads or heads


def check_shape(cfg: DiTConfig, data_shape) -> None:
  """UserErrors for settings this DiT cannot take, naming both sides."""
  if len(data_shape) != 3:
    raise UserError(f"model dit needs images (H, W, C); the data has shape {tuple(data_shape)}")
  h, w, _ = data_shape
  if h % cfg.patch or w % cfg.patch:
    raise UserError(f"model.patch={cfg.patch} does not divide the image side: the images are "
                    f"{h}x{w}; use a patch that divides both")
  _, width, heads = cfg.shape
  if width % heads:
    raise UserError(f"model.heads={heads} does not divide model.width={width} "
                    f"(size {cfg.size}); use a head count that divides the width")


@functools.lru_cache(maxsize=16)
def sincos_2d(rows: int, cols: int, dim: int) -> np.ndarray:
  """Fixed positions (rows*cols, dim): half the features encode the row, half the column
  (the paper's get_2d_sincos_pos_embed, MAE's code)."""
  def one_d(pos_L, d):
    omega = 1.0 / 10_000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
    args = pos_L[:, None] * omega[None]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)
  r, c = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64),
                     indexing="ij")
  half = dim // 2
  emb = np.concatenate([one_d(r.reshape(-1), half), one_d(c.reshape(-1), dim - half)], axis=1)
  return emb[:, :dim].astype(np.float32)


def patchify(x_BxHxWxC, p: int):
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x_BxNxD, p: int, h: int, w: int):
  b, _, d = x_BxNxD.shape
  c = d // (p * p)
  x = x_BxNxD.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def _modulate(x_BxNxE, shift_BxE, scale_BxE):
  return x_BxNxE * (1 + scale_BxE[:, None]) + shift_BxE[:, None]


_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


class Attention(nnx.Module):
  """Self-attention with a fused q/k/v projection; kernels (E, 3, A, K) and (A, K, E)."""

  def __init__(self, width, heads, *, precision: Precision, rngs):
    kw = dict(precision=precision, rngs=rngs, kernel_init=_xavier)
    self.qkv = layers.dense_general(width, (3, heads, width // heads), ("embed",),
                                    (None, "heads", "kv"), **kw)
    self.out = layers.dense_general((heads, width // heads), width, ("heads", "kv"),
                                    ("embed",), axis=(-2, -1), **kw)

  def __call__(self, x_BxNxE):
    qkv_BxNx3xAxK = self.qkv(x_BxNxE)
    q, k, v = (qkv_BxNx3xAxK[:, :, i] for i in range(3))
    return self.out(layers.attention(q, k, v))


class Block(nnx.Module):
  """x + g1 * attn(mod(norm(x), s1, c1)); x + g2 * mlp(mod(norm(x), s2, c2)); all from c."""

  def __init__(self, width, heads, mlp_width, *, precision: Precision, rngs):
    kw = dict(precision=precision, rngs=rngs)
    # No affine parameters: the adaptive shift and scale take their place.
    self.norm1 = layers.layer_norm(width, use_scale=False, use_bias=False, epsilon=1e-6, **kw)
    self.attn = Attention(width, heads, **kw)
    self.norm2 = layers.layer_norm(width, use_scale=False, use_bias=False, epsilon=1e-6, **kw)
    self.fc1 = layers.dense(width, mlp_width, "embed", "mlp", kernel_init=_xavier, **kw)
    self.fc2 = layers.dense(mlp_width, width, "mlp", "embed", kernel_init=_xavier, **kw)
    # Six (B, E) vectors from c in one matmul; zero init makes the block the identity.
    self.ada = layers.dense_general(width, (6, width), ("embed",), (None, None),
                                    kernel_init=_zeros, **kw)

  def __call__(self, x_BxNxE, c_BxE):
    mod_Bx6xE = self.ada(jax.nn.silu(c_BxE))
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod_Bx6xE[:, i] for i in range(6))
    h_BxNxE = self.attn(_modulate(self.norm1(x_BxNxE), shift1, scale1))
    x_BxNxE = x_BxNxE + gate1[:, None] * h_BxNxE
    h_BxNxM = jax.nn.gelu(self.fc1(_modulate(self.norm2(x_BxNxE), shift2, scale2)))
    return x_BxNxE + gate2[:, None] * self.fc2(h_BxNxM)


class DiT(nnx.Module):
  """Predicts the noise in an NHWC image x_t from (x_t, t) and, if conditional, a label.

  `num_classes` > 0 adds a label embedding of num_classes + 1 rows; the last row is the
  null label that classifier-free guidance trains and samples with.
  """

  def __init__(self, cfg: DiTConfig, data_shape: tuple[int, ...], *, num_classes: int = 0,
               precision: Precision, rngs: nnx.Rngs):
    check_shape(cfg, data_shape)
    self.cfg, self.data_shape, self.precision = cfg, tuple(data_shape), precision
    self.num_classes = num_classes
    depth, width, heads = cfg.shape
    h, w, c = data_shape
    p = cfg.patch
    kw = dict(precision=precision, rngs=rngs)
    # The patch values (P*P*C) are never sharded: they have no role.
    self.patch = layers.dense(p * p * c, width, None, "embed", kernel_init=_xavier, **kw)
    normal = nnx.initializers.normal(0.02)
    tokens = (h // p) * (w // p)
    self.pos = (nnx.Param(normal(rngs.params(), (tokens, width), precision.params),
                          **layers.roles(None, "embed"))
                if cfg.pos == "learned" else None)
    self.time1 = layers.dense(TIME_FEATURES, width, None, "embed", kernel_init=normal, **kw)
    self.time2 = layers.dense(width, width, "embed", None, kernel_init=normal, **kw)
    self.label = layers.label_embed(num_classes, width, "embed", **kw)
    self.blocks = nnx.List([Block(width, heads, cfg.mlp_ratio * width, **kw)
                            for _ in range(depth)])
    self.norm_out = layers.layer_norm(width, use_scale=False, use_bias=False, epsilon=1e-6,
                                      **kw)
    self.ada_out = layers.dense_general(width, (2, width), ("embed",), (None, None),
                                        kernel_init=_zeros, **kw)
    self.out = layers.dense(width, p * p * c, "embed", None, kernel_init=_zeros, **kw)

  def __call__(self, x_BxHxWxC, t_B, y_B=None):
    cast, p = self.precision.cast, self.cfg.patch
    b, h, w, _ = x_BxHxWxC.shape
    x_BxNxE = self.patch(patchify(cast(x_BxHxWxC), p))
    pos_NxE = sincos_2d(h // p, w // p, x_BxNxE.shape[-1]) if self.pos is None else self.pos[...]
    x_BxNxE = x_BxNxE + cast(jnp.asarray(pos_NxE))[None]
    temb = cast(timestep_embedding(t_B, TIME_FEATURES))
    c_BxE = self.time2(jax.nn.silu(self.time1(temb)))
    c_BxE = layers.add_label(self.label, c_BxE, y_B, self.num_classes)
    x_BxNxE = layers.chain(self.blocks, self.cfg.remat, x_BxNxE, c_BxE)
    shift_BxE, scale_BxE = (self.ada_out(jax.nn.silu(c_BxE))[:, i] for i in range(2))
    out_BxNxD = self.out(_modulate(self.norm_out(x_BxNxE), shift_BxE, scale_BxE))
    return self.precision.output(unpatchify(out_BxNxD, p, h, w))


def flops_per_example(cfg: DiTConfig, data_shape) -> float:
  """Model FLOPs of one forward pass of one example: 2 x multiply-adds of the matmuls
  (projections, attention scores and values); norms and elementwise work left out.
  A training step is 3x this per example (backward = 2x forward), whatever `remat`
  recomputes: the honest numerator of model FLOPs utilisation (PaLM appendix B)."""
  depth, width, _ = cfg.shape
  h, w, c = data_shape
  n = (h // cfg.patch) * (w // cfg.patch)
  d = cfg.patch ** 2 * c
  m = cfg.mlp_ratio * width
  per_block = (n * (3 * width * width + width * width + 2 * width * m)   # qkv, out, mlp
               + 2 * n * n * width                                        # scores, values
               + 6 * width * width)                                       # adaLN (per example)
  embed = n * d * width + TIME_FEATURES * width + width * width
  final = 2 * width * width + n * width * d
  return 2.0 * (depth * per_block + embed + final)
