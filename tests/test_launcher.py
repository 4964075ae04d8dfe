"""The multi-host launcher through Ray, on this machine: N host processes x K CPU devices.

Every job here is a real `python -m launch train ... --hosts N` with its own local Ray
instance and real jax.distributed processes on 127.0.0.1; faults are injected with
SCALER_FAULT=KIND:HOST:STEP (first attempt only, see launch/host.py).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest


ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_diffusion.yaml")
# Long enough to kill mid-run after the step-10 save; short for two cores.
RUN = ["train.steps=30", "checkpoint.every=10", "train.log_every=5"]
TWO_HOSTS = ["--hosts", "2", "--devices-per-host", "2"]


def scaler_train(*args, fault=None, timeout=420):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SCALER_FAULT")}
  if fault:
    env["SCALER_FAULT"] = fault
  t0 = time.monotonic()
  out = subprocess.run([sys.executable, "-m", "launch", "train", TINY, *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=timeout)
  out.seconds = time.monotonic() - t0
  out.all = out.stdout + out.stderr
  return out


def losses(run_dir):
  rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["denoiser/loss"] for r in rows}


def final_params(run_dir, step=30):
  import jax
  import orbax.checkpoint as ocp

  state_dir = Path(run_dir) / "checkpoints" / str(step) / "state"
  with ocp.PyTreeCheckpointer() as reader:
    tree = reader.metadata(state_dir).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
    return reader.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": tree["params"]}, restore_args={"params": args},
        partial_restore=True))["params"]


def assert_bitwise_equal(a, b):
  import jax
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    assert np.array_equal(np.asarray(x), np.asarray(y)), "parameters differ after the restart"


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
  """The uninterrupted 2 hosts x 2 devices run every other run is compared with."""
  run_dir = tmp_path_factory.mktemp("launcher") / "two_hosts"
  out = scaler_train(*RUN, *TWO_HOSTS, "--run-dir", str(run_dir))
  assert out.returncode == 0, out.all[-5000:]
  return run_dir, out


# --- the launch path ---


@pytest.mark.ray
def test_two_hosts_train_like_one_process_with_four_devices(two_hosts, tmp_path):
  run_dir, out = two_hosts
  one = scaler_train(*RUN, "--debug", "--devices", "4", "--run-dir", str(tmp_path / "one"))
  assert one.returncode == 0, one.all[-3000:]
  multi, single = losses(run_dir), losses(tmp_path / "one")
  assert sorted(multi) == sorted(single) == [5, 10, 15, 20, 25, 30]
  np.testing.assert_allclose([multi[s] for s in sorted(multi)],
                             [single[s] for s in sorted(single)], rtol=1e-5,
                             err_msg="2 hosts x 2 devices diverge from 1 process x 4 devices")
  # Each host's lines reach the driver under its rank; the driver prints the result.
  assert "[host 0] " in out.stdout and "[host 1] " in out.stdout
  assert any(l.startswith("scaler: done at step 30") for l in out.stdout.splitlines())


@pytest.mark.ray
@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_hosts(two_hosts, tmp_path):
  # Saved by 1 process x 8 devices at step 10, continued by 2 processes x 2 devices:
  # each array read into its new sharding, the data position kept (the loader is keyed
  # on the step, so the host count does not matter).
  run_dir = tmp_path / "elastic"
  first = scaler_train("train.steps=10", "checkpoint.every=10", "train.log_every=5", "--debug",
                       "--run-dir", str(run_dir))
  assert first.returncode == 0, first.all[-3000:]
  out = scaler_train(*RUN, *TWO_HOSTS, "--run-dir", str(run_dir))
  assert out.returncode == 0, out.all[-5000:]
  assert "scaler: resumed from step 10" in out.stdout
  got, want = losses(run_dir), losses(two_hosts[0])
  np.testing.assert_allclose([got[s] for s in (15, 20, 25, 30)],
                             [want[s] for s in (15, 20, 25, 30)], rtol=1e-5)
  for a, b in zip(*(jax_leaves(final_params(d)) for d in (run_dir, two_hosts[0]))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# --- recovery ---


@pytest.mark.ray
@pytest.mark.parametrize("host", [1, pytest.param(0, marks=pytest.mark.slow)],
                         ids=["worker", "coordinator"])
def test_killed_host_restarts_from_checkpoint_bitwise(two_hosts, tmp_path, host):
  out = scaler_train(*RUN, *TWO_HOSTS, "--max-failures", "1", "--run-dir", str(tmp_path / "r"),
                     fault=f"kill:{host}:25")
  assert out.returncode == 0, out.all[-5000:]
  assert f"host {host} was killed by SIGKILL;" in out.stderr   # not "out of memory"
  assert "attempt 2:" in out.stderr and "attempt 3:" not in out.stderr
  # The peer's fatal error when its coordinator vanished: no native stack trace buries
  # the launcher's summary.
  assert not re.search(r"\] +@ +0x[0-9a-f]+", out.stdout), out.stdout[-3000:]
  # From the last committed save: 20, or 10 when step 20's async commit (a barrier of
  # both hosts) had not finished when the host died. Never from scratch.
  resumed = re.findall(r"\[host \d\] .* scaler: resumed from step (\d+)", out.stdout)
  assert len(resumed) == 2 and set(resumed) <= {"10", "20"}, out.stdout[-3000:]
  assert_bitwise_equal(final_params(tmp_path / "r"), final_params(two_hosts[0]))


@pytest.mark.ray
@pytest.mark.slow
def test_preemption_restarts_without_spending_a_failure(two_hosts, tmp_path):
  # SIGTERM on host 1: both hosts agree on a step, save it and exit 42; with
  # --max-failures 0 the job can only finish if that restart is not counted.
  run_dir = tmp_path / "p"
  out = scaler_train(*RUN, *TWO_HOSTS, "--max-failures", "0", "--run-dir", str(run_dir),
                     fault="term:1:15")
  assert out.returncode == 0, out.all[-5000:]
  assert "was preempted; restarting (preemption 1, not a failure)" in out.stderr
  assert "attempt 2:" in out.stderr and "attempt 3:" not in out.stderr
  resumed = re.findall(r"\[host \d\] .* scaler: resumed from step (\d+)", out.stdout)
  assert len(resumed) == 2 and len(set(resumed)) == 1 and int(resumed[0]) >= 15, out.stdout
  assert_bitwise_equal(final_params(run_dir), final_params(two_hosts[0]))


@pytest.mark.ray
@pytest.mark.slow
def test_stuck_host_is_named_dumped_and_restarted(tmp_path):
  out = scaler_train(*RUN, *TWO_HOSTS, "--stall-timeout", "5", "--run-dir", str(tmp_path / "s"),
                     fault="stall:1:15")
  assert out.returncode == 0, out.all[-5000:]
  assert "[host 1] watchdog: no step for" in out.stdout
  assert "faulty_beat" in out.stdout  # host 1's Python stack, where it is stuck
  assert "host 1 stalled: no step for" in out.stderr
  assert "attempt 2:" in out.stderr


@pytest.mark.ray
@pytest.mark.parametrize("host", [1, pytest.param(0, marks=pytest.mark.slow)],
                         ids=["worker", "coordinator"])
def test_frozen_host_is_named_and_the_job_completes_bitwise(two_hosts, tmp_path, host):
  # SIGSTOP: the frozen process's own watchdog cannot run; its peer stalls inside a
  # collective. The launcher sees the silence from outside and names the frozen host.
  out = scaler_train(*RUN, *TWO_HOSTS, "--stall-timeout", "5", "--run-dir", str(tmp_path / "z"),
                     fault=f"stop:{host}:15")
  assert out.returncode == 0, out.all[-5000:]
  other = 1 - host
  named = re.search(rf"scaler: host {host} froze after step (\d+): no sign of life for "
                    rf"\d+ s \(its process is stopped, as by SIGSTOP\) \(the others at "
                    rf"steps (\d+) on host {other}\); restarting", out.stderr)
  assert named and 0 < int(named[1]) <= 15 <= int(named[2]), out.stderr
  assert f"host {other} stalled" not in out.stderr and "watchdog:" not in out.stdout
  assert "attempt 2:" in out.stderr and "attempt 3:" not in out.stderr
  assert_bitwise_equal(final_params(tmp_path / "z"), final_params(two_hosts[0]))


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_while_a_host_starts_is_a_preemption(two_hosts, tmp_path):
  # --max-failures 0: the job finishes only if the restart is not counted as a failure.
  out = scaler_train(*RUN, *TWO_HOSTS, "--max-failures", "0", "--run-dir", str(tmp_path / "t"),
                     fault="startterm:1:0")
  assert out.returncode == 0, out.all[-5000:]
  assert ("host 1 was preempted at start-up (SIGTERM before training began; nothing to save); "
          "restarting (preemption 1, not a failure)") in out.stderr, out.stderr
  assert_bitwise_equal(final_params(tmp_path / "t"), final_params(two_hosts[0]))


@pytest.mark.ray
def test_max_failures_exhausted_exits_with_the_cause(tmp_path):
  out = scaler_train(*RUN, *TWO_HOSTS, "--max-failures", "0", "--run-dir", str(tmp_path / "f"),
                     fault="raise:1:12")
  assert out.returncode == 1, out.all[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert "giving up: 1 failure(s), --max-failures 0" in last
  assert "host 1 failed" in last and "injected fault at step 12" in last


# --- an existing cluster ---


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
  """A Ray head started the way a cluster admin would, on loopback, with the job API."""
  gcs, dash = _free_port(), _free_port()
  temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # socket paths: at most 107 bytes
  env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
  env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
  start = subprocess.run(
      ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
       "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
       "--dashboard-port", str(dash), "--temp-dir", temp_dir],
      env=env, capture_output=True, text=True, timeout=120)
  assert start.returncode == 0, start.stdout + start.stderr
  try:
    yield env, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
  finally:
    subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_existing_cluster_by_address_and_by_job_submit(ray_cluster, tmp_path):
  env, gcs, dashboard = ray_cluster
  args = ["train", TINY, *RUN, *TWO_HOSTS]
  direct = subprocess.run([sys.executable, "-m", "launch", *args, "--address", gcs,
                           "--run-dir", str(tmp_path / "direct")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert direct.returncode == 0, (direct.stdout + direct.stderr)[-4000:]
  assert "scaler: Ray connected" in direct.stderr
  # `ray job submit` ships the code only (no runtime_env packages): the job's driver
  # finds the cluster through RAY_ADDRESS, which Ray sets for it.
  job = subprocess.run(
      ["ray", "job", "submit", "--address", dashboard, "--working-dir", str(ROOT), "--",
       "python", "-m", "launch", *args, "--run-dir", str(tmp_path / "job")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
  assert "scaler: done at step 30" in job.stdout
  np.testing.assert_allclose([losses(tmp_path / "job")[s] for s in (10, 20, 30)],
                             [losses(tmp_path / "direct")[s] for s in (10, 20, 30)], rtol=1e-5)


# --- bad input ---


@pytest.mark.ray
def test_startup_failure_shows_one_traceback_and_no_restart(tmp_path):
  out = scaler_train(*TWO_HOSTS, "--run-dir", str(tmp_path / "i"), fault="import:1:0")
  assert out.returncode == 1, out.all[-3000:]
  assert out.all.count("Traceback (most recent call last)") == 1, out.all
  assert "host 1 failed at start-up: ImportError" in out.stderr
  assert "attempt 2:" not in out.stderr


@pytest.mark.ray
def test_bad_config_on_the_hosts_is_one_user_error(tmp_path):
  out = scaler_train("mesh.fsdp=3", *TWO_HOSTS, "--run-dir", str(tmp_path / "m"))
  assert out.returncode == 2, out.all[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("scaler: error:")]
  assert len(errors) == 1 and "mesh" in errors[0], out.stderr
  assert "Traceback" not in out.all and "attempt 2:" not in out.stderr


@pytest.mark.ray
def test_more_hosts_than_the_machine_is_a_clear_error_within_a_minute(tmp_path):
  out = scaler_train("--hosts", "64", "--run-dir", str(tmp_path / "h"), timeout=90)
  assert out.returncode == 2, out.all[-3000:]
  assert "64 hosts need 64 bundles of {CPU: 1}" in out.stderr
  assert out.seconds < 60


def test_unreachable_address_is_a_clear_error(tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # nothing listens here once the socket is closed
  out = scaler_train(*TWO_HOSTS, "--address", f"127.0.0.1:{port}",
                     "--run-dir", str(tmp_path / "u"), timeout=60)
  assert out.returncode == 2
  assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in out.stderr
  assert out.seconds < 30


@pytest.mark.parametrize("flag", [["--hosts", "0"], ["--hosts", "2", "--max-failures", "-1"]])
def test_bad_launcher_arguments(flag, tmp_path):
  out = scaler_train(*flag, "--run-dir", str(tmp_path / "a"), timeout=60)
  assert out.returncode == 2 and "scaler: error: --" in out.stderr


# --- security ---

_PRIVATE = """
import glob, json, os, subprocess, sys, time, urllib.error, urllib.request
from launch import ray_cluster
ray_cluster.connect(None, 1)
import grpc, psutil, ray
ray.get(ray.remote(lambda: 1).remote())   # workers up too

