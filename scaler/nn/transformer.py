"""A decoder-only transformer over discrete tokens, with KV-cache sampling.

    logits_BxSxV = net(tokens_BxS)    # logit s: the token at s given the tokens before s

The input is the sequence shifted right by one, a BOS token first, so output s never
sees token s; causal self-attention keeps s from seeing anything after it. Pre-norm
blocks (GPT-2), GELU MLP, learned or rotary (Su et al. 2021) positions.

Sampling (`sample`) decodes one position per step inside `lax.scan`: each layer's keys
and values live in a cache preallocated for the whole sequence, written in place at the
step's position (`dynamic_update_slice`), and sharded like the attention heads
(`partitioning.constrain`). `sample_uncached` re-runs the whole sequence at every step:
the reference the cache is tested and benchmarked against.

Shapes: B batch, S sequence, E width (`embed`), A heads (`heads`), K = E / A (`kv`),
M MLP width (`mlp`), V vocabulary (`vocab`, padded to a multiple of VOCAB_MULTIPLE so
that fsdp and tensor splits divide it; the padding's logits are NEG).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from scaler import partitioning
from scaler.config import one_of, param, positive
from scaler.errors import UserError
from scaler.nn import layers
from scaler.nn.layers import Precision
from scaler.nn.tokens import sample_logits

VOCAB_MULTIPLE = 64
NEG = -1e9     # the logit of a padding entry: probability 0, and no inf to make NaNs of
CACHE_ROLES = ("batch", None, "heads", "kv")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  width: int = param(128, positive)      # E
  depth: int = param(4, positive)        # blocks
  heads: int = param(4, positive)        # A; K = width / heads
  mlp_ratio: int = param(4, positive)    # M = mlp_ratio * E
  positions: str = param("learned", one_of("learned", "rotary"))
  remat: str = param("none", one_of(*layers.REMAT))


def _padded(n: int) -> int:
  return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def rotary(x_BxTxAxK, pos_T):
  """Rotary position embedding: feature pairs (i, i + K/2) rotated by pos * 10000^(-2i/K)."""
  half = x_BxTxAxK.shape[-1] // 2
  freqs = 10_000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_TxH = pos_T.astype(jnp.float32)[:, None] * freqs[None]
  cos, sin = jnp.cos(angles_TxH)[:, None], jnp.sin(angles_TxH)[:, None]   # (T, 1, K/2)
  x1, x2 = x_BxTxAxK[..., :half].astype(jnp.float32), x_BxTxAxK[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxAxK.dtype)


class Attention(nnx.Module):
  """Causal self-attention; kernels (E, 3, A, K) and (A, K, E)."""

  def __init__(self, width, heads, rope: bool, *, precision: Precision, rngs):
    kw = dict(precision=precision, rngs=rngs)
    self.qkv = layers.dense_general(width, (3, heads, width // heads), ("embed",),
                                    (None, "heads", "kv"), **kw)
    self.out = layers.dense_general((heads, width // heads), width, ("heads", "kv"),
                                    ("embed",), axis=(-2, -1), **kw)
    self.rope = rope

  def _qkv(self, x_BxTxE, pos_T):
    qkv = self.qkv(x_BxTxE)
    q, k, v = (qkv[:, :, i] for i in range(3))
    if self.rope:
      q, k = rotary(q, pos_T), rotary(k, pos_T)
    return q, k, v

  def __call__(self, x_BxSxE):
    q, k, v = self._qkv(x_BxSxE, jnp.arange(x_BxSxE.shape[1]))
    return self.out(jax.nn.dot_product_attention(q, k, v, is_causal=True))

  def decode(self, x_Bx1xE, pos, cache):
    """One position: its keys and values written into the cache at `pos`, its query
    attending to positions <= pos."""
    q, k, v = self._qkv(x_Bx1xE, pos[None])
    k_cache, v_cache = cache
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, pos, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, pos, 0, 0))
    mask = (jnp.arange(k_cache.shape[1]) <= pos)[None, None, None, :]
    o = jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask)
    return self.out(o), (k_cache, v_cache)


class Block(nnx.Module):
  """x + attn(norm(x)); x + fc2(gelu(fc1(norm(x))))."""

  def __init__(self, width, heads, mlp_width, rope, *, precision: Precision, rngs):
    kw = dict(precision=precision, rngs=rngs)
    self.norm1 = layers.layer_norm(width, **kw)
    self.attn = Attention(width, heads, rope, **kw)
    self.norm2 = layers.layer_norm(width, **kw)
    self.fc1 = layers.dense(width, mlp_width, "embed", "mlp", **kw)
    self.fc2 = layers.dense(mlp_width, width, "mlp", "embed", **kw)

  def _mlp(self, x):
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))

  def __call__(self, x_BxSxE):
    return self._mlp(x_BxSxE + self.attn(self.norm1(x_BxSxE)))

  def decode(self, x_Bx1xE, pos, cache):
    h, cache = self.attn.decode(self.norm1(x_Bx1xE), pos, cache)
    return self._mlp(x_Bx1xE + h), cache


class Transformer(nnx.Module):
  """Tokens (B, S) of V values -> logits (B, S, V padded)."""

  def __init__(self, cfg: TransformerConfig, token_shape, vocab: int, *,
               precision: Precision, rngs):
    if cfg.width % cfg.heads or (cfg.positions == "rotary" and (cfg.width // cfg.heads) % 2):
      raise UserError(f"model.heads={cfg.heads} must divide model.width={cfg.width}"
                      + (" into an even head width (rotary positions rotate pairs)"
                         if cfg.positions == "rotary" else ""))
    self.cfg, self.vocab, self.precision = cfg, vocab, precision
    self.seq = 1
    for n in token_shape:
      self.seq *= n
    self.bos = vocab   # one extra input token
    kw = dict(precision=precision, rngs=rngs)
    normal = nnx.initializers.normal(0.02)
    # The tables name `vocab` and leave the width to the activations: under the fsdp
    # preset `embed` and `vocab` both map to fsdp, and one parameter cannot use an axis
    # twice; the vocabulary is the dimension worth splitting (Megatron's vocab-parallel).
    self.tokens = layers.embed(_padded(vocab + 1), cfg.width, "vocab", None,
                               embedding_init=normal, **kw)
    self.pos = (nnx.Param(normal(rngs.params(), (self.seq, cfg.width), precision.params),
                          **layers.roles(None, "embed"))
                if cfg.positions == "learned" else None)
    rope = cfg.positions == "rotary"
    self.blocks = nnx.List([Block(cfg.width, cfg.heads, cfg.mlp_ratio * cfg.width, rope, **kw)
                            for _ in range(cfg.depth)])
    self.norm = layers.layer_norm(cfg.width, **kw)
    self.head = layers.dense(cfg.width, _padded(vocab), None, "vocab", use_bias=False,
                             kernel_init=normal, **kw)

  def _embed(self, tokens_BxT, pos_T):
    h = self.tokens(tokens_BxT)
    if self.pos is not None:
      h = h + self.precision.cast(self.pos[...][pos_T])[None]
    return h

  def _logits(self, h):
    logits = self.precision.output(self.head(self.norm(h)))
    return jnp.where(jnp.arange(logits.shape[-1]) < self.vocab, logits, NEG)

  def __call__(self, tokens_BxS):
    b, s = tokens_BxS.shape
    inp = jnp.concatenate([jnp.full((b, 1), self.bos, jnp.int32),
                           tokens_BxS[:, :-1].astype(jnp.int32)], axis=1)
    h = self._embed(inp, jnp.arange(s))
    call = layers.checkpointed(self.cfg.remat)
    for block in self.blocks:
      h = call(block, h)
    return self._logits(h)

  def init_cache(self, num: int):
    """Per block, zero keys and values (num, S, A, K), split like the heads."""
    heads = self.cfg.heads
    shape = (num, self.seq, heads, self.cfg.width // heads)
    zeros = lambda: partitioning.constrain(jnp.zeros(shape, self.precision.compute),
                                           CACHE_ROLES)
    return tuple((zeros(), zeros()) for _ in self.blocks)

  def decode(self, token_B, pos, cache):
    """The logits at `pos` given the token at pos - 1 (BOS at 0) and the cache of the
    positions before; the cache with `pos` written."""
    h = self._embed(token_B[:, None], pos[None])
    new = []
    for block, c in zip(self.blocks, cache):
      h, c = block.decode(h, pos, c)
      new.append(c)
    return self._logits(h)[:, 0], tuple(new)

  def sample(self, rng, num: int, temperature: float, top_k: int):
    """Tokens (num, S) through the KV cache: one position per scan step."""
    def step(carry, pos):
      token_B, cache = carry
      logits, cache = self.decode(token_B, pos, cache)
      new = sample_logits(jax.random.fold_in(rng, pos), logits, temperature, top_k)
      return (new, cache), new

    start = (jnp.full((num,), self.bos, jnp.int32), self.init_cache(num))
    _, tokens_SxB = jax.lax.scan(step, start, jnp.arange(self.seq))
    return tokens_SxB.T

  def sample_uncached(self, rng, num: int, temperature: float, top_k: int):
    """The same draw by re-running the whole sequence at every step (for tests and
    benchmarks): S full passes instead of S one-position passes."""
    def one(s, tokens):
      logits = self(tokens)[:, s]
      new = sample_logits(jax.random.fold_in(rng, s), logits, temperature, top_k)
      return tokens.at[:, s].set(new)

    return jax.lax.fori_loop(0, self.seq, one, jnp.zeros((num, self.seq), jnp.int32))


def flops_per_example(cfg: TransformerConfig, seq: int, vocab: int) -> float:
  """Forward-pass matmul FLOPs of one sequence (2 x multiply-adds): projections, MLP,
  attention scores and values (causal: half of them), the output head."""
  e, m = cfg.width, cfg.mlp_ratio * cfg.width
  per_block = seq * (4 * e * e + 2 * e * m) + seq * seq * e   # qkv+out, mlp, causal attn
  return 2.0 * (cfg.depth * per_block + seq * e * _padded(vocab))
