"""The driver, in named stages: mesh, data, state, restore, loop, samples.

The same function runs on one CPU, on N simulated devices (`--debug`) and on every host
of a pod; nothing here branches on which.
"""

import collections
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import scaler
from scaler import config as config_lib
from scaler import experiment as experiment_lib
from scaler import mesh as mesh_lib
from scaler import plots
from scaler import progress
from scaler import state as state_lib
from scaler.checkpoint import Checkpointer
from scaler.data import BatchLoader, fingerprint, load_source, to_global
from scaler.errors import UserError
from scaler.metrics import MetricsWriter
from scaler.step import make_train_step

log = logging.getLogger("scaler")


class NonFiniteError(UserError):
  """Training produced NaN or Inf; the message names the step and the first bad array.

  A UserError: the cause is in the config (a learning rate, a schedule, the data) and a
  restart would repeat it, so the CLI prints one line and the launcher does not retry.
  """


def first_non_finite(tree) -> str | None:
  """The path of the first array in `tree` holding NaN or Inf (host-side, for the error)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf))):
      return jax.tree_util.keystr(path)
  return None


def compile_step(exp, state_shardings, batch_sharding):
  """The jitted step: explicit shardings, the state's buffers donated."""
  step_fn = make_train_step(exp.family, exp.networks, exp.txs, exp.schedules,
                            exp.cfg.train.ema_decay, exp.cfg.train.micro_batches)

  def train_step(state, batch, rng):
    # One base key for the run; each step's randomness is folded in from its number,
    # so the random state is the step and resume is exact.
    return step_fn(state, batch, jax.random.fold_in(rng, state["step"]))

  replicated = mesh_lib.replicated(exp.mesh)
  return jax.jit(
      train_step,
      in_shardings=(state_shardings, batch_sharding, replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))


