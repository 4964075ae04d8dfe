"""Step progress, observed from outside the collectives (by the launcher's watchdog).

The train loop calls `beat(step)` after each dispatched step. A watchdog thread in the
same process reads `last()` and can tell a host that is alive but stuck.
"""

import threading
import time

_lock = threading.Lock()
_last = (-1, time.monotonic())


def beat(step: int) -> None:
  global _last
  with _lock:
    _last = (step, time.monotonic())


def last() -> tuple[int, float]:
  """(last step, monotonic time it was reached)."""
  with _lock:
    return _last
