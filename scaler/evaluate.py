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
from scaler import partitioning
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
    # Under the run's rules, as the train step: see partitioning.constrain.
    with partitioning.activation_rules(exp.mesh, exp.rules):
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


# --- `scaler eval`: likelihood and sample quality of a run, against the held-out floor ---

# The names an `evaluate` hook gives a likelihood, or a bound on one: -log p per example
# in nats where the data lives, bits per dimension, the ELBO.
LIKELIHOOD = ("nll", "bpd", "elbo")
EVAL_FILE = "eval.json"
CHUNK = 1024   # samples drawn per call


def metric_names(exp) -> tuple[str, ...]:
  """The names the family's `evaluate` returns, from its abstract evaluation (no compile)."""
  if exp.family.evaluate is None:
    return ()
  from scaler import experiment as experiment_lib
  abstract = experiment_lib.abstract_state(exp)
  batch = {"x": jax.ShapeDtypeStruct((2, *exp.spec.shape), jnp.float32)}
  if exp.spec.num_classes:
    batch["label"] = jax.ShapeDtypeStruct((2,), jnp.int32)

  def values(params, rest, extra, batch):
    nets = state_lib.merge(exp.networks, params, rest)
    return exp.family.evaluate(nets, extra, batch, jax.random.key(0))

  return tuple(jax.eval_shape(values, abstract.params, abstract.rest, abstract.extra, batch))


def quality_scores(digits: bool, samples, reference) -> dict:
  """Sample-quality metrics of `samples` against `reference`, both in data space: for
  the digits, the Frechet distance in scaler/quality.py's classifier's features, its
  confidence and the entropy of its classes; else sliced Wasserstein-1 and MMD^2
  (images flattened)."""
  from scaler import quality
  if digits:
    return quality.digits_scores(samples, reference)
  return {"sliced_wasserstein": quality.sliced_wasserstein(samples, reference),
          "mmd": quality.mmd(samples, reference)}


def draw(exp, state, num: int, on_chunk=None) -> np.ndarray:
  """`num` samples in data space, drawn CHUNK at a time on every process."""
  from scaler.sampling import draw_samples
  out = []
  for i, start in enumerate(range(0, num, CHUNK)):
    n = min(CHUNK, num - start)
    out.append(exp.spec.denormalize(draw_samples(exp, state, n, seed=0, chunk=i)))
    if on_chunk is not None:
      on_chunk(n)
  return np.concatenate(out)


def report(exp, state, source, *, num: int, likelihood: bool = True, quality: bool = True,
           progress: bool = True) -> dict:
  """Held-out metrics of a trained state over the first `num` examples of `source`:
  the family's `evaluate` means and the sample quality, each quality metric beside the
  same metric for held-out data against itself (the floor).

  The first half of the examples is compared with the second half (the floor); `num // 2`
  samples are compared with the same second half, so both have the same sample size.
  Every process must call this (the computations are collectives); the quality metrics
  are computed on the host of process 0, None on the others.
  """
  from tqdm import tqdm
  n = min(num, len(source))
  out = {"examples": n}
  show = progress and jax.process_index() == 0
  if likelihood:
    batches = -(-n // exp.cfg.train.batch_size)
    with tqdm(total=batches, desc="eval", unit="batch", disable=not show) as bar:
      out["metrics"] = evaluate(exp, state, source, limit=n,
                                on_batch=lambda done, total: bar.update(1))
  if quality:
    half = n // 2
    if half < 2:
      raise ValueError(f"sample quality needs at least 4 held-out examples; got {n}")
    with tqdm(total=half, desc="sample", unit="sample", disable=not show) as bar:
      samples = draw(exp, state, half, on_chunk=bar.update)
    if jax.process_index() == 0:
      held_out = source.read(np.arange(n)).x.astype(np.float64)
      a, b = held_out[:half], held_out[half:2 * half]
      digits = exp.cfg.data.name == "digits"
      model, floor = quality_scores(digits, samples, b), quality_scores(digits, a, b)
      out["quality"] = {k: {"samples": model[k], "held_out": floor[k]} for k in model}
      out["quality_sample_size"] = half
    else:
      out["quality"] = None
  return out
