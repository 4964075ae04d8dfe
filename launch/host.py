"""One host of a multi-host job: the process a Ray actor starts, fresh for every attempt.

    python -m launch.host --rank 1 --hosts 2 --coordinator 127.0.0.1:4321 \
        --status-file /tmp/h1.json -- train configs/tiny_diffusion.yaml --run-dir runs/x

It joins `jax.distributed` with explicit timeouts, starts the step watchdog, then runs the
very `scaler train` path a single process runs. The exit code says how it ended (EXIT_*);
the details go to the status file, so that the driver shows a failure once, not N times.
The device count and platform come through the environment the actor built.
"""

import argparse
import ctypes
import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from launch import early_sigterm
from launch import heartbeat

EXIT_OK = 0
EXIT_CRASHED = 1          # an exception after the first step: restart
EXIT_USER_ERROR = 2       # bad input (scaler.errors.UserError): never restart
EXIT_STARTUP = 3          # an exception before the first step (import error, bug): never restart
EXIT_PREEMPTED = 42       # saved and committed on SIGTERM: restart, not a failure
EXIT_STALLED = 43         # the watchdog fired: restart

# jax.distributed timeouts, all explicit. Peers that die are caught by the launcher within
# a second or two; these only bound what the launcher cannot see (a lost driver).
HEARTBEAT_S = 30
SHUTDOWN_S = 60


def _parser():
  p = argparse.ArgumentParser(prog="python -m launch.host")
  p.add_argument("--rank", type=int, required=True)
  p.add_argument("--hosts", type=int, required=True)
  p.add_argument("--coordinator", required=True, help="host 0's address:port")
  p.add_argument("--status-file", required=True)
  p.add_argument("--progress-file", help="where the heartbeat goes (launch/heartbeat.py)")
  p.add_argument("--attempt", type=int, default=0)
  p.add_argument("--init-timeout", type=int, default=120)
  p.add_argument("--stall-timeout", type=float, default=300.0)
  p.add_argument("train_argv", nargs=argparse.REMAINDER, help="-- train CONFIG ...")
  return p


def _die_with_parent() -> None:
  """Dies with the actor that started this process, even when that one is SIGKILLed."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass  # not Linux: the actor's stop() still kills the process group


def _report(path, code: int, kind: str, message: str, **extra) -> None:
  """Writes how this host ended, then exits at once.

  os._exit skips jax.distributed's shutdown barrier, which would otherwise hold a failed
  host for SHUTDOWN_S while its peers are being torn down anyway.
  """
  step, _ = _progress().last()
  Path(path).write_text(json.dumps({"kind": kind, "message": message, "step": step, **extra}))
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _progress():
  from scaler import progress
  return progress


def _on_stall(status_file, stall_s):
  def on_stall(step, idle):
    where = f"after step {step}" if step >= 0 else "before the first step"
    print(f"watchdog: no step for {idle:.0f} s {where}; Python stacks follow", file=sys.stderr)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    _report(status_file, EXIT_STALLED, "stalled", f"stalled: no step for {idle:.0f} s {where}")
  return on_stall


def _inject_fault(rank: int, attempt: int) -> None:
  """SCALER_FAULT=KIND:RANK:STEP makes host RANK fail at STEP of the first attempt.

  For the launcher tests: KIND is kill (SIGKILL), stop (SIGSTOP: frozen, as a hung node),
  stall (sleep before the next step's collectives), raise (an exception), import (an
  ImportError at start-up) or startterm (SIGTERM at start-up); STEP is unused by the last
  two.
  """
  spec = os.environ.get("SCALER_FAULT")
  if not spec or attempt != 0:
    return
  kind, fault_rank, fault_step = spec.split(":")
  if int(fault_rank) != rank:
    return
  if kind == "import":
    raise ImportError("injected start-up fault (SCALER_FAULT)")
  if kind == "startterm":   # SIGTERM while the host starts, before JAX's notifier exists
    os.kill(os.getpid(), signal.SIGTERM)
    return
  progress = _progress()
  beat = progress.beat

  def faulty_beat(step):
    beat(step)
    if step == int(fault_step):
      if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
      elif kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
      elif kind == "term":
        os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier takes it; training goes on
      elif kind == "stall":
        time.sleep(1e9)
      elif kind == "raise":
        raise RuntimeError(f"injected fault at step {step} (SCALER_FAULT)")

  progress.beat = faulty_beat


def _init_distributed(a) -> None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=a.coordinator, num_processes=a.hosts, process_id=a.rank,
      # Bind to the node's own address (127.0.0.1 locally), never all interfaces.
      coordinator_bind_address=a.coordinator if a.rank == 0 else None,
      # Stale SLURM/OMPI/TPU variables must not override what the launcher decided.
      cluster_detection_method="deactivate",
      initialization_timeout=a.init_timeout, heartbeat_timeout_seconds=HEARTBEAT_S,
      shutdown_timeout_seconds=SHUTDOWN_S)


def _exit_if_preempted_at_start_up(status_file, jax_took_over: bool) -> None:
  """Exits 42 if a SIGTERM came before JAX's notifier (see launch/early_sigterm.py)."""
  if early_sigterm.hand_over(jax_took_over):
    _report(status_file, EXIT_PREEMPTED, "preempted",
            "preempted at start-up (SIGTERM before training began; nothing to save)")


