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

TINY_DIT = str(ROOT / "configs" / "tiny_dit.yaml")

RUN = ["train.steps=12", "train.log_every=4", "checkpoint.every=6", "train.num_samples=64"]


def _losses(run_dir):
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return np.array([r["denoiser/loss"] for r in rows])


@pytest.mark.parametrize("config, mesh", [
    # fsdp spans both processes: parameters are sharded across them.
    (TINY, ["rules=fsdp", "mesh.data=1", "mesh.fsdp=4"]),
    # tensor spans both processes: a non-batch axis across processes; both load every row.
    (TINY, ["rules=fsdp_tensor", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=4"]),
    # The class-conditional DiT with heads and MLP over a tensor axis that spans the
    # processes, and fsdp within each: labels, guidance and attention across hosts.
    (TINY_DIT, ["rules=fsdp_tensor", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"]),
], ids=["fsdp", "tensor", "dit_fsdp_tensor"])
def test_two_processes_finish_with_samples_and_match_one_process(tmp_path, config, mesh):
  run_dir = tmp_path / "two"
  outs = run_hosts(["train", config, *RUN, *mesh, "--run-dir", str(run_dir)], tmp_path=tmp_path)
  for code, out in outs:
    assert code == 0, out[-3000:]
  assert (run_dir / "samples.png").stat().st_size > 1000
  assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 12
  single = tmp_path / "one"
  train(config_lib.load(config, RUN + mesh), single, devices=jax.devices()[:4])
  np.testing.assert_allclose(_losses(run_dir), _losses(single), rtol=1e-5)
