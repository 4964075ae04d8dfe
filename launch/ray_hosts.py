"""The Ray actor behind each host: it starts `launch.host` as a child process and reports.

A child rather than the actor's own process, because a process can join jax.distributed
only once: every attempt gets a fresh process with an environment built from scratch
(no JAX/XLA variables of an earlier attempt or of the driver's shell), and the actor can
kill it, and its whole process group, at once.
"""

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import launch
from launch import heartbeat

# Variables a host must not inherit: coordination settings of another job or attempt,
# and the cluster's secret, which a training process has no use for.
_DROPPED_PREFIXES = ("JAX_COORDINATOR", "JAX_PROCESS", "JAX_NUM_PROCESSES",
                     "JAX_LOCAL_DEVICE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def host_env(base: dict, devices: int, simulate: bool, extra: dict) -> dict:
  """The environment of one host process, built anew for every attempt."""
  env = {k: v for k, v in base.items()
         if not k.startswith(_DROPPED_PREFIXES) and k != "JAX_PLATFORMS"}
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
  if simulate:
    flags.append(f"{_DEVICE_FLAG}={devices}")
    env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = " ".join(flags)
  # Wherever the actor found `launch`, the child finds the same code.
  root = str(Path(launch.__file__).resolve().parents[1])
  env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
  env["PYTHONUNBUFFERED"] = "1"  # lines reach the driver as they are written
  env.update(extra)
  return env


def oom_counter(pid: int, root: str = "/sys/fs/cgroup") -> str | None:
  """The file in which the kernel counts OOM kills in `pid`'s memory cgroup, if readable.

  cgroup v2: `memory.events`; v1: `memory.oom_control`. Both have an `oom_kill N` line,
  counted in the cgroup of the process that was killed.
  """
  try:
    with open(f"/proc/{pid}/cgroup") as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  for line in lines:
    _, controllers, path = line.split(":", 2)
    if controllers == "":
      candidates = [f"{root}{path}/memory.events", f"{root}/unified{path}/memory.events"]
    elif "memory" in controllers.split(","):
      candidates = [f"{root}/memory{path}/memory.oom_control"]
    else:
      continue
    for candidate in candidates:
      if os.path.isfile(candidate) and oom_kills(candidate) is not None:
        return candidate
  return None


def oom_kills(counter: str | None) -> int | None:
  try:
    with open(counter) as f:
      for line in f:
        key, _, value = line.partition(" ")
        if key == "oom_kill":
          return int(value)
  except (OSError, TypeError, ValueError):
    pass
  return None


class HostActor:
  """Runs one host process per attempt; `poll` hands over its output and how it ended."""

  def __init__(self, rank: int):
    self.rank = rank
    self.proc = None
    self.lines = collections.deque(maxlen=20000)
    self.ended_at = None
    self.dir = tempfile.mkdtemp(prefix=f"scaler-host{rank}-")
    self.status_file = os.path.join(self.dir, "status.json")
    self.progress_file = os.path.join(self.dir, "progress.json")

  def address(self) -> tuple[str, int]:
    """This node's address and a port free on it (used by host 0, the coordinator)."""
    import ray
    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
      s.bind((ip, 0))
      return ip, s.getsockname()[1]

  def start(self, host_argv: list[str], devices: int, simulate: bool, extra_env: dict,
            cwd: str | None) -> int:
    env = host_env(dict(os.environ), devices, simulate, extra_env)
    argv = [sys.executable, "-m", "launch.host", "--status-file", self.status_file,
            "--progress-file", self.progress_file, *host_argv]
    self.started = time.time()
    self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    # Read now: once the process is gone, /proc no longer says where it was.
    self.oom_counter = oom_counter(self.proc.pid)
    self.oom_kills_before = oom_kills(self.oom_counter)
    self.pump = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
    self.pump.start()
    return self.proc.pid

  def _pump(self, pipe) -> None:
    # Chunks, not lines: a progress bar redraws with '\r' and ends its line only when it
    # closes. Each redraw becomes a line of its own, as it is drawn.
    tail = b""
    while chunk := os.read(pipe.fileno(), 65536):
      *parts, tail = (tail + chunk).replace(b"\r", b"\n").split(b"\n")
      self.lines.extend(t for t in (p.decode(errors="replace").rstrip() for p in parts) if t)
    if tail.strip():
      self.lines.append(tail.decode(errors="replace").rstrip())
    self.proc.wait()
    self.ended_at = time.time()  # which host ended first tells cause from consequence

  def poll(self) -> dict:
    """New output lines, the exit code (None while running), the status file, the host's
    heartbeat and, for a SIGKILL, how many OOM kills its memory cgroup saw meanwhile."""
    code = self.proc.poll() if self.proc else None
    if code is not None:
      self.pump.join(timeout=5)  # the last lines (a traceback, a stack dump) come too
      self.ended_at = self.ended_at or time.time()
    lines = []
    while self.lines:
      lines.append(self.lines.popleft())
    status, oom = None, None
    if code is not None and os.path.exists(self.status_file):
      status = json.loads(Path(self.status_file).read_text())
    if code == -signal.SIGKILL and self.oom_kills_before is not None:
      after = oom_kills(self.oom_counter)
      oom = None if after is None else after - self.oom_kills_before
    progress = (heartbeat.read(self.progress_file, self.proc.pid, self.started)
                if self.proc else None)
    return {"lines": lines, "code": code, "status": status, "ended_at": self.ended_at,
            "progress": progress, "oom_kills": oom}

  def stop(self, sig: int = signal.SIGKILL, grace_s: float = 10.0) -> int | None:
    """Signals the host's process group, SIGKILLs it after `grace_s`, cleans up."""
    if self.proc is not None:
      try:
        # The group, not just the host: whatever it started goes with it.
        os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=grace_s)
      except subprocess.TimeoutExpired:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
      except ProcessLookupError:
        self.proc.wait()
    shutil.rmtree(self.dir, ignore_errors=True)
    return self.proc.poll() if self.proc else None
