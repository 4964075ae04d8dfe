"""Preemption (SIGTERM) detection agreed by every process, through JAX's sync point.

`multihost_utils.reached_preemption_sync_point(step)` answers from JAX's distributed
runtime: its C++ preemption notifier catches SIGTERM, tells every process, and they agree
on the first step all of them can stop at. Without a distributed client it returns False
forever, so a single process must start one too:

    from scaler import checkpoint_preemption
    checkpoint_preemption.start_runtime()   # before anything touches jax.devices()

Preconditions, all checked here by running them:
  * `jax.distributed.initialize` has run, before any JAX call that starts the backend
    (otherwise it raises). One process runs it against itself on 127.0.0.1.
  * `jax_enable_preemption_service` is on (JAX's default).
  * Every process calls `reached(step)` at every step, with the same step numbers.
  * No Python SIGTERM handler is installed afterwards: `signal.signal(SIGTERM, ...)`
    replaces the notifier's handler and the sync point then never fires.
The agreed step comes some steps after the signal (the notice travels through the
coordination service), so the loop keeps training until `reached` says True.
"""

import logging
import os
import signal
import socket

import jax
from jax._src import distributed
from jax._src import xla_bridge
from jax.experimental import multihost_utils

from scaler.errors import UserError

log = logging.getLogger("scaler")


def runtime_started() -> bool:
  # There is no public query for the client in jax 0.10; `is_initialized` is the
  # closest and exists only in some versions.
  return distributed.global_state.client is not None


def notifier_installed() -> bool:
  """True once JAX's preemption notifier handles SIGTERM (it has replaced any handler
  installed before `jax.distributed.initialize`, e.g. `launch.early_sigterm`'s)."""
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_runtime() -> None:
  """Starts a one-process distributed runtime, so that SIGTERM reaches the sync point.

  Multi-process launches call `jax.distributed.initialize` with their own cluster
  arguments instead; this is for a single process and does nothing once a runtime is up.
  """
  if runtime_started():
    return
  if xla_bridge.backends_are_initialized():
    # Called in a process that has already run JAX (a notebook, in-process tests): it
    # trains normally, but SIGTERM cannot reach the sync point. Not the CLI's case.
    log.debug("JAX was started before scaler could start its one-process runtime: "
                "SIGTERM will not trigger a coordinated save in this process")
    return
  # One process needs no cross-process collectives. Left at JAX's default (gloo), XLA:CPU
  # routes every collective between the simulated devices through gloo sockets once a
  # distributed client exists: 3-4x slower steps in debug mode.
  jax.config.update("jax_cpu_collectives_implementation", None)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{_free_port()}",
                             num_processes=1, process_id=0)


def forward_signal(name: str | None) -> None:
  """Makes signal `name` (e.g. "SIGUSR1", a scheduler's warning) a preemption notice.

  The handler re-sends the signal as SIGTERM to this process, so it reaches JAX's
  notifier, whose own SIGTERM handler stays in place.
  """
  if name is None:
    return
  signum = _signal_number(name)
  signal.signal(signum, lambda *_: os.kill(os.getpid(), signal.SIGTERM))


def _signal_number(name: str) -> int:
  allowed = ("SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT", "SIGXCPU")
  if name.upper() not in allowed:
    raise UserError(f"checkpoint.preemption_signal={name!r} is not accepted: one of "
                    f"{', '.join(allowed)} (SIGTERM is always caught)")
  return getattr(signal, name.upper())


def reached(step: int) -> bool:
  """True once every process has agreed to stop at `step` after a preemption notice."""
  return bool(multihost_utils.reached_preemption_sync_point(step))