def main(argv=None) -> None:
  a = _parser().parse_args(argv)
  early_sigterm.install()
  if a.progress_file:
    heartbeat.start(a.progress_file)
  train_argv = a.train_argv[1:] if a.train_argv[:1] == ["--"] else a.train_argv
  _die_with_parent()
  try:
    _inject_fault(a.rank, a.attempt)
    from launch import cli
    from scaler import config as config_lib
    args = cli._parser().parse_args(train_argv)
    cfg = config_lib.load(args.config, args.overrides)
  except Exception as e:  # noqa: BLE001 - anything here is a start-up failure
    _report(a.status_file, EXIT_STARTUP, "startup", f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc())

  if early_sigterm.received():   # no point in joining the group only to leave it
    _exit_if_preempted_at_start_up(a.status_file, False)
  try:
    _init_distributed(a)
  except Exception as e:  # noqa: BLE001 - a peer or the coordinator went away: retry
    if early_sigterm.received():
      _exit_if_preempted_at_start_up(a.status_file, False)
    _report(a.status_file, EXIT_CRASHED, "crashed",
            f"jax.distributed.initialize failed: {type(e).__name__}: {e}",
            traceback=traceback.format_exc())
  from scaler import checkpoint_preemption
  _exit_if_preempted_at_start_up(a.status_file, checkpoint_preemption.notifier_installed())

  from launch import commands
  from scaler.errors import UserError
  cli.configure_logging()
  ckpt_dir = cfg.checkpoint.directory or str(Path(args.run_dir) / "checkpoints")
  if "://" not in ckpt_dir:
    # The driver has checked the run directory once; without this, a slow host would see
    # host 0's fresh config.yaml, no checkpoints yet, and refuse the run directory.
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
  _progress().watch(a.stall_timeout, _on_stall(a.status_file, a.stall_timeout),
                    final_step=cfg.train.steps)
  try:
    code = commands.train(args)
  except UserError as e:
    _report(a.status_file, EXIT_USER_ERROR, "user_error", str(e))
  except BaseException as e:  # noqa: BLE001 - reported to the driver, which decides
    started = _progress().last()[0] >= 0
    _report(a.status_file, EXIT_CRASHED if started else EXIT_STARTUP,
            "crashed" if started else "startup", f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc())
  if code == EXIT_PREEMPTED:
    _report(a.status_file, EXIT_PREEMPTED, "preempted", "preempted; checkpoint committed")
  import jax
  jax.distributed.shutdown()  # every host leaves together once all are done
  sys.exit(code)


if __name__ == "__main__":
  main()
