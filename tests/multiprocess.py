"""Real multi-process JAX on this machine without Ray: N `launch.host` processes on
127.0.0.1 over gloo, each with K simulated CPU devices, one global mesh."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_hosts(train_argv, *, hosts=2, devices=2, tmp_path, timeout=300):
  """Runs `scaler train ...` as `hosts` processes; returns their CompletedProcess-likes."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SCALER_FAULT")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  coordinator = f"127.0.0.1:{free_port()}"
  procs = []
  for rank in range(hosts):
    argv = [sys.executable, "-m", "launch.host", "--rank", str(rank), "--hosts", str(hosts),
            "--coordinator", coordinator, "--status-file", str(tmp_path / f"status{rank}.json"),
            "--", *train_argv]
    procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      outs.append((p.returncode, out))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs
