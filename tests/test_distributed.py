"""Multi-host training without Ray: the job from flags or from the scheduler's environment
(launch/distributed.py), bad input, and the hybrid (DCN x ICI) mesh.

The slow tests start two real `scaler train` processes by hand on 127.0.0.1, once with
--coordinator/--num-processes/--process-id and once with SLURM's variables, and compare
their losses with one process of four devices.
"""

import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from launch import distributed
from scaler import config as config_lib
from scaler import mesh as mesh_lib
from scaler import run_dir as run_dir_lib
from scaler.errors import UserError
from multiprocess import free_port
from test_cli import ROOT, TINY, expect_user_error

SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@pytest.fixture
def no_cluster(monkeypatch):
  """This test's environment names no cluster, whatever the machine's does."""
  for name in (*SLURM, "OMPI_MCA_orte_hnp_uri", "JAX_COORDINATOR_ADDRESS",
               "KUBERNETES_SERVICE_HOST"):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def _slurm(monkeypatch, ntasks, procid, port=None):
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[007-008]")
  monkeypatch.setenv("SLURM_NTASKS", str(ntasks))
  monkeypatch.setenv("SLURM_PROCID", str(procid))
  monkeypatch.setenv("SLURM_LOCALID", "0")
  if port:
    monkeypatch.setenv("JAX_COORDINATOR_PORT", str(port))


def _args(**kw):
  base = dict(coordinator=None, num_processes=None, process_id=None, hosts=None)
  return types.SimpleNamespace(**{**base, **kw})


# --- which job: flags, environment, neither ---


def test_the_job_comes_from_the_flags_or_the_environment(no_cluster):
  assert distributed.job(_args()) is None   # one process
  mine = distributed.job(_args(coordinator="127.0.0.1:1234", num_processes=2, process_id=1))
  assert (mine.coordinator, mine.num_processes, mine.process_id, mine.source) == (
      "127.0.0.1:1234", 2, 1, "flags")
  # SLURM, read as JAX reads it: the first node of the step, a port from the job id.
  _slurm(no_cluster, 4, 3)
  found = distributed.job(_args())
  assert (found.coordinator, found.num_processes, found.process_id, found.source) == (
      f"node007:{4242 % 4096 + 61440}", 4, 3, "slurm")
  # Flags that agree with the environment are taken as given.
  assert distributed.job(_args(coordinator="10.0.0.1:99", num_processes=4,
                               process_id=3)).coordinator == "10.0.0.1:99"
  _slurm(no_cluster, 1, 0)   # a one-task job step is one process
  assert distributed.job(_args()) is None


def test_native_collectives_on_accelerators_gloo_only_on_cpu():
  assert distributed.cpu_collectives({"JAX_PLATFORMS": "cpu"}) == "gloo"
  assert distributed.cpu_collectives({}) == "gloo"   # may fall back to CPU
  assert distributed.cpu_collectives({"JAX_PLATFORMS": "cuda"}) is None
  assert distributed.cpu_collectives({"JAX_PLATFORMS": "tpu"}) is None


def test_bind_address_is_the_given_ip_else_jax_s_default(no_cluster):
  flags = distributed.Job("10.0.0.1:1234", 2, 0, "flags")
  assert distributed._bind_address(flags) == "10.0.0.1:1234"
  assert distributed._bind_address(distributed.Job("node007:1234", 2, 0, "flags")) is None
  assert distributed._bind_address(distributed.Job("node007:1234", 2, 0, "slurm")) is None
  no_cluster.setenv("JAX_COORDINATOR_BIND_ADDRESS", "10.0.0.9:1234")
  assert distributed._bind_address(flags) == "10.0.0.9:1234"


@pytest.mark.parametrize("flags, words", [
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     ["--process-id 2 is outside [0, 2)"]),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "-1"],
     ["--process-id -1 is outside [0, 2)"]),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"],
     ["--num-processes 0"]),
    (["--num-processes", "2", "--process-id", "0"], ["--coordinator missing"]),
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"],
     ["--coordinator 127.0.0.1", "ADDR:PORT"]),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0",
      "--hosts", "2"], ["--hosts", "one or the other"]),
], ids=["id-too-big", "id-negative", "no-processes", "missing", "no-port", "with-ray"])
def test_bad_distributed_flags_exit_2_with_one_line(capsys, tmp_path, no_cluster, flags, words):
  expect_user_error(capsys, ["train", TINY, *flags, "--run-dir", str(tmp_path / "r")], *words)
  assert not (tmp_path / "r").exists()


