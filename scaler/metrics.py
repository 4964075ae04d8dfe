"""Where metrics go: a progress bar, `metrics.jsonl` and TensorBoard event files.

Only process 0 writes; every process computes the same numbers.
"""

import json
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
    self._file = open(run_dir / "metrics.jsonl", "a")
    from tensorboardX import SummaryWriter  # heavy import, process 0 only
    self._tb = SummaryWriter(str(run_dir / "tensorboard"))
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


def _scalar(v):
  v = np.asarray(v)
  return bool(v) if v.dtype == bool else float(v)


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
