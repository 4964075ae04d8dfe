"""SIGTERM in the first seconds of a training process: a preemption, not a crash.

JAX's preemption notifier, installed by `jax.distributed.initialize`, turns SIGTERM into a
step every process agrees to stop at. Before it exists (Python starting, jax importing,
the config loading, the hosts joining: one to several seconds) SIGTERM's default action
killed the process with -15, which the launcher counted as a failure.

    early_sigterm.install()              # first thing: the handler only records
    ... jax.distributed.initialize ...   # JAX's notifier replaces it at the OS level
    if early_sigterm.hand_over(checkpoint_preemption.notifier_installed()):
      exit 42                            # preempted, resumable

Exiting at once is right for a resumable run: nothing has been trained yet, so there is
nothing to save, and a restart resumes from the last committed checkpoint, as after any
preemption. Waiting for JAX's sync point instead would spend the grace period compiling.
Nothing here calls `signal.signal` once JAX's notifier is in place: that would replace it
and silently disable the sync point.
"""

import signal

_state = {"installed": False, "received": False, "previous": signal.SIG_DFL}


def _record(signum, frame):
  _state["received"] = True


def install() -> None:
  _state["previous"] = signal.signal(signal.SIGTERM, _record)
  _state["installed"] = True


def received() -> bool:
  return _state["received"]


def hand_over(jax_took_over: bool) -> bool:
  """After `jax.distributed.initialize`: True if a SIGTERM came before JAX's notifier.

  When JAX installed no notifier (its preemption service off, or JAX started before the
  runtime could), the previous handler comes back, so a later SIGTERM acts as before.
  """
  if _state["installed"] and not jax_took_over:
    signal.signal(signal.SIGTERM, _state["previous"])
  _state["installed"] = False
  return _state["received"]


def release() -> None:
  """Puts the previous handler back if nothing took over (an error before `hand_over`)."""
  if _state["installed"]:
    signal.signal(signal.SIGTERM, _state["previous"])
    _state["installed"] = False