def flops_per_step(compiled) -> float:
  """FLOPs of one step from XLA's cost analysis (all devices together)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def train(cfg: config_lib.Config, run_dir: Path, *, resume_from: int | None = None,
          check_finite_every: int | None = None, devices=None,
          stop_at: int | None = None) -> dict:
  """Trains `cfg` into `run_dir`; returns the last logged metrics.

  `stop_at` ends this run early at that step, with a save, as a preemption would; the
  schedule still runs to `train.steps`, so a later run resumes it exactly.
  """
  jax.config.update("jax_threefry_partitionable", True)  # numbers independent of the mesh
  run_dir = Path(run_dir)
  tcfg = cfg.train

  # Stage 1: mesh and data (every check that needs no compile comes first).
  train_source = load_source(cfg.data, "train")
  exp = experiment_lib.build(cfg, devices, train_source=train_source)
  abstract, shardings = experiment_lib.abstract_shardings(exp)
  batch_sharding = mesh_lib.batch_sharding(exp.mesh)

  # Stage 2: checkpoints; resume when the run directory holds any.
  ckpt_dir = cfg.checkpoint.directory or str(run_dir / "checkpoints")
  record = {
      "scaler_version": scaler.__version__,
      "mesh": dict(exp.mesh.shape),
      "process_count": jax.process_count(),
      "data_fingerprint": fingerprint(train_source),
  }
  ckpt = Checkpointer(ckpt_dir, cfg.checkpoint, record)
  if jax.process_index() == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, run_dir / "config.yaml")

  # Stage 3: state, created sharded or restored straight into its shardings.
  start = 0
  if ckpt.latest_step() is not None or resume_from is not None:
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    state, data_state, start = ckpt.restore(target, resume_from)
    log.info("resumed from step %d", start)
  else:
    state, _ = state_lib.create(exp.family, exp.txs, tcfg.ema_decay > 0, exp.networks,
                                exp.rules, exp.mesh, tcfg.seed)
    data_state = None
  loader = BatchLoader(train_source, tcfg.batch_size, seed=tcfg.seed,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       prefetch=cfg.data.prefetch)
  if data_state is not None:
    loader.set_state(data_state)
  batches = iter(loader)

  # Stage 4: compile once; FLOPs come from the compiled step.
  step_fn = compile_step(exp, shardings, batch_sharding)
  # Made by a jitted function: a global array on the mesh, also across processes (a
  # device_put of a host value cannot target devices of other processes).
  rng = jax.jit(lambda: jax.random.key(tcfg.seed),
                out_shardings=mesh_lib.replicated(exp.mesh))()
  batch = to_global(next(batches), batch_sharding)
  compiled = step_fn.lower(state, batch, rng).compile()
  flops = flops_per_step(compiled)

  # Stage 5: the loop. Steps are dispatched ahead, at most `max_in_flight` unawaited.
  check_every = check_finite_every or tcfg.check_finite_every or tcfg.log_every
  writer = MetricsWriter(run_dir, tcfg.steps, start)
  in_flight = collections.deque()
  last = {}
  t0, t0_step = time.perf_counter(), start
  end = tcfg.steps if stop_at is None else min(stop_at, tcfg.steps)
  try:
    for step in range(start, end):
      if step > start:
        batch = to_global(next(batches), batch_sharding)
      state, metrics = compiled(state, batch, rng)
      in_flight.append(metrics)
      if len(in_flight) > tcfg.max_in_flight:
        jax.block_until_ready(in_flight.popleft())
      done = step + 1
      if done % check_every == 0 or done % tcfg.log_every == 0 or done == end:
        values = jax.device_get(metrics)
        if not values.pop("finite"):
          bad = first_non_finite(state) or "a loss or gradient"
          raise NonFiniteError(f"non-finite values at step {done}: first in state{bad}; "
                               "lower optimizer.lr or set optimizer.clip_norm")
        if done % tcfg.log_every == 0 or done == end:
          elapsed = time.perf_counter() - t0
          rate = (done - t0_step) / max(elapsed, 1e-9)
          values.update(steps_per_sec=rate, examples_per_sec=rate * tcfg.batch_size,
                        flops_per_sec=rate * flops)
          writer.write(done, values)
          last = {"step": done, **{k: float(v) for k, v in values.items()}}
          t0, t0_step = time.perf_counter(), done
      writer.advance(1)
      progress.beat(done)
      ckpt.save(done, state, {**loader.get_state(), "step": done},
                force=done == end)
      if ckpt.reached_preemption(done):
        ckpt.save(done, state, {**loader.get_state(), "step": done}, force=True)
        ckpt.wait()
        raise Preempted(done)
    ckpt.wait()
  finally:
    writer.close()
    ckpt.close()

  # Stage 6: what people would rather look at.
  if jax.process_index() == 0 and end == tcfg.steps:
    samples = draw_samples(exp, state, tcfg.num_samples, tcfg.seed)
    test = load_source(cfg.data, "test")
    plots.samples(exp.spec.denormalize(samples), exp.spec.denormalize(test.x[:len(samples)]),
                  run_dir / "samples.png", kind=exp.spec.kind)
    plots.curves(run_dir / "metrics.jsonl", run_dir / "loss.png")
    (run_dir / "final_metrics.json").write_text(json.dumps(last, indent=1))
  return last


class Preempted(Exception):
  """Stopped on a preemption signal after a committed save; the run is resumable."""

  def __init__(self, step):
    super().__init__(f"preempted at step {step}; checkpoint committed, resume to continue")
    self.step = step


def sample_params(state):
  """EMA weights when the run keeps an EMA, else the trained ones."""
  return state["ema"] or state["params"]


def draw_samples(exp, state, num: int, seed: int) -> np.ndarray:
  """`num` samples in model space, gathered to the host."""
  from jax.experimental import multihost_utils

  @jax.jit
  def sample(params, rest):
    # The key is made inside: a host-made key would be local to one process.
    rng = jax.random.key(seed + 1)
    return exp.family.sample(state_lib.merge(exp.networks, params, rest), rng, num)

  out = sample(sample_params(state), state["rest"])
  return np.asarray(multihost_utils.process_allgather(out, tiled=True))
