"""What each `scaler` subcommand does; argument parsing stays in cli.py."""

import itertools
import math
from pathlib import Path

import numpy as np

from scaler import config as config_lib
from scaler.errors import UserError

EXIT_PREEMPTED = 42  # "preempted, resumable": the last step is saved and committed


def train_config(args):
  """The config and run directory `scaler train` means: CONFIG with its overrides, or the
  saved config of `--run-dir` when no CONFIG is given."""
  from scaler import run_dir as run_dir_lib

  if args.config is None:
    if not args.run_dir:
      raise UserError("scaler train needs a CONFIG (e.g. configs/diffusion_moons.yaml), or "
                      "--run-dir of a run to go on with its saved config")
    saved = run_dir_lib.latest_config(Path(args.run_dir)) if Path(args.run_dir).is_dir() else None
    if saved is None:
      raise UserError(f"--run-dir {args.run_dir} holds no saved config to resume; give a "
                      "CONFIG to start a run there")
    return config_lib.load(saved[0], args.overrides), Path(args.run_dir)
  cfg = config_lib.load(args.config, args.overrides)
  run_dir = Path(args.run_dir) if args.run_dir else run_dir_lib.default_path(args.config, cfg)
  return cfg, run_dir


def _save_on_interrupt() -> None:
  """The first Ctrl-C is a preemption (every process agrees on a step, saves it, exit 42);
  a second one aborts at once. Needs the one-process runtime's preemption sync point."""
  import os
  import signal
  import sys

  def again(signum, frame):
    print("\nscaler: interrupted again: stopping now, without a save", file=sys.stderr)
    os._exit(130)

  def first(signum, frame):
    print("\nscaler: interrupted: saving at the next step (Ctrl-C again to stop at once)",
          file=sys.stderr)
    signal.signal(signal.SIGINT, again)
    os.kill(os.getpid(), signal.SIGTERM)   # JAX's notifier takes it; see checkpoint_preemption

  signal.signal(signal.SIGINT, first)


def train(args) -> int:
  from launch import distributed
  from scaler import checkpoint_preemption
  from scaler import goodput
  from scaler.train import Preempted, train as run_training

  cfg, run_dir = train_config(args)
  # Before anything starts the backend: the job's distributed runtime (the flags' or the
  # environment's), or a one-process one, so that JAX's preemption notifier sees SIGTERM.
  # A no-op where the CLI or a Ray host has started it already.
  distributed.start(args)
  checkpoint_preemption.forward_signal(cfg.checkpoint.preemption_signal)
  if checkpoint_preemption.runtime_started():
    _save_on_interrupt()
  try:
    final = run_training(cfg, run_dir, resume_from=args.resume_from,
                         check_finite_every=1 if args.debug else None,
                         allow_config_change=args.allow_config_change,
                         started_at=goodput.process_start())
  except Preempted as e:
    print(f"scaler: {e}")
    return EXIT_PREEMPTED
  if final.get("nothing_to_do"):
    print(f"scaler: run at step {final['step']} >= train.steps={cfg.train.steps}; nothing to "
          f"do ({run_dir})")
    return 0
  summary = " ".join(f"{k}={v:.4g}" for k, v in final.items() if k != "step")
  print(f"scaler: done at step {final.get('step')}: {summary}")
  print(f"scaler: run directory {run_dir}")
  return 0


def _load_run(run_dir: Path):
  from scaler import run_dir as run_dir_lib

  saved = run_dir_lib.latest_config(run_dir) if run_dir.is_dir() else None
  if saved is None:
    raise UserError(f"{run_dir} is not a run directory: no config.yaml in it")
  return config_lib.load(saved[0])


def _fit_mesh(cfg):
  """The run's mesh if this machine has the devices for it, else data-parallel."""
  import dataclasses

  import jax

  from scaler import mesh as mesh_lib
  try:
    mesh_lib.mesh_shape(cfg.mesh, jax.device_count())
    return cfg
  except UserError:
    return dataclasses.replace(cfg, mesh=config_lib.MeshConfig(), rules="data_parallel")


MAX_PNG_SAMPLES = 4096   # a picture of more is unreadable; an .npz takes any number