def test_flags_that_the_environment_contradicts_are_refused(capsys, tmp_path, no_cluster):
  run = ["train", TINY, "--run-dir", str(tmp_path / "r"), "--coordinator", "127.0.0.1:1234"]
  _slurm(no_cluster, 4, 3)
  expect_user_error(capsys, run + ["--num-processes", "2", "--process-id", "1"],
                    "--num-processes 2 disagrees with the slurm environment",
                    "SLURM_NTASKS gives 4")
  expect_user_error(capsys, run + ["--num-processes", "4", "--process-id", "1"],
                    "--process-id 1", "SLURM_PROCID gives 3")
  for name in SLURM:
    no_cluster.delenv(name)
  no_cluster.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.5:999")
  expect_user_error(capsys, run + ["--num-processes", "2", "--process-id", "1"],
                    "--coordinator 127.0.0.1:1234 disagrees with JAX_COORDINATOR_ADDRESS")
  assert not (tmp_path / "r").exists()


def test_a_malformed_scheduler_environment_is_a_user_error(no_cluster):
  # (What the CLI makes of a UserError, one line and exit 2, the flag tests show; in this
  # process a runtime may be up already, and then the environment is not read again.)
  _slurm(no_cluster, 2, 0)
  no_cluster.setenv("SLURM_PROCID", "two")
  with pytest.raises(UserError, match="slurm environment does not describe a job"):
    distributed.job(_args())
  no_cluster.setenv("SLURM_PROCID", "5")
  with pytest.raises(UserError, match="process id 5 of 2 .SLURM_PROCID"):
    distributed.job(_args())


# --- the hybrid mesh ---


def _devices(processes, per_process):
  return [types.SimpleNamespace(id=p * per_process + i, process_index=p, platform="cpu",
                                device_kind="cpu")
          for p in range(processes) for i in range(per_process)]


def test_dcn_sizes_multiply_into_the_mesh_across_processes():
  devices = _devices(2, 4)
  # data=4 of which 2 across processes: each process holds one data half (x fsdp=2).
  grid = mesh_lib.hybrid_grid((4, 2, 1), {"data": 2}, devices)
  owner = np.vectorize(lambda d: d.process_index)(grid)
  assert grid.shape == (4, 2, 1)
  assert owner[:2].ravel().tolist() == [0] * 4 and owner[2:].ravel().tolist() == [1] * 4
  # fsdp across processes instead: the processes split the fsdp axis.
  owner = np.vectorize(lambda d: d.process_index)(mesh_lib.hybrid_grid((2, 4, 1), {"fsdp": 2},
                                                                        devices))
  assert owner[:, :2].ravel().tolist() == [0] * 4 and owner[:, 2:].ravel().tolist() == [1] * 4


@pytest.mark.parametrize("shape, dcn, words", [
    ((8, 1, 1), {"data": 4}, ["data=4 x fsdp=1 x tensor=1 = 4 processes", "in 2 processes"]),
    ((8, 1, 1), {"data": 3}, ["mesh.dcn.data=3 does not divide mesh.data=8"]),
    ((4, 2, 1), {"data": 2, "fsdp": 2}, ["= 4 processes"]),
])
def test_dcn_sizes_that_do_not_fit_the_processes_are_refused(shape, dcn, words):
  with pytest.raises(UserError) as e:
    mesh_lib.hybrid_grid(shape, dcn, _devices(2, 4))
  for w in words:
    assert w in str(e.value), str(e.value)


def test_mesh_dcn_on_one_process_is_refused_at_start_up(capsys, tmp_path):
  expect_user_error(capsys, ["train", TINY, "mesh.dcn.data=2",
                             "--run-dir", str(tmp_path / "r")],
                    "= 2 processes", "in 1 process;")


