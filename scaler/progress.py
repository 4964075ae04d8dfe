"""Step progress, observed from outside the collectives (by the launcher's watchdog).

The train loop calls `beat(step)` after each dispatched step. A watchdog thread in the
same process reads `last()` and can tell a host that is alive but stuck:

    progress.watch(stall_s=300, on_stall=dump_stacks_and_exit)
"""

import faulthandler
import threading
import time

_lock = threading.Lock()
_last = (-1, time.monotonic())


def beat(step: int) -> None:
  global _last
  with _lock:
    _last = (step, time.monotonic())


def last() -> tuple[int, float]:
  """(last step, monotonic time it was reached); step -1 before the first one."""
  with _lock:
    return _last


def watch(stall_s: float, on_stall, *, slow_s: float = 600.0, final_step: int | None = None,
          poll_s: float = 0.5) -> threading.Thread:
  """Calls `on_stall(step, idle_s)` from a daemon thread when no step came for `stall_s`.

  Before the first step (compile, restore) and after `final_step` (the last save,
  samples, plots) the allowance is `slow_s` instead: those stretches have no beats.
  """
  def limit(step):
    return slow_s if step < 0 or (final_step is not None and step >= final_step) else stall_s

  def run():
    while True:
      step, since = last()
      idle = time.monotonic() - since
      if idle > limit(step):
        on_stall(step, idle)
        return
      # Backstop for a thread that cannot run at all (the GIL held in C code): the C-level
      # timer dumps every stack and exits unless this loop re-arms it in time.
      faulthandler.dump_traceback_later(max(stall_s, slow_s) + 60, exit=True)
      time.sleep(poll_s)

  thread = threading.Thread(target=run, name="scaler-watchdog", daemon=True)
  thread.start()
  return thread
