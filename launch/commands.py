"""What each `scaler` subcommand does; argument parsing stays in cli.py."""

import math
from pathlib import Path

import numpy as np

from scaler import config as config_lib
from scaler.errors import UserError

EXIT_PREEMPTED = 42  # "preempted, resumable": the last step is saved and committed


def _default_run_dir(config_path) -> Path:
  return Path("runs") / Path(config_path).stem


def _check_run_dir(run_dir: Path, ckpt_dir: Path, resume_from) -> None:
  """A run directory is resumed when it holds checkpoints, and never overwritten."""
  if resume_from is not None and not ckpt_dir.exists():
    raise UserError(f"--resume-from {resume_from}: {ckpt_dir} holds no checkpoints")
  if run_dir.exists() and any(run_dir.iterdir()) and not ckpt_dir.exists():
    raise UserError(
        f"run directory {run_dir} exists and holds no checkpoints to resume; "
        f"choose a new --run-dir (nothing there is overwritten)")


def train(args) -> int:
  from scaler import checkpoint_preemption
  from scaler.train import Preempted, train as run_training

  cfg = config_lib.load(args.config, args.overrides)
  # Before anything starts the backend: a one-process distributed runtime, so that
  # JAX's preemption notifier sees SIGTERM (a multi-host launch has started its own).
  checkpoint_preemption.start_runtime()
  checkpoint_preemption.forward_signal(cfg.checkpoint.preemption_signal)
  run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(args.config)
  ckpt_dir = Path(cfg.checkpoint.directory or run_dir / "checkpoints")
  if "://" not in str(cfg.checkpoint.directory or ""):
    _check_run_dir(run_dir, ckpt_dir, args.resume_from)
  try:
    final = run_training(cfg, run_dir, resume_from=args.resume_from,
                         check_finite_every=1 if args.debug else None)
  except Preempted as e:
    print(f"scaler: {e}")
    return EXIT_PREEMPTED
  summary = " ".join(f"{k}={v:.4g}" for k, v in final.items() if k != "step")
  print(f"scaler: done at step {final.get('step')}: {summary}")
  print(f"scaler: run directory {run_dir}")
  return 0


def _load_run(run_dir: Path):
  cfg_path = run_dir / "config.yaml"
  if not cfg_path.is_file():
    raise UserError(f"{run_dir} is not a run directory: no config.yaml in it")
  return config_lib.load(cfg_path)


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


def sample(args) -> int:
  import jax

  from scaler import experiment as experiment_lib
  from scaler import plots
  from scaler.checkpoint import Checkpointer
  from scaler.sampling import draw_samples

  run_dir = Path(args.run_dir)
  out = Path(args.out)
  if out.suffix not in (".npz", ".png"):
    raise UserError(f"--out {out}: the file must end in .npz or .png")
  if args.num < 1:
    raise UserError(f"--num {args.num}: needs at least 1")
  if out.exists():
    raise UserError(f"--out {out} exists; choose another name (nothing is overwritten)")
  cfg = _fit_mesh(_load_run(run_dir))
  exp = experiment_lib.build(cfg)
  target = experiment_lib.abstract_target(exp)
  ckpt = Checkpointer(cfg.checkpoint.directory or str(run_dir / "checkpoints"),
                      cfg.checkpoint, record={})
  state, _, step = ckpt.restore(target, args.step)
  ckpt.close()
  kw = {} if args.label is None else {"label": args.label}   # the family refuses a bad one
  samples = exp.spec.denormalize(draw_samples(exp, state, args.num, seed=args.seed, **kw))
  out.parent.mkdir(parents=True, exist_ok=True)
  if out.suffix == ".npz":
    np.savez(out, samples=np.asarray(samples, np.float32))
  else:
    plots.samples(samples, None, out, kind=exp.spec.kind)
  print(f"scaler: {args.num} samples from step {step} -> {out}")
  return 0


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
  print(f"scaler: exported parameters to {out or args.out}")
  return 0
