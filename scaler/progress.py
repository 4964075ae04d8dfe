"""Step progress, observed from outside the collectives (by the launcher's watchdog).

The train loop calls `beat(step)` after each dispatched step. A watchdog thread in the
same process reads `last()` and can tell a host that is alive but stuck:

    progress.watch(stall_s=300, on_stall=dump_stacks_and_exit)

Stretches without steps get an allowance that follows the run rather than one fixed
figure: the driver announces each one (`expect("restore", restore_allowance(target))`,
`expect("compile", compile_allowance(last_compile_s))`) and the clock starts again.
"""

import faulthandler
import math
import threading
import time

SLOW_S = 600.0                # the floor of every allowance for a stretch without steps
RESTORE_BYTES_PER_S = 20e6    # a slow object store, per process: ~2 GB take 100 s more
COMPILE_FACTOR = 3.0          # a compile may take this many times the run's last one

_lock = threading.Lock()
_last = (-1, time.monotonic())
_expected = None              # (what, allowance_s, since) until the next beat
_limits = {"stall_s": None, "slow_s": SLOW_S, "final_step": None}


def beat(step: int) -> None:
  global _last, _expected
  with _lock:
    _last = (step, time.monotonic())
    _expected = None


def last() -> tuple[int, float]:
  """(last step, monotonic time it was reached); step -1 before the first one."""
  with _lock:
    return _last


def expect(what: str, allowance_s: float) -> None:
  """A stretch without steps starts now (a restore, the compile): the watchdog allows it
  `allowance_s` seconds from now, until the next beat."""
  global _expected
  with _lock:
    _expected = (what, float(allowance_s), time.monotonic())


def restore_allowance(abstract_state) -> float:
  """SLOW_S plus the time to read this process's shards of `abstract_state` (arrays with
  `.sharding`) at RESTORE_BYTES_PER_S."""
  nbytes = 0
  for leaf in _leaves(abstract_state):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      continue
    # Distinct shards only: a replicated array is read once per process, not per device.
    shards = {tuple((s.start, s.stop) for s in index)
              for index in sharding.addressable_devices_indices_map(leaf.shape).values()}
    nbytes += len(shards) * math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  return SLOW_S + nbytes / RESTORE_BYTES_PER_S


def compile_allowance(last_compile_s: float | None) -> float:
  """SLOW_S, or COMPILE_FACTOR times the run's last measured compile when that is more."""
  return max(SLOW_S, COMPILE_FACTOR * (last_compile_s or 0.0))


def _leaves(tree):
  import jax  # only here: the heartbeat thread looks this module up, never imports jax
  return jax.tree.leaves(tree)


def _limit(step: int, now: float) -> tuple[float, float, str]:
  """(seconds idle, seconds allowed, what the process is doing) as the watchdog sees it."""
  with _lock:
    (_, since), expected = _last, _expected
  stall_s, slow_s, final_step = _limits["stall_s"], _limits["slow_s"], _limits["final_step"]
  if expected is not None:
    what, allowance, started = expected
    return now - max(since, started), allowance, what
  if step < 0:
    return now - since, slow_s, "starting"
  if final_step is not None and step >= final_step:
    return now - since, slow_s, "finishing"
  return now - since, stall_s if stall_s is not None else slow_s, "training"


def allowance() -> tuple[float, str]:
  """(seconds allowed without a step right now, what for): what the heartbeat reports."""
  step, _ = last()
  _, allowed, what = _limit(step, time.monotonic())
  return allowed, what


def watch(stall_s: float, on_stall, *, slow_s: float = SLOW_S, final_step: int | None = None,
          poll_s: float = 0.5) -> threading.Thread:
  """Calls `on_stall(step, idle_s, what)` from a daemon thread when no step came in time.

  Between steps the allowance is `stall_s`. Before the first step (start-up) and after
  `final_step` (the last save, samples, plots) it is `slow_s`; a stretch announced with
  `expect` gets its own allowance.
  """
  _limits.update(stall_s=stall_s, slow_s=slow_s, final_step=final_step)

  def run():
    while True:
      step, _ = last()
      idle, allowed, what = _limit(step, time.monotonic())
      if idle > allowed:
        on_stall(step, idle, what)
        return
      # Backstop for a thread that cannot run at all (the GIL held in C code): the C-level
      # timer dumps every stack and exits unless this loop re-arms it in time.
      faulthandler.dump_traceback_later(max(stall_s, slow_s, allowed) + 60, exit=True)
      time.sleep(poll_s)

  thread = threading.Thread(target=run, name="scaler-watchdog", daemon=True)
  thread.start()
  return thread