def _check_out(out: Path, num: int) -> None:
  """Every reason `scaler sample` could not write `out`, before anything is drawn."""
  if out.suffix not in (".npz", ".png"):
    raise UserError(f"--out {out}: the file must end in .npz or .png")
  if num < 1:
    raise UserError(f"--num {num}: needs at least 1")
  if out.suffix == ".png" and num > MAX_PNG_SAMPLES:
    raise UserError(f"--num {num} is too many for a picture (at most {MAX_PNG_SAMPLES}); "
                    "write an .npz for more")
  if out.exists():
    raise UserError(f"--out {out} exists; choose another name (nothing is overwritten)")
  from scaler.run_dir import check_writable
  check_writable(out.parent, "--out's directory")


def sample(args) -> int:
  from tqdm import tqdm

  from scaler import experiment as experiment_lib
  from scaler import plots
  from scaler.checkpoint import Checkpointer
  from scaler.data import read_spec
  from scaler.sampling import NpyStream, check_sample_options, draw_samples
  from scaler.train import DATA_SPEC

  run_dir = Path(args.run_dir)
  out = Path(args.out)
  _check_out(out, args.num)
  if args.chunk < 1:
    raise UserError(f"--chunk {args.chunk}: needs at least 1")
  cfg = _fit_mesh(_load_run(run_dir))
  # The run's saved data spec: sampling never opens the training data.
  spec_path = run_dir / DATA_SPEC
  exp = experiment_lib.build(cfg, spec=read_spec(spec_path) if spec_path.exists() else None)
  kw = {k: v for k, v in (("label", args.label), ("guidance", args.guidance),
                          ("temperature", args.temperature), ("top_k", args.top_k))
        if v is not None}
  _check_sample_options(exp.family, kw, cfg.family.name)
  target = experiment_lib.abstract_target(exp)
  if args.from_buffer and target.extra is None:
    raise UserError(f"--from-buffer: family '{cfg.family.name}' keeps no replay buffer")
  if args.from_buffer:
    kw["from_buffer"] = True
  check_sample_options(exp, target, **kw)   # a bad label, before any file is read or made
  ckpt = Checkpointer(cfg.checkpoint.directory or str(run_dir / "checkpoints"),
                      cfg.checkpoint, record={})
  state, _, step = ckpt.restore(target, args.step)
  ckpt.close()
  sizes = [min(args.chunk, args.num - i) for i in range(0, args.num, args.chunk)]
  chunks = (exp.spec.denormalize(draw_samples(exp, state, n, seed=args.seed, chunk=i, **kw))
            for i, n in enumerate(sizes))
  # The first chunk before any file: a bad --label or --guidance is refused with nothing written.
  chunks = itertools.chain([next(chunks)], chunks)
  bar = tqdm(total=args.num, desc="sample", unit="sample", disable=len(sizes) == 1)
  out.parent.mkdir(parents=True, exist_ok=True)
  if out.suffix == ".npz":
    # Streamed chunk by chunk into the archive: memory holds one chunk, not --num samples.
    with NpyStream(out, "samples", (args.num, *exp.spec.shape)) as stream:
      for chunk in chunks:
        stream.write(np.asarray(chunk, np.float32))
        bar.update(len(chunk))
  else:
    samples = np.concatenate([c for c in chunks])
    bar.update(len(samples))
    plots.samples(samples, None, out, kind=exp.spec.kind)
  bar.close()
  print(f"scaler: {args.num} samples from step {step} -> {out}")
  return 0


def _check_sample_options(family, kw, name) -> None:
  """A sampling option the family's sampler does not take is refused, by name."""
  import inspect
  takes = inspect.signature(family.sample).parameters
  flags = {"temperature": "--temperature", "top_k": "--top-k"}
  for key, flag in flags.items():
    if key in kw and key not in takes:
      raise UserError(f"{flag}: family {name} draws samples without one (flow and "
                      "autoregressive runs take --temperature, autoregressive --top-k)")
  if kw.get("temperature") is not None and kw["temperature"] <= 0:
    raise UserError(f"--temperature {kw['temperature']}: must be positive")
  if kw.get("top_k") is not None and kw["top_k"] < 0:
    raise UserError(f"--top-k {kw['top_k']}: must be at least 0 (0: every token)")


def evaluate(args) -> int:
  """`scaler eval`: see launch/eval_command.py."""
  from launch import eval_command
  return eval_command.run(args)


def _layout_rows(tree, shardings, prefix):
  import jax

  from scaler.partitioning import path_str

  rows = []
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(tree),
                                    jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(leaf.shape)
    rows.append((prefix + path_str(path), str(tuple(leaf.shape)), str(tuple(sharding.spec)),
                 math.prod(shard) * leaf.dtype.itemsize))
  return rows


