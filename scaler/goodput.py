"""Goodput: where a run's wall time goes, per attempt and over every attempt.

    gp = goodput.Recorder(run_dir, started_at)   # first thing: the clock runs from there
    gp.phase("restore") ... gp.phase("compile")  # at the driver's stage boundaries
    gp.begin(start_step)                          # once the start can no longer be refused
    with gp.during("data_wait"): batch = ...      # around the loop's existing calls
    gp.step(done)                                 # after each step
    with gp.attempt(): ...                        # records how the attempt ended

An attempt's wall time runs from its process's start (imports included) to its end. It is
cut into parts at those calls, so each second lands in exactly one part:

  startup          imports, distributed init, config, data open, mesh, a fresh state
  restore          reading and verifying the checkpoint
  compile          tracing and compiling the step (and a fresh run's data-dependent init)
  steps            the loop, less the three parts below: productive training steps
  data_wait        the loop blocked on the loader (the next batch, put on the devices)
  checkpoint_save  blocked in checkpoint saves and waiting for their commit
  redone           loop time on steps that an earlier attempt had already reached: lost
                   by a restart (from the checkpoint it restored to the furthest step an
                   earlier attempt recorded here or logged in metrics.jsonl)
  final            samples, plots and final metrics at the end

`goodput.json` in the run directory holds every attempt (rewritten every FLUSH_S seconds
while training, so an attempt that is killed leaves its record up to then) and the sum
over attempts, with the time `between_attempts` (from an attempt's last record to the next
one's start: the restart, the scheduler, the part of a killed attempt after its last
record). At the end, the totals go to TensorBoard (`goodput/*`) and one log line each.
Only process 0 writes; every process times its own.
"""

import contextlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("scaler")

FILE = "goodput.json"
PARTS = ("startup", "restore", "compile", "steps", "data_wait", "checkpoint_save", "redone",
         "final")
BETWEEN = "between_attempts"
FLUSH_S = 10.0


def process_start() -> float:
  """When this process started (wall clock, 10 ms resolution on Linux), so that start-up
  includes the interpreter and the imports; now where /proc cannot tell."""
  try:
    with open("/proc/self/stat") as f:
      ticks = int(f.read().rsplit(")", 1)[1].split()[19])   # field 22: starttime
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return time.time()


class _During:
  """Time inside the block goes to `part`; after it, back to the phase it interrupted."""

  __slots__ = ("rec", "part", "outer")

  def __init__(self, rec, part):
    self.rec, self.part = rec, part

  def __enter__(self):
    self.outer = self.rec._phase
    self.rec.phase(self.part)

  def __exit__(self, *exc):
    self.rec.phase(self.outer)


