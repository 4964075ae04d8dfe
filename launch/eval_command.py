"""`scaler eval RUN_DIR`: held-out likelihood and sample quality of a trained run.

    scaler eval runs/glow_digits --split test --num 2000
    scaler eval runs/x --metrics likelihood --step 1000

Restores a checkpoint (the latest, or --step) on the run's mesh (the same devices and
processes it trained on; a mesh this machine cannot hold falls back to data-parallel),
averages the family's `evaluate` metrics over the first --num examples of the split
(flows and autoregressive models: -log p in nats per example and bits per dimension;
the VAE: its ELBO), and scores --num/2 samples against held-out data beside held-out
data against itself, the floor (scaler/evaluate.py `report`). Writes eval.json into the
run directory, beside checkpoints/, and prints a short table.
"""

import json
import math
from pathlib import Path

from scaler.errors import UserError

METRICS = ("all", "likelihood", "quality")


def check_args(args) -> None:
  if args.num < 1:
    raise UserError(f"--num {args.num}: needs at least 1")
  if args.metrics != "likelihood" and args.num < 4:
    raise UserError(f"--num {args.num}: sample quality compares two halves of the held-out "
                    "examples; needs at least 4 (or --metrics likelihood)")


def run(args) -> int:
  import jax

  from launch.commands import _fit_mesh, _load_run
  from scaler import evaluate as evaluate_lib
  from scaler import experiment as experiment_lib
  from scaler.checkpoint import Checkpointer
  from scaler.data import load_source, read_spec
  from scaler.train import DATA_SPEC

  check_args(args)
  run_dir = Path(args.run_dir)
  cfg = _fit_mesh(_load_run(run_dir))
  spec_path = run_dir / DATA_SPEC
  exp = experiment_lib.build(cfg, spec=read_spec(spec_path) if spec_path.exists() else None)
  names = evaluate_lib.metric_names(exp)
  if args.metrics == "likelihood" and not any(n in evaluate_lib.LIKELIHOOD for n in names):
    raise UserError(f"--metrics likelihood: family {cfg.family.name} has no likelihood "
                    f"(its held-out metrics: {', '.join(names) or 'none'}); use "
                    "--metrics quality or all")
  ckpt_dir = cfg.checkpoint.directory or str(run_dir / "checkpoints")
  missing = (f"no checkpoint to evaluate in {ckpt_dir} (no committed step there); train "
             f"{run_dir} first")
  if "://" not in ckpt_dir and not Path(ckpt_dir).is_dir():
    raise UserError(missing)   # before the checkpointer, which would create the folder
  ckpt = Checkpointer(ckpt_dir, cfg.checkpoint, record={})
  try:
    if ckpt.latest_step() is None:
      raise UserError(missing)
    source = load_source(cfg.data, args.split, spec=exp.spec)
    state, _, step = ckpt.restore(experiment_lib.abstract_target(exp), args.step)
  finally:
    ckpt.close()
  result = evaluate_lib.report(exp, state, source, num=args.num,
                               likelihood=args.metrics != "quality" and bool(names),
                               quality=args.metrics != "likelihood")
  if jax.process_index() != 0:
    return 0
  record = {"step": step, "split": args.split, "family": cfg.family.name,
            "model": cfg.model.name, "mesh": dict(exp.mesh.shape),
            "processes": jax.process_count(), **result}
  path = run_dir / evaluate_lib.EVAL_FILE
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(record, indent=1))
  tmp.replace(path)
  print(table(record))
  print(f"scaler: wrote {path}")
  return 0


def _fmt(x) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def table(record: dict) -> str:
  """The few lines a reader wants: each metric, and beside sample quality, the floor."""
  lines = [f"{record['family']}/{record['model']} at step {record['step']}, "
           f"{record['examples']} {record['split']} examples"]
  metrics = record.get("metrics") or {}
  units = {"nll": "nats/example", "bpd": "bits/dim", "elbo": "nats/example"}
  for k, v in metrics.items():
    lines.append(f"  {k:<20} {_fmt(v):>10}  {units.get(k, '')}")
  quality = record.get("quality") or {}
  if quality:
    lines.append(f"  {'sample quality':<20} {'samples':>10}  {'held-out (floor)':>16}   "
                 f"({record['quality_sample_size']} each)")
    for k, v in quality.items():
      lines.append(f"  {k:<20} {_fmt(v['samples']):>10}  {_fmt(v['held_out']):>16}")
  return "\n".join(lines)
