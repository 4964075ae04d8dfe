"""The driver, in named stages: set up, restore or initialise, compile, loop, finish.

The same function runs on one CPU, on N simulated devices (`--debug`) and on every host
of a pod; nothing here branches on which. Every process runs every stage, including
the computations of the last one (sampling over global arrays needs all of them);
only process 0 writes files.
"""

import dataclasses
import json
import logging
import math
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

import scaler
from scaler import config as config_lib
from scaler import experiment as experiment_lib
from scaler import goodput as goodput_lib
from scaler import mesh as mesh_lib
from scaler import partitioning
from scaler import plots
from scaler import progress
from scaler import rng as rng_lib
from scaler import run_dir as run_dir_lib
from scaler import state as state_lib
from scaler.checkpoint import Checkpointer
from scaler.data import BatchLoader, fingerprint, load_source, read_spec, save_spec, to_global
from scaler.loop import Loop, NonFiniteError, Preempted  # noqa: F401 - re-exported
from scaler.sampling import draw_reconstructions, draw_samples, sample_params  # noqa: F401
from scaler.step import make_train_step

log = logging.getLogger("scaler")
DATA_SPEC = "data_spec.json"  # the data's shape, kind, statistics and classes (JSON)


@dataclasses.dataclass
class Run:
  """What the stages share: the experiment, where it writes, and how batches arrive."""
  exp: experiment_lib.Experiment
  run_dir: Path
  train_source: object
  batch_sharding: jax.sharding.NamedSharding
  rows: tuple[int, int]      # this process's rows of every global batch
  goodput: goodput_lib.Recorder = dataclasses.field(default_factory=goodput_lib.off)


def setup(cfg: config_lib.Config, run_dir, devices=None,
          goodput: goodput_lib.Recorder | None = None) -> Run:
  """Stage 1: data, mesh, family, shardings; every check that needs no compile."""
  jax.config.update("jax_threefry_partitionable", True)  # numbers independent of the mesh
  # A run normalises with the statistics it started with, saved in its directory.
  spec_path = Path(run_dir) / DATA_SPEC
  saved = read_spec(spec_path) if spec_path.exists() else None
  train_source = load_source(cfg.data, "train", spec=saved)
  exp = experiment_lib.build(cfg, devices, spec=train_source.spec)
  rows = mesh_lib.process_rows(exp.mesh, cfg.train.batch_size)
  return Run(exp, Path(run_dir), train_source, mesh_lib.batch_sharding(exp.mesh), rows,
             goodput or goodput_lib.off())


def open_checkpoints(run: Run) -> Checkpointer:
  """Stage 2: the run's checkpoints, with the record that describes them."""
  cfg = run.exp.cfg
  record = {
      "scaler_version": scaler.__version__,
      "mesh": dict(run.exp.mesh.shape),
      "process_count": jax.process_count(),
      "data_fingerprint": fingerprint(run.train_source),
  }
  return Checkpointer(cfg.checkpoint.directory or str(run.run_dir / "checkpoints"),
                      cfg.checkpoint, record)


def banner(run: Run, state, start: int) -> None:
  """What a user checks first: devices and mesh, model size, memory, where it writes."""
  if jax.process_index() != 0:
    return
  exp, cfg = run.exp, run.exp.cfg
  dev = jax.devices()[0]
  log.info("run directory %s: %s", run.run_dir,
           f"resumed from step {start}" if start else "fresh run")
  log.info("%d %s device(s) (%s) in %d process(es); mesh %s; rules %s; precision %s/%s",
           jax.device_count(), dev.platform, dev.device_kind, jax.process_count(),
           " x ".join(f"{a}={n}" for a, n in exp.mesh.shape.items()),
           cfg.rules if isinstance(cfg.rules, str) else "custom",
           cfg.precision.params, cfg.precision.compute)

  def per_device(tree):
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree) if hasattr(x, "sharding"))

  counts = ", ".join(f"{n} {sum(x.size for x in jax.tree.leaves(p)):,}"
                     for n, p in state.params.items())
  log.info("parameters: %s; bytes per device: params %s, optimizer %s, EMA %s, other %s",
           counts, f"{per_device(state.params):,}", f"{per_device(state.opt_state):,}",
           f"{per_device(state.ema):,}", f"{per_device((state.rest, state.extra)):,}")


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def restore_or_init(run: Run, ckpt: Checkpointer, resume_from: int | None):
  """Stage 3: the state, restored straight into its shardings or created sharded, and
  the loader positioned at the state's step. Returns (state, loader, start step)."""
  exp, tcfg = run.exp, run.exp.cfg.train
  loader = BatchLoader(run.train_source, tcfg.batch_size, seed=tcfg.seed, rows=run.rows,
                       prefetch=exp.cfg.data.prefetch)
  if ckpt.latest_step() is not None or resume_from is not None:
    target = experiment_lib.abstract_target(exp)
    progress.expect("restore", progress.restore_allowance(target))   # for the watchdog
    with run.goodput.during("restore"):
      state, data_state, start = ckpt.restore(target, resume_from)
    loader.set_state(data_state)
    log.info("resumed from step %d", start)
    return state, loader, start
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, exp.use_ema, exp.rules,
                              exp.mesh, tcfg.seed)
  return state, loader, 0


