"""A host's signs of life, seen from outside its process.

The host process writes its last step into a small file twice a second, from a thread of
its own; the Ray actor that started it reads the file and the process's state from
/proc. A process that stops (SIGSTOP, a hung node) stops writing: its watchdog thread
cannot report, but the file's age does. Its peers, blocked inside collectives with it,
keep writing and stop stepping, so "silent" tells the frozen host from the stuck ones.

    heartbeat.start(path)     # in the host process, first thing
    heartbeat.read(path, pid) # in the actor: step, seconds since it, seconds of silence
"""

import json
import os
import sys
import threading
import time

PERIOD_S = 0.5


def _last_step() -> tuple[int, float]:
  """(step, wall time it was reached), once the train loop's progress module is loaded.

  Looked up, never imported here: importing scaler takes seconds and, from this thread,
  would race the main thread's imports.
  """
  last = getattr(sys.modules.get("scaler.progress"), "last", None)  # None mid-import too
  if last is None:
    return -1, time.time()
  step, since = last()
  return step, time.time() - (time.monotonic() - since)


def start(path: str) -> threading.Thread:
  started = time.time()

  def run():
    tmp = f"{path}.tmp"
    while True:
      try:
        step, at = _last_step()
        with open(tmp, "w") as f:
          json.dump({"step": step, "step_at": at if step >= 0 else started,
                     "written_at": time.time()}, f)
        os.replace(tmp, path)    # whole files only: the reader never sees half of one
      except Exception:  # noqa: BLE001, S110 - a beat missed (a full disk) must not end the beats
        pass
      time.sleep(PERIOD_S)

  thread = threading.Thread(target=run, name="scaler-heartbeat", daemon=True)
  thread.start()
  return thread


def _state(pid: int) -> str:
  """The kernel's one-letter state of `pid` (R, S, D, T stopped, t traced, Z), or ''."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except (OSError, IndexError):
    return ""


def read(path: str, pid: int, started: float) -> dict:
  """What the actor reports: ages on this node's clock, so that nodes may disagree."""
  now = time.time()
  try:
    with open(path) as f:
      beat = json.load(f)
  except (OSError, ValueError):
    beat = {"step": -1, "step_at": started, "written_at": started}
  return {"step": beat["step"], "step_age_s": now - beat["step_at"],
          "silent_s": now - beat["written_at"], "state": _state(pid)}
