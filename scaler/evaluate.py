"""Held-out evaluation: a family's `evaluate` averaged over a split, on the run's mesh.

    metrics = evaluate(exp, state, load_source(cfg.data, "test"))   # {"mse": 0.41, ...}

The split is read in global batches of `train.batch_size`, in order, each process
loading only its rows; the last batch is padded with copies of the first example and
masked out, so every example counts once. The computation is one jitted function over
global arrays, so a model sharded over many processes evaluates as it trains.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from scaler import mesh as mesh_lib
from scaler import rng as rng_lib
from scaler import state as state_lib
from scaler.data import to_global
from scaler.sampling import sample_params


def _batches(source, batch_size: int, rows, limit: int | None):
  """(this process's rows of each global batch, their mask), in order over the split."""
  n = len(source) if limit is None else min(limit, len(source))
  lo, hi = rows
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    mask = idx < n
    idx = np.where(mask, idx, 0)[lo:hi]
    yield source.rows(idx), mask[lo:hi].astype(np.float32)


def evaluate(exp, state: state_lib.TrainState, source, *, limit: int | None = None,
             on_batch=None) -> dict:
  """Means of the family's per-example metrics over `source` (the first `limit` rows).

  Every process must call this. `on_batch(done, total)` reports progress.
  """
  if exp.family.evaluate is None:
    return {}
  batch_sharding = mesh_lib.batch_sharding(exp.mesh)
  rows = mesh_lib.process_rows(exp.mesh, exp.cfg.train.batch_size)

  # Replicated sums: every process can read them without a gather.
  @functools.partial(jax.jit, out_shardings=mesh_lib.replicated(exp.mesh))
  def sums(params, rest, extra, batch, mask, index):
    # Each batch draws its own noise from the eval stream; made inside, as for sampling.
    rng = jax.random.fold_in(rng_lib.stream(exp.cfg.train.seed, "eval"), index)
    nets = state_lib.merge(exp.networks, params, rest)
    values = exp.family.evaluate(nets, extra, batch, rng)
    return {k: jnp.sum(v.astype(jnp.float32) * mask) for k, v in values.items()}

  params = sample_params(state)
  total = {}
  n = len(source) if limit is None else min(limit, len(source))
  num_batches = -(-n // exp.cfg.train.batch_size)
  for i, (batch, mask) in enumerate(_batches(source, exp.cfg.train.batch_size, rows, limit)):
    glob = to_global({**batch, "mask": mask}, batch_sharding, exp.cfg.train.batch_size)
    mask = glob.pop("mask")
    for k, v in sums(params, state.rest, state.extra, glob, mask, i).items():
      total[k] = total.get(k, 0.0) + float(v)
    if on_batch is not None:
      on_batch(i + 1, num_batches)
  return {k: v / n for k, v in total.items()}