def data_init(run: Run, state: state_lib.TrainState, batch) -> state_lib.TrainState:
  """A fresh run's data-dependent initialisation (Glow's ActNorm), on the first global
  batch: one jitted function over the mesh, so it is the same on any mesh and process
  count. Optimizer state and EMA are made again from the new parameters."""
  exp = run.exp
  if exp.family.data_init is None:
    return state

  def init(state, batch):
    # The key is made inside: a host-made key would be local to one process.
    key = rng_lib.stream(exp.cfg.train.seed, "data_init")
    nets = state_lib.merge(exp.networks, state.params, state.rest)
    exp.family.data_init(nets, batch, key)
    _, params, rest = state_lib.split(nets)
    ema = {n: params[n] for n in state.ema}
    return state.replace(params=params, rest=rest, ema=ema,
                         opt_state={n: exp.txs[n].init(params[n]) for n in params})

  _, shardings = experiment_lib.abstract_shardings(exp)
  return jax.jit(init, in_shardings=(shardings, run.batch_sharding), out_shardings=shardings,
                 donate_argnums=0)(state, batch)


def compile_step(exp, state_shardings, batch_sharding):
  """The jitted step: explicit shardings, the state's buffers donated."""
  step_fn = make_train_step(exp.family, exp.networks, exp.txs, exp.schedules,
                            exp.cfg.train.ema_decay, exp.cfg.train.micro_batches)

  def train_step(state, batch, train_key):
    # One base key for the run; each step's randomness is folded in from its number,
    # so the random state is the step and resume is exact. Traced under the run's rules:
    # activations a network pins by role (a rematted stack's carry, layers.chain; conv
    # feature maps, nn/conv.py) are split as the batch and the parameters are.
    with partitioning.activation_rules(exp.mesh, exp.rules):
      return step_fn(state, batch, rng_lib.step_key(train_key, state.step))

  replicated = mesh_lib.replicated(exp.mesh)
  return jax.jit(
      train_step,
      in_shardings=(state_shardings, batch_sharding, replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))


def finish(run: Run, state, last: dict) -> None:
  """Stage 6: samples, curves and final metrics. Every process samples; process 0 writes."""
  exp, tcfg = run.exp, run.exp.cfg.train
  views = {title: exp.spec.denormalize(draw_samples(exp, state, tcfg.num_samples, seed=0, **kw))
           for title, kw in exp.family.sample_views.items()}
  test = load_source(exp.cfg.data, "test", spec=exp.spec)
  recons = None
  if exp.family.reconstruct is not None:   # an autoencoder: held-out reconstructions too
    pairs = test.rows(np.arange(min(32, len(test))))
    recons = draw_reconstructions(exp, state, pairs)
  if jax.process_index() != 0:
    return
  held_out = test.rows(np.arange(min(tcfg.num_samples, len(test))))["x"]
  plots.samples(views, exp.spec.denormalize(held_out),
                run.run_dir / "samples.png", kind=exp.spec.kind)
  if recons is not None:
    plots.reconstructions(exp.spec.denormalize(pairs["x"]), exp.spec.denormalize(recons),
                          run.run_dir / "reconstructions.png", kind=exp.spec.kind)
  plots.curves(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
  (run.run_dir / "final_metrics.json").write_text(json.dumps(last, indent=1))


def train(cfg: config_lib.Config, run_dir: Path, *, resume_from: int | None = None,
          check_finite_every: int | None = None, devices=None, stop_at: int | None = None,
          allow_config_change: bool = False, started_at: float | None = None) -> dict:
  """Trains `cfg` into `run_dir`; returns the last logged metrics.

  Everything that can refuse the start (config, data, mesh, the run directory's config
  and lock, the checkpoint to resume) runs before anything is written. A run already at
  `train.steps` returns `{"step": S, "nothing_to_do": True}` and changes nothing.
  `stop_at` ends this run early at that step, with a save, as a preemption would; the
  schedule still runs to `train.steps`, so a later run resumes it exactly.
  `started_at` (wall clock, default now) is where the goodput record's start-up begins.
  """
  gp = goodput_lib.Recorder(run_dir, started_at, enabled=jax.process_index() == 0)
  run = setup(cfg, run_dir, devices, gp)
  plan = run_dir_lib.plan(run.run_dir, cfg, allow_config_change=allow_config_change,
                          resume_from=resume_from)
  if plan.finished and resume_from is None:
    log.info("run at step %d >= train.steps=%d; nothing to do", plan.latest_step,
             cfg.train.steps)
    return {"step": plan.latest_step, "nothing_to_do": True}
  _barrier("scaler_run_dir_checked")   # every process has read the directory as it was
  with run_dir_lib.Lock(run.run_dir, enabled=jax.process_index() == 0), gp.attempt():
    ckpt = open_checkpoints(run)
    try:
      state, loader, start = restore_or_init(run, ckpt, resume_from)
      if jax.process_index() == 0:
        # The config and the data's spec, only once the start can no longer be refused:
        # with the spec, sampling and evaluation never need the training data.
        plan.commit()
        save_spec(run.train_source.spec, run.run_dir / DATA_SPEC)
      gp.begin(start)
      banner(run, state, start)
      batches = iter(loader)
      with gp.during("data_wait"):
        first = to_global(next(batches), run.batch_sharding, cfg.train.batch_size)
      gp.phase("compile")
      progress.expect("compile", progress.compile_allowance(gp.previous("compile")))
      if start == 0:
        state = data_init(run, state, first)
      _, shardings = experiment_lib.abstract_shardings(run.exp)
      train_key = jax.jit(lambda: rng_lib.stream(cfg.train.seed, "train"),
                          out_shardings=mesh_lib.replicated(run.exp.mesh))()
      compiled = compile_step(run.exp, shardings, run.batch_sharding).lower(
          state, first, train_key).compile()
      end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
      loop = Loop(run, ckpt, compiled, loader, train_key,
                  check_every=check_finite_every or cfg.train.check_finite_every)
      state, last = loop.run(state, first, batches, start, end)
    finally:
      ckpt.close()
    if end == cfg.train.steps:
      gp.phase("final")
      finish(run, state, last)
  return last
