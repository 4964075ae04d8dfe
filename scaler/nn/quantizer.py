"""A VQ-VAE codebook updated by exponential moving averages, not by gradients.

van den Oord et al. 2017 (appendix A.1), Razavi et al. 2019: each code e_k follows the
mean of the encoder outputs assigned to it,

    N_k <- g N_k + (1 - g) n_k        m_k <- g m_k + (1 - g) sum_{j -> k} z_j
    e_k  = m_k / N~_k                 (N~: Laplace-smoothed counts)

and a code whose moving count N_k falls below `dead_below` is restarted at a random
encoder output of the current batch (Dhariwal et al. 2020, Jukebox). Everything here is
non-gradient module state (`Codebook` variables): the train step writes it back after
every update, checkpoints it, and shards the code dimension K by its role (`vocab`).

The quantizer also counts, per code position, how often each code is used on the
training batches (a moving average with the same decay): the independent per-position
prior that `sample` draws codes from until an autoregressive prior exists.

Shapes: N code vectors in the batch (B x positions), D code dimension, K codes, P
positions per example.
"""

import jax
import jax.numpy as jnp
from flax import nnx

EPS = 1e-5  # Laplace smoothing of the counts


class Codebook(nnx.Variable):
  """Non-gradient VQ state: codes, their moving counts and sums, the usage prior."""


def _state(value, *roles):
  v = Codebook(value)
  v.set_metadata(out_sharding=roles)   # sharded like a parameter of the same roles
  return v


class VectorQuantizer(nnx.Module):
  def __init__(self, num_codes: int, dim: int, positions: int, *, decay: float,
               dead_below: float, rngs: nnx.Rngs):
    self.decay, self.dead_below = decay, dead_below
    codes_KxD = jax.random.normal(rngs.params(), (num_codes, dim)) / jnp.sqrt(dim)
    self.codes = _state(codes_KxD, "vocab", None)
    self.count = _state(jnp.ones((num_codes,)), "vocab")
    self.sum = _state(codes_KxD, "vocab", None)
    self.prior = _state(jnp.full((positions, num_codes), 1.0 / num_codes), None, "vocab")

  def nearest(self, z_NxD):
    """Index of the nearest code of each row (squared Euclidean distance)."""
    e_KxD = self.codes[...]
    d_NxK = (jnp.sum(z_NxD ** 2, -1, keepdims=True) - 2 * z_NxD @ e_KxD.T
             + jnp.sum(e_KxD ** 2, -1)[None])
    return jnp.argmin(d_NxK, axis=-1)

  def lookup(self, idx):
    return self.codes[...][idx]

  def initialise(self, z_NxD, rng):
    """Codes at distinct random encoder outputs (a first batch's data-dependent init)."""
    pick_K = jax.random.permutation(rng, z_NxD.shape[0])[:self.codes.shape[0]]
    codes_KxD = z_NxD[pick_K]
    self.codes[...] = codes_KxD
    self.sum[...] = codes_KxD
    self.count[...] = jnp.ones_like(self.count[...])

  def update(self, z_BxPxD, idx_BxP, rng):
    """One EMA step of the codebook and the prior from a batch's assignments, then dead
    code restarts. Returns the number of codes restarted."""
    g, (num_codes, _) = self.decay, self.codes.shape
    z_NxD = jax.lax.stop_gradient(z_BxPxD).reshape(-1, z_BxPxD.shape[-1])
    onehot_NxK = jax.nn.one_hot(idx_BxP.reshape(-1), num_codes, dtype=z_NxD.dtype)
    count_K = g * self.count[...] + (1 - g) * jnp.sum(onehot_NxK, axis=0)
    sum_KxD = g * self.sum[...] + (1 - g) * onehot_NxK.T @ z_NxD
    total = jnp.sum(count_K)
    smoothed_K = (count_K + EPS) / (total + num_codes * EPS) * total
    codes_KxD = sum_KxD / smoothed_K[:, None]
    # Restart: a dead code moves to a random encoder output and starts its moving
    # statistics there with a count of one assignment (Jukebox replaces it every step
    # until something is assigned to it).
    dead_K = count_K < self.dead_below
    pick_K = jax.random.randint(rng, (num_codes,), 0, z_NxD.shape[0])
    fresh_KxD = z_NxD[pick_K]
    self.codes[...] = jnp.where(dead_K[:, None], fresh_KxD, codes_KxD)
    self.sum[...] = jnp.where(dead_K[:, None], fresh_KxD, sum_KxD)
    self.count[...] = jnp.where(dead_K, 1.0, count_K)
    freq_PxK = jnp.mean(jax.nn.one_hot(idx_BxP, num_codes, dtype=z_NxD.dtype), axis=0)
    self.prior[...] = g * self.prior[...] + (1 - g) * freq_PxK
    return jnp.sum(dead_K)

  def __call__(self, z_BxPxD, rng=None, update: bool = False):
    """(straight-through quantised z, code indices (B, P), commitment ||z - sg(e)||^2
    per example, the batch's code perplexity, codes restarted)."""
    b, p, d = z_BxPxD.shape
    idx_BxP = self.nearest(jax.lax.stop_gradient(z_BxPxD).reshape(-1, d)).reshape(b, p)
    e_BxPxD = jax.lax.stop_gradient(self.lookup(idx_BxP))
    commitment_B = jnp.sum(jnp.square(z_BxPxD - e_BxPxD), axis=(1, 2))
    # Straight-through: the decoder sees the code, the encoder gets its gradient.
    zq_BxPxD = z_BxPxD + jax.lax.stop_gradient(e_BxPxD - z_BxPxD)
    usage_K = jnp.mean(jax.nn.one_hot(idx_BxP.reshape(-1), self.codes.shape[0]), axis=0)
    perplexity = jnp.exp(-jnp.sum(usage_K * jnp.log(usage_K + 1e-10)))
    restarted = self.update(z_BxPxD, idx_BxP, rng) if update else jnp.zeros((), jnp.int32)
    return zq_BxPxD, idx_BxP, commitment_B, perplexity, restarted

  def sample_codes(self, rng, num: int):
    """(num, P) codes drawn independently per position from the counted frequencies."""
    logits_PxK = jnp.log(jnp.maximum(self.prior[...], 1e-12))
    return jax.random.categorical(rng, logits_PxK[None], shape=(num, logits_PxK.shape[0]))
