"""The launcher's pieces without Ray: the host's environment, which host caused a failure,
how a SIGKILL is described, the heartbeat seen from outside, and SIGTERM at start-up."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch import heartbeat, ray_hosts
from launch.ray_launcher import Attempt, Outcome, _classify, root_cause

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_diffusion.yaml")


def test_host_env_is_built_afresh():
  stale = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1",
           "JAX_PLATFORMS": "cuda", "JAX_COORDINATOR_ADDRESS": "10.0.0.9:1",
           "JAX_PROCESS_ID": "3", "RAY_AUTH_TOKEN": "secret", "HOME": "/root"}
  env = ray_hosts.host_env(stale, devices=2, simulate=True, extra={"SCALER_FAULT": "x"})
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
  assert env["JAX_PLATFORMS"] == "cpu" and env["HOME"] == "/root"
  assert env["SCALER_FAULT"] == "x"
  for gone in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID", "RAY_AUTH_TOKEN"):
    assert gone not in env
  gpu = ray_hosts.host_env(stale, devices=8, simulate=False, extra={})
  assert "JAX_PLATFORMS" not in gpu and gpu["XLA_FLAGS"] == "--xla_foo=1"


def test_root_cause_is_the_frozen_host_the_stuck_one_or_the_first_to_end():
  stuck = Outcome("stalled", 1, step=15, ended_at=2.0)
  blocked = Outcome("stalled", 0, step=23, ended_at=1.9)
  assert root_cause([blocked, stuck]) is stuck
  # A frozen host does not report; its peers stall after it, possibly at lower steps.
  frozen = Outcome("frozen", 1, step=30, ended_at=2.5)
  assert root_cause([blocked, stuck, frozen]) is frozen
  killed = Outcome("killed", 0, ended_at=1.0)
  aborted = Outcome("killed", 1, ended_at=1.3)  # JAX's SIGABRT once its peer is gone
  assert root_cause([aborted, killed]) is killed
  preempted = Outcome("preempted", 1, step=20, ended_at=0.5)
  assert root_cause([preempted, aborted]) is aborted
  assert root_cause([preempted]) is preempted
  # Preempted at start-up (no step yet) and gone first: its peers fail for want of it.
  at_start = Outcome("preempted", 1, step=-1, ended_at=0.5)
  assert root_cause([at_start, aborted]) is at_start
  assert root_cause([killed, Outcome("preempted", 1, step=-1, ended_at=1.2)]) is killed


def test_after_a_failure_the_peers_native_stack_traces_are_cut(capsys):
  # What a worker prints when its coordinator is killed: JAX's fatal error, then glog's
  # native stack trace. The cause's own lines are kept whole.
  attempt = Attempt.__new__(Attempt)
  attempt.args = type("Args", (), {"hosts": 2})()
  fatal = [("F1203 client.h:80] Terminating process because the JAX distributed service "
            "detected fatal errors."), "*** Check failure stack trace: ***"] + [
               f"    @     0x7f00{i:08x}  xla::Fn{i}()" for i in range(40)]
  attempt.held = [(1, line) for line in fatal] + [(0, "    @     0x7f0000000001  cause()")]
  attempt._print_held(Outcome("killed", 0, "was killed by SIGKILL"))
  out = capsys.readouterr().out.splitlines()
  assert out == ["[host 1] " + fatal[0],
                 "[host 0]     @     0x7f0000000001  cause()",
                 "[host 1] (41 lines of a native stack trace not shown)"], out


def test_sigkill_is_called_out_of_memory_only_when_the_oom_killer_ran():
  assert _classify(1, -9, None, 1.0, oom_kills=1).message == (
      "was killed by SIGKILL (out of memory: the kernel's OOM killer ran in its cgroup)")
  for unknown_or_none in (None, 0):
    assert _classify(1, -9, None, 1.0, oom_kills=unknown_or_none).message == (
        "was killed by SIGKILL")
  assert _classify(1, -6, None, 1.0).message == "was killed by SIGABRT"


def test_oom_kills_are_read_from_the_process_cgroup(tmp_path):
  # A copy of this process's cgroup paths under tmp_path, v1 and v2 files alike.
  for line in Path(f"/proc/{os.getpid()}/cgroup").read_text().splitlines():
    _, controllers, path = line.split(":", 2)
    if controllers == "":
      target = tmp_path / path.lstrip("/") / "memory.events"
      content = "low 0\nhigh 0\nmax 2\noom 1\noom_kill 3\n"
    elif "memory" in controllers.split(","):
      target = tmp_path / "memory" / path.lstrip("/") / "memory.oom_control"
      content = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    else:
      continue
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content)
  counter = ray_hosts.oom_counter(os.getpid(), root=str(tmp_path))
  assert counter is not None and ray_hosts.oom_kills(counter) == 3
  assert ray_hosts.oom_counter(os.getpid(), root=str(tmp_path / "none")) is None
  assert ray_hosts.oom_kills(None) is None


_BEATING = """
import sys, time
from launch import heartbeat
heartbeat.start(sys.argv[1])
time.sleep(120)
"""


def test_heartbeat_shows_a_stopped_process_from_outside(tmp_path):
  path = str(tmp_path / "progress.json")
  started = time.time()
  proc = subprocess.Popen([sys.executable, "-c", _BEATING, path], cwd=ROOT)
  try:
    deadline = time.time() + 60
    while not os.path.exists(path) and time.time() < deadline:
      time.sleep(0.1)
    time.sleep(1)
    alive = heartbeat.read(path, proc.pid, started)
    assert alive["step"] == -1 and alive["silent_s"] < 1.5 and alive["state"] in "RS"
    proc.send_signal(signal.SIGSTOP)
    time.sleep(2)
    stopped = heartbeat.read(path, proc.pid, started)
    assert stopped["silent_s"] > 1.4 and stopped["state"] == "T", stopped
  finally:
    proc.kill()
    proc.wait()


def _catches_sigterm(pid: int) -> bool:
  for line in Path(f"/proc/{pid}/status").read_text().splitlines():
    if line.startswith("SigCgt:"):
      return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
  return False


def _jax_loaded(pid: int) -> bool:
  return "jaxlib" in Path(f"/proc/{pid}/maps").read_text()


def test_sigterm_during_start_up_is_a_preemption(tmp_path):
  # Before jax.distributed.initialize installs JAX's notifier, SIGTERM killed the
  # process (-15), a failure to a launcher; nothing was trained, so it is a preemption.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen([sys.executable, "-m", "launch", "train", TINY, "--debug",
                           "--run-dir", str(tmp_path / "run")], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while not _catches_sigterm(proc.pid) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  early = not _jax_loaded(proc.pid)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert early, "SIGTERM was caught only once JAX was loaded"
  assert proc.returncode == 42, (proc.returncode, err[-2000:])
  assert "preempted during start-up" in out and "Traceback" not in err
  assert not (tmp_path / "run" / "checkpoints").exists()   # nothing started, nothing saved