class Recorder:
  """Times one attempt; reads the earlier ones from, and writes all to, `run_dir/goodput.json`.

  `enabled=False` (processes other than 0) times without reading or writing files.
  """

  def __init__(self, run_dir=None, started_at: float | None = None, *, enabled: bool = True,
               clock=time.time):
    self._clock = clock
    now = clock()
    self.path = Path(run_dir) / FILE if run_dir is not None and enabled else None
    self.started_at = now if started_at is None else min(started_at, now)
    self.parts = dict.fromkeys(PARTS, 0.0)
    self._phase, self._since = "startup", self.started_at
    self._earlier = []          # the records of earlier attempts, read by `begin`
    self._armed = False         # files are written only once the start cannot be refused
    self.start_step = self.last_step = None
    self.redo_until = None      # the furthest step an earlier attempt reached, if beyond ours
    self._flushed = now

  # --- timing ---

  def phase(self, part: str) -> None:
    """From now on, time goes to `part`."""
    now = self._clock()
    self.parts[self._phase] += now - self._since
    self._phase, self._since = part, now

  def during(self, part: str) -> _During:
    return _During(self, part)

  def begin(self, start_step: int) -> None:
    """The attempt trains from `start_step`: reads the earlier attempts and arms the
    writes. Call once the start can no longer be refused (nothing is written before)."""
    self._earlier = self._read()
    reached = max([a.get("last_step") or 0 for a in self._earlier]
                  + [_last_logged_step(self.path.parent / "metrics.jsonl") if self.path else 0])
    self.start_step = self.last_step = start_step
    self.redo_until = reached if reached > start_step else None
    self._armed = self.path is not None
    self._write("running")

  def loop(self) -> None:
    """The train loop starts: redone steps first, if an earlier attempt went further."""
    self.phase("redone" if self.redo_until is not None else "steps")

  def step(self, done: int) -> None:
    """After step `done`: cheap (a comparison, and a clock read)."""
    self.last_step = done
    if done == self.redo_until:
      self.phase("steps")
    now = self._clock()
    if self._armed and now - self._flushed > FLUSH_S:
      self._write("running", now)

  def previous(self, part: str) -> float:
    """Seconds the latest earlier attempt spent in `part`, 0 without one; process 0's
    figure on every process (e.g. the compile time, for the watchdog's allowance)."""
    value = 0.0
    for a in reversed(self._earlier):
      if a.get("parts_s", {}).get(part):
        value = float(a["parts_s"][part])
        break
    import jax
    if jax.process_count() > 1:
      import numpy as np
      from jax.experimental import multihost_utils
      value = float(multihost_utils.broadcast_one_to_all(np.float32(value)))
    return value

  @contextlib.contextmanager
  def attempt(self):
    """Around the attempt: records how it ended (done, preempted, failed) on the way out."""
    from scaler.loop import Preempted
    status = "failed"
    try:
      yield self
      status = "done"
    except Preempted:
      status = "preempted"
      raise
    except BaseException as e:
      status = f"failed: {type(e).__name__}"
      raise
    finally:
      self.end(status)

  def end(self, status: str) -> dict | None:
    """Closes the attempt: goodput.json, TensorBoard and the summary lines. Returns the
    summary over every attempt (None where nothing is written)."""
    self.phase(self._phase)
    if not self._armed:
      return None
    summary = self._write(status)
    self._armed = False
    try:
      _to_tensorboard(self.path.parent, summary, self.last_step or 0)
    except Exception as e:  # noqa: BLE001 - a missing TensorBoard must not fail the run
      log.warning("goodput: not written to TensorBoard: %s", e)
    for line in summary_lines(summary):
      log.info("%s", line)
    return summary

  # --- records ---

  def record(self, status: str, now: float | None = None) -> dict:
    """This attempt as goodput.json holds it."""
    now = self._clock() if now is None else now
    parts = dict(self.parts)
    parts[self._phase] += now - self._since
    redone = [self.start_step + 1, self.redo_until] if self.redo_until is not None else None
    return {"started_at": round(self.started_at, 3), "ended_at": round(now, 3),
            "status": status, "start_step": self.start_step, "last_step": self.last_step,
            "redone_steps": redone, "wall_s": round(now - self.started_at, 3),
            "parts_s": {k: round(v, 3) for k, v in parts.items()}}

  def _read(self) -> list[dict]:
    if self.path is None or not self.path.exists():
      return []
    try:
      attempts = json.loads(self.path.read_text())["attempts"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      log.warning("goodput: %s cannot be read (%s); starting its record again", self.path, e)
      return []
    for a in attempts:
      if a.get("status") == "running":   # its process ended without a word: killed, lost
        a["status"] = "lost"
    return attempts

  def _write(self, status: str, now: float | None = None) -> dict | None:
    if not self._armed:
      return None
    attempts = self._earlier + [self.record(status, now)]
    summary = summarize(attempts)
    tmp = self.path.with_name(FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, self.path)   # whole files only: a killed process leaves the last one
    self._flushed = self._clock() if now is None else now
    return summary


def summarize(attempts: list[dict]) -> dict:
  """The sum over attempts, with the time between them; `wall_s` runs from the first
  attempt's start to the last one's end."""
  total = dict.fromkeys((*PARTS, BETWEEN), 0.0)
  for before, a in zip([None, *attempts], attempts):
    for part, seconds in a["parts_s"].items():
      total[part] = total.get(part, 0.0) + seconds
    if before is not None:
      total[BETWEEN] += max(0.0, a["started_at"] - before["ended_at"])
  wall = attempts[-1]["ended_at"] - attempts[0]["started_at"]
  return {"wall_s": round(wall, 3), "parts_s": {k: round(v, 3) for k, v in total.items()},
          "fractions": {k: round(v / wall, 4) if wall > 0 else 0.0 for k, v in total.items()},
          "goodput": round(total["steps"] / wall, 4) if wall > 0 else 0.0,
          "attempts": attempts}


def summary_lines(summary: dict) -> list[str]:
  """One line for the whole, then one a part."""
  n = len(summary["attempts"])
  lines = [f"goodput: {100 * summary['goodput']:.1f}% of {summary['wall_s']:.1f} s in "
           f"productive steps, over {n} attempt{'s' if n > 1 else ''} ({FILE})"]
  for part, seconds in summary["parts_s"].items():
    if seconds or part in ("steps", "compile", "startup"):
      lines.append(f"  {part.replace('_', ' '):<17} {seconds:9.1f} s  "
                   f"{100 * summary['fractions'][part]:5.1f}%")
  return lines


def _to_tensorboard(run_dir: Path, summary: dict, step: int) -> None:
  from tensorboardX import SummaryWriter
  writer = SummaryWriter(str(run_dir / "tensorboard"))
  try:
    for part, seconds in summary["parts_s"].items():
      writer.add_scalar(f"goodput/{part}_s", seconds, step)
    writer.add_scalar("goodput/fraction", summary["goodput"], step)
    writer.add_scalar("goodput/wall_s", summary["wall_s"], step)
  finally:
    writer.close()


def _last_logged_step(path: Path) -> int:
  """The step of the last row of metrics.jsonl (read from its end), 0 without one."""
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 65536))
      lines = f.read().splitlines()
  except OSError:
    return 0
  for line in reversed(lines):
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      continue
  return 0


def off() -> Recorder:
  """A recorder that times and writes nothing (the default of a Run built by hand)."""
  return Recorder(enabled=False)