def layout(args) -> int:
  import jax

  from scaler import experiment as experiment_lib
  from scaler import mesh as mesh_lib
  from scaler.train import compile_step

  cfg = config_lib.load(args.config, args.overrides)
  exp = experiment_lib.build(cfg)
  abstract, shardings = experiment_lib.abstract_shardings(exp)
  print(f"mesh: {dict(exp.mesh.shape)} over {exp.mesh.devices.size} devices; "
        f"rules: {cfg.rules if isinstance(cfg.rules, str) else 'custom'}; "
        f"precision: params {cfg.precision.params}, compute {cfg.precision.compute}")
  parts = [("parameters", "params", ""), ("optimizer state", "opt_state", ""),
           ("EMA", "ema", ""), ("non-parameter state", "rest", ""), ("extra state", "extra", "")]
  totals = {}
  for title, field, prefix in parts:
    rows = _layout_rows(getattr(abstract, field), getattr(shardings, field), prefix)
    if not rows:
      continue
    widths = [max(len(r[i]) for r in rows + [(title, "shape", "spec")]) for i in range(3)]
    print(f"\n{title:<{widths[0]}}  {'shape':<{widths[1]}}  {'spec':<{widths[2]}}  bytes/device")
    for r in rows:
      print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>12,}")
    totals[title] = sum(r[3] for r in rows)
  counts = {n: sum(math.prod(l.shape) for l in jax.tree.leaves(p))
            for n, p in abstract.params.items()}
  print("\nparameters: " + ", ".join(f"{n} {c:,}" for n, c in counts.items())
        + f"; bytes per device: " + ", ".join(f"{k} {v:,}" for k, v in totals.items()))
  batch_sharding = mesh_lib.batch_sharding(exp.mesh)
  batch = {"x": jax.ShapeDtypeStruct((cfg.train.batch_size, *exp.spec.shape), np.float32,
                                     sharding=batch_sharding)}
  if exp.spec.num_classes:
    batch["label"] = jax.ShapeDtypeStruct((cfg.train.batch_size,), np.int32,
                                          sharding=batch_sharding)
  state = experiment_lib.abstract_target(exp)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=mesh_lib.replicated(exp.mesh))
  compiled = compile_step(exp, shardings, batch_sharding).lower(state, batch, key).compile()
  mem = compiled.memory_analysis()
  if mem is not None:
    print(f"compiled step, per device: arguments {mem.argument_size_in_bytes:,} B, "
          f"outputs {mem.output_size_in_bytes:,} B, temporaries {mem.temp_size_in_bytes:,} B, "
          f"aliased (donated) {mem.alias_size_in_bytes:,} B")
  return 0


def export(args) -> int:
  from scaler.export import export as export_params

  run_dir = Path(args.run_dir)
  cfg = _load_run(run_dir)
  out = export_params(cfg.checkpoint.directory or str(run_dir / "checkpoints"), args.step,
                      args.out)
  if "://" not in str(out):
    # What it takes to use the weights without the run: the resolved config beside them.
    import shutil

    from scaler.train import DATA_SPEC
    config_lib.dump(cfg, Path(out) / "scaler_config.yaml")
    if (run_dir / DATA_SPEC).is_file():   # the normalisation, to map samples to data space
      shutil.copy(run_dir / DATA_SPEC, Path(out) / DATA_SPEC)
  print(f"scaler: exported parameters to {out or args.out}")
  return 0


def show_list(args) -> int:
  """What a config can name: the shipped configs and every registry."""
  from scaler.data.config import DATA_SOURCES
  from scaler.families import FAMILIES
  from scaler.nn.registry import NETWORKS
  from scaler.optim import OPTIMIZERS
  from scaler.partitioning import PRESETS

  root = Path(__file__).resolve().parents[1] / "configs"
  configs = sorted(root.glob("*.yaml"))
  print("configs (" + str(root) + "):")
  for path in configs:
    first = next((l[1:].strip() for l in path.read_text().splitlines() if l.startswith("#")), "")
    print(f"  {path.name:<28} {first}")
  for title, names in (("families", FAMILIES), ("networks (model.name)", NETWORKS),
                       ("data sources (data.source)", DATA_SOURCES),
                       ("optimizers (optimizer.name)", OPTIMIZERS),
                       ("rule presets (rules)", PRESETS)):
    print(f"{title}: {', '.join(sorted(names))}")
  return 0
