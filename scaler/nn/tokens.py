"""Drawing one token per row from logits, with a temperature and top-k."""

import jax
import jax.numpy as jnp


def sample_logits(key, logits_BxV, temperature: float, top_k: int):
  """A draw from softmax(logits / temperature), restricted to the `top_k` most likely
  tokens (0: all of them). Returns int32 (B,)."""
  logits = logits_BxV.astype(jnp.float32) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_Bx1, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