def listening():
  found, me = {}, psutil.Process()
  for p in [me] + me.children(recursive=True):
    try:
      for c in p.net_connections("inet"):
        if c.status == "LISTEN":
          found[(c.laddr.ip, c.laddr.port)] = p
    except psutil.Error:
      pass
  return found

# Metrics servers start last: wait until the set of ports has held for 2 s.
ports, stable, deadline = {}, 0, time.time() + 30
while stable < 4 and time.time() < deadline:
  time.sleep(0.5)
  now = listening()
  stable, ports = (stable + 1 if now.keys() == ports.keys() else 0), now

def http(host, port):
  for path in ("/", "/metrics", "/api/version"):
    try:
      with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=3) as r:
        return f"HTTP {r.status} on {path}"
    except Exception:   # 401, or not HTTP/1 at all (gRPC)
      pass

RPCS = ["NodeInfoGcsService/GetAllNodeInfo", "NodeManagerService/GetNodeStats",
        "CoreWorkerService/NumPendingTasks", "ReporterService/ReportOCMetrics",
        "ObjectManagerService/FreeObjects"]

def rpc(host, port):
  with grpc.insecure_channel(f"{host}:{port}") as channel:
    for method in RPCS:
      try:
        channel.unary_unary(f"/ray.rpc.{method}")(b"", timeout=3)
        return f"gRPC {method}"
      except grpc.RpcError:   # UNAUTHENTICATED, or not this server's service
        pass

