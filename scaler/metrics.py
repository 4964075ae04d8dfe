"""Where metrics go: a progress bar, `metrics.jsonl` and TensorBoard event files.

Only process 0 writes; every process computes the same numbers. A run resumed from step
S redoes the steps after S, so each step is logged once: rows of `metrics.jsonl` after S
move to `metrics.redone.jsonl` (kept, not lost), and TensorBoard purges its events after
S (its `purge_step`).
"""

import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm


class MetricsWriter:
  def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0,
               enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._file = self._tb = self._bar = None
    if not self.enabled:
      return
    run_dir.mkdir(parents=True, exist_ok=True)
    _drop_rows_after(run_dir / "metrics.jsonl", start_step)
    self._file = open(run_dir / "metrics.jsonl", "a")
    from tensorboardX import SummaryWriter  # heavy import, process 0 only
    self._tb = SummaryWriter(str(run_dir / "tensorboard"),
                             purge_step=start_step + 1 if start_step else None)
    self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                     dynamic_ncols=True, mininterval=1.0)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": step, "time": time.time(),
           **{k: _scalar(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for k, v in row.items():
      if k not in ("step", "time"):
        self._tb.add_scalar(k, v, step)
    shown = {k: row[k] for k in row if k.endswith("/loss") or k == "steps_per_sec"}
    self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

  def advance(self, steps: int) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def close(self) -> None:
    if self.enabled:
      self._bar.close()
      self._tb.close()
      self._file.close()


def _drop_rows_after(path: Path, step: int) -> None:
  """Moves rows logged after `step` (by a run that went past its last checkpoint) aside."""
  if not path.exists():
    return
  rows = path.read_text().splitlines(keepends=True)
  keep = [r for r in rows if r.strip() and json.loads(r)["step"] <= step]
  if len(keep) == len([r for r in rows if r.strip()]):
    return
  with open(path.with_name("metrics.redone.jsonl"), "a") as f:
    f.writelines(r for r in rows if r.strip() and json.loads(r)["step"] > step)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(keep))
  os.replace(tmp, path)


def _scalar(v):
  v = np.asarray(v)
  return bool(v) if v.dtype == bool else float(v)


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
