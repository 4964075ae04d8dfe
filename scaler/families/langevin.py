"""Langevin dynamics and the replay buffer's draw and write, as pure functions for jit.

The chain (unadjusted Langevin, Welling & Teh 2011; with a temperature `noise_scale`
as in Du & Mordatch 2019):

    x <- clip(x - (h/2) clip_i(grad_x E(x)) + sqrt(h) * noise_scale * z, -bound, bound)

with the gradient's norm clipped per example (clip_i) and z ~ N(0, I). With
noise_scale = 1 its stationary law is exp(-E(x)); noise_scale s samples exp(-E(x)/s^2).

The buffer (N rows) and the batch of chains (B rows) are both split over the batch axes
of the mesh, in contiguous slices. The draw pairs them in G = gcd(N, B) blocks: block g
is buffer rows [g N/G, (g+1) N/G) and batch rows [g B/G, (g+1) B/G), and each batch row
starts from a row of its own block, distinct within the block. G depends on N and B
only, so the draw is the same on any mesh (the 1-vs-8-device equivalence). Every mesh
the run accepts splits N and B over the same S devices, so S divides G and each device
holds whole blocks of both: the draw and the write-back read and write only the
device's own slice, with no collective (tests/test_ebm.py checks the compiled HLO).
"""

import math

import jax
import jax.numpy as jnp


def _per_example_norm(g_BxS):
  return jnp.sqrt(jnp.sum(jnp.square(g_BxS).reshape(g_BxS.shape[0], -1), axis=1))


def langevin(energy, x_BxS, rng, *, steps: int, step_size: float, noise_scale: float,
             grad_clip: float | None, bound: float | None):
  """`steps` Langevin steps from x_BxS on `energy` (x_BxS -> E_B); returns the end points
  and the mean per-example gradient norm over the chain (before clipping)."""
  grad_fn = jax.grad(lambda x: jnp.sum(energy(x)))
  expand = lambda v_B: v_B.reshape((-1,) + (1,) * (x_BxS.ndim - 1))

  def step(i, carry):
    x, norm_sum_B = carry
    g = grad_fn(x)
    norm_B = _per_example_norm(g)
    if grad_clip is not None:
      g = g * expand(jnp.minimum(1.0, grad_clip / (norm_B + 1e-12)))
    # The noise of step i is keyed by i: the same numbers on any mesh.
    z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    x = x - 0.5 * step_size * g + math.sqrt(step_size) * noise_scale * z
    if bound is not None:
      x = jnp.clip(x, -bound, bound)
    # Summed per example, averaged once at the end: a mean per step would put a
    # cross-device reduction inside the loop.
    return x, norm_sum_B + norm_B

  zeros_B = jnp.zeros(x_BxS.shape[:1], jnp.float32)
  x, norm_sum_B = jax.lax.fori_loop(0, steps, step, (x_BxS, zeros_B))
  return x, jnp.mean(norm_sum_B) / steps


def blocks(buffer_rows: int, batch_rows: int) -> int:
  """G: how many blocks pair the buffer's rows with the batch's (see the docstring)."""
  return math.gcd(buffer_rows, batch_rows)


def draw(buffer_NxS, batch_rows: int, rng):
  """Starting points for `batch_rows` chains: K = B/G distinct rows of each of the G
  blocks of the buffer (uniformly, without replacement). Returns (x_BxS, slots_GxK)."""
  n, shape = buffer_NxS.shape[0], buffer_NxS.shape[1:]
  g = blocks(n, batch_rows)
  m, k = n // g, batch_rows // g
  # K distinct slots per block: the first K of a random permutation of its M rows. (A
  # sort, not lax.top_k: XLA gathers top_k's operand to one device; sort splits by rows.)
  slots_GxK = jnp.argsort(jax.random.uniform(rng, (g, m)), axis=1)[:, :k]
  x_GxKxS = jax.vmap(lambda block, s: block[s])(buffer_NxS.reshape(g, m, *shape), slots_GxK)
  return x_GxKxS.reshape(batch_rows, *shape), slots_GxK


def write(buffer_NxS, slots_GxK, x_BxS):
  """The buffer with block g's rows `slots_GxK[g]` replaced by block g's chain ends."""
  n, shape = buffer_NxS.shape[0], buffer_NxS.shape[1:]
  g, k = slots_GxK.shape
  new = jax.vmap(lambda block, s, x: block.at[s].set(x))(
      buffer_NxS.reshape(g, n // g, *shape), slots_GxK, x_BxS.reshape(g, k, *shape))
  return new.reshape(n, *shape)
