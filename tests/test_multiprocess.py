"""Two processes x two devices, one mesh, under the fsdp and tensor rules: the whole run,
including the samples at its end, and the same losses as one process with four devices.

Sampling runs over global arrays; with parameters sharded across processes it needs
collectives that every process joins (before, process 0 sampled alone and hung)."""

import json

import jax
import numpy as np
import pytest

from scaler import config as config_lib
from scaler.train import train
from multiprocess import run_hosts
from test_cli import ROOT, TINY

RUN = ["train.steps=12", "train.log_every=4", "checkpoint.every=6", "train.num_samples=64"]
TINY_FLOW = str(ROOT / "configs" / "tiny_flow.yaml")
TINY_AR = str(ROOT / "configs" / "tiny_autoregressive.yaml")

MESHES = {
    # fsdp spans both processes: parameters are sharded across them.
    "fsdp": ["rules=fsdp", "mesh.data=1", "mesh.fsdp=4"],
    # tensor spans both processes: a non-batch axis across processes; both load every row.
    "tensor": ["rules=fsdp_tensor", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=4"],
}


def _losses(run_dir, key="denoiser/loss"):
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return np.array([r[key] for r in rows])


def _two_processes_match_one(tmp_path, config, mesh, key):
  run_dir = tmp_path / "two"
  outs = run_hosts(["train", config, *RUN, *mesh, "--run-dir", str(run_dir)], tmp_path=tmp_path)
  for code, out in outs:
    assert code == 0, out[-3000:]
  assert (run_dir / "samples.png").stat().st_size > 1000
  assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 12
  single = tmp_path / "one"
  train(config_lib.load(config, RUN + mesh), single, devices=jax.devices()[:4])
  two, one = _losses(run_dir, key), _losses(single, key)
  assert len(two) == 3
  np.testing.assert_allclose(two, one, rtol=1e-5)


@pytest.mark.parametrize("mesh", MESHES.values(), ids=MESHES.keys())
def test_two_processes_finish_with_samples_and_match_one_process(tmp_path, mesh):
  _two_processes_match_one(tmp_path, TINY, mesh, "denoiser/loss")


# Glow: ActNorm's data-dependent init reads the first global batch, whose rows the two
# processes load separately; the transformer: its KV-cache sampling across processes.
@pytest.mark.slow
@pytest.mark.parametrize("config, key", [(TINY_FLOW, "flow/loss"), (TINY_AR, "net/loss")],
                         ids=["glow", "transformer"])
@pytest.mark.parametrize("mesh", MESHES.values(), ids=MESHES.keys())
def test_likelihood_families_on_two_processes_match_one_process(tmp_path, config, key, mesh):
  _two_processes_match_one(tmp_path, config, mesh, key)


# The class-conditional DiT with heads and MLP over a tensor axis that spans the processes
# and fsdp within each: labels, guidance and attention across hosts.
@pytest.mark.slow
def test_dit_on_two_processes_matches_one_process(tmp_path):
  _two_processes_match_one(tmp_path, str(ROOT / "configs" / "tiny_dit.yaml"),
                           ["rules=fsdp_tensor", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"],
                           "denoiser/loss")