@pytest.mark.parametrize("override, words", [
    ("mesh.dcn.model=2", ["mesh.dcn", "unknown axis 'model'"]),
    ("mesh.dcn.data=0", ["mesh.dcn", "data=0"]),
    ("mesh.dcn=2", ["mesh.dcn", "mapping"]),
])
def test_bad_dcn_keys_are_config_errors(override, words):
  with pytest.raises(UserError) as e:
    config_lib.load(TINY, [override])
  for w in words:
    assert w in str(e.value)


def test_an_empty_dcn_leaves_the_resolved_config_and_its_hash_alone():
  cfg = config_lib.load(TINY)
  assert "dcn" not in cfg.to_dict()["mesh"]
  assert run_dir_lib.config_hash(cfg) == run_dir_lib.config_hash(config_lib.load(TINY, ["mesh.dcn={}"]))
  assert config_lib.load(TINY, ["mesh.dcn.data=2"]).to_dict()["mesh"]["dcn"] == {"data": 2}


# --- two real processes, started by hand ---

RUN = ["train.steps=160", "train.log_every=20", "checkpoint.every=0", "train.num_samples=64",
       "rules=fsdp", "mesh.data=2", "mesh.fsdp=2"]


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "SCALER_FAULT", "JAX_COORDINATOR_ADDRESS", *SLURM)}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1", **extra)
  return env


def _start(argv, envs):
  return [subprocess.Popen([sys.executable, "-m", "launch", "train", TINY, *argv], cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for env in envs]


def _finish(procs, timeout=420):
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


def _losses(run_dir):
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["denoiser/loss"] for r in rows}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  from scaler.train import train
  run_dir = tmp_path_factory.mktemp("one") / "run"
  train(config_lib.load(TINY, RUN), run_dir, devices=jax.devices()[:4])
  return _losses(run_dir)


def _flags(port, rank):
  return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(rank)]


@pytest.mark.slow
@pytest.mark.timeout(1800)   # four processes' start-ups and compiles on two shared cores
def test_two_processes_by_hand_with_a_hybrid_mesh_survive_a_preemption(tmp_path, one_process):
  # data=2 across the processes (DCN), fsdp=2 within each (ICI). SIGTERM to process 1
  # mid-run: JAX's notifier (no Python handler replaced it) makes both agree on a step,
  # save it and exit 42; the same command again resumes and finishes like one process.
  run_dir = tmp_path / "run"
  argv = [*RUN, "mesh.dcn.data=2", "--run-dir", str(run_dir)]
  port = free_port()
  procs = _start(argv + _flags(port, 0), [_env()]) + _start(argv + _flags(port, 1), [_env()])
  deadline = time.time() + 300
  while time.time() < deadline and all(p.poll() is None for p in procs):
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and metrics.read_text().count("\n") >= 1:
      procs[1].send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  outs = _finish(procs)
  for code, out in outs:
    assert code == 42, out[-3000:]
  assert "process 1 of 2 (flags), coordinator 127.0.0.1:" in outs[1][1]
  assert "2 process(es); mesh data=2 x fsdp=2" in outs[0][1]
  stopped = json.loads((run_dir / "goodput.json").read_text())["attempts"][-1]["last_step"]
  assert 20 <= stopped < 160
  port = free_port()
  outs = _finish(_start(argv + _flags(port, 0), [_env()]) + _start(argv + _flags(port, 1), [_env()]))
  for code, out in outs:
    assert code == 0, out[-3000:]
  assert f"resumed from step {stopped}" in outs[0][1]
  got = _losses(run_dir)
  assert sorted(got) == sorted(one_process)
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [one_process[s] for s in sorted(got)], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_processes_from_slurm_variables_train_like_one(tmp_path, one_process):
  run_dir = tmp_path / "run"
  port = free_port()
  envs = [_env(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
               SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
               JAX_COORDINATOR_PORT=str(port)) for rank in range(2)]
  outs = _finish(_start([*RUN, "--run-dir", str(run_dir)], envs))
  for code, out in outs:
    assert code == 0, out[-3000:]
  assert f"process 1 of 2 (slurm), coordinator localhost:{port}" in outs[1][1]
  got = _losses(run_dir)
  assert sorted(got) == sorted(one_process)
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [one_process[s] for s in sorted(got)], rtol=1e-5)