answering, dashboard = [], False
for (ip, port), p in ports.items():
  host = "[::1]" if ip == "::1" else ip.replace("::ffff:", "")
  what = http(host, port) or rpc(host, port)
  if what:
    answering.append(f"{p.name()} on port {port}: {what}")
  try:
    cmd = p.cmdline()   # Ray keeps a head process for its own APIs; the web UI is its frontend
    dashboard |= port == 8265 or (
        any(a.endswith("dashboard/dashboard.py") for a in cmd) and "--disable-frontend" not in cmd)
  except psutil.Error:
    pass
gcs = ray.get_runtime_context().gcs_address
env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
intruder = subprocess.Popen([sys.executable, "-c", f"import ray; ray.init(address='{gcs}')"],
                            env=env, stderr=subprocess.PIPE, text=True)
rejected = any("InvalidAuthToken" in line for line in intruder.stderr)
intruder.kill()
session_root = ray_cluster._session_root[0]
ray_cluster.disconnect()
print(json.dumps({"listening": sorted({ip for ip, _ in ports}), "ports": len(ports),
                  "answering": answering, "rejected": rejected, "dashboard": dashboard,
                  "left_behind": [p for p in [session_root] if p and os.path.exists(p)]
                                 + glob.glob(f"/tmp/ray/session_*_{os.getpid()}")}))
"""


@pytest.mark.ray
def test_local_ray_is_loopback_only_and_nothing_answers_without_the_token():
  env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
  proc = subprocess.Popen([sys.executable, "-c", _PRIVATE], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    report = json.loads(proc.communicate(timeout=120)[0].strip().splitlines()[-1])
  finally:
    if proc.poll() is None:
      proc.kill()
  assert report["listening"] and all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1")
                                     for ip in report["listening"]), report
  assert report["ports"] >= 5, report       # GCS, raylet, agents, workers: all probed
  assert report["answering"] == [], "answers without the token: " + "; ".join(
      report["answering"])
  assert report["rejected"], "a client without the token was not refused"
  assert not report["dashboard"]
  assert report["left_behind"] == [], report   # the session directory goes with Ray
