"""`scaler eval`: held-out likelihood of a trained flow (bits/dim on images, nats on
vectors), its eval.json, and the refusals that write nothing."""

import json
import math
import shutil

import numpy as np
import pytest

from test_cli import ROOT, TINY, expect_user_error, scaler

TINY_FLOW = str(ROOT / "configs" / "tiny_flow.yaml")
FEW_STEPS = ["train.steps=4", "train.log_every=2", "checkpoint.every=4",
             "train.num_samples=8"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("runs") / "glow"
  out = scaler("train", TINY_FLOW, "--debug", "--run-dir", str(run_dir), *FEW_STEPS)
  assert out.returncode == 0, out.stderr[-3000:]
  return run_dir


def test_eval_of_a_glow_run_prints_bits_per_dim_and_writes_eval_json(digits_run):
  out = scaler("eval", str(digits_run), "--metrics", "likelihood", "--num", "100")
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.loads((digits_run / "eval.json").read_text())
  assert record["step"] == 4 and record["examples"] == 100 and record["split"] == "test"
  assert record["family"] == "flow" and record["model"] == "glow"
  bpd, nll = record["metrics"]["bpd"], record["metrics"]["nll"]
  # Bits per dimension over the 17 levels of 64 pixels; 4 steps leave it far from good,
  # but a dequantised density cannot beat 0 bits or be worse than noise by much.
  assert 0 < bpd < 3 * math.log2(17), bpd
  assert nll == pytest.approx(bpd * 64 * math.log(2), rel=1e-5)
  line = next(l for l in out.stdout.splitlines() if l.split()[:1] == ["bpd"])
  assert "bits/dim" in line and f"{bpd:.4g}" in line
  assert "quality" not in record


def test_eval_of_a_vector_flow_reports_nats_and_sample_quality_beside_the_floor(tmp_path):
  run_dir = tmp_path / "maf"
  out = scaler("train", TINY_FLOW, "--debug", "--run-dir", str(run_dir), *FEW_STEPS,
               "data.source=two_moons", "model=maf", "model.blocks=2", "model.hidden=16")
  assert out.returncode == 0, out.stderr[-3000:]
  out = scaler("eval", str(run_dir), "--num", "200")
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.loads((run_dir / "eval.json").read_text())
  nll = record["metrics"]["nll"]
  # Nats per example of 2-d points: an untrained standard normal on standardised data
  # is about 2.8 + sum log scale; a few steps cannot make it infinite or absurd.
  assert np.isfinite(nll) and -5 < nll < 20, nll
  assert record["metrics"]["bpd"] == pytest.approx(nll / (2 * math.log(2)), rel=1e-5)
  line = next(l for l in out.stdout.splitlines() if l.split()[:1] == ["nll"])
  assert "nats/example" in line
  for name in ("sliced_wasserstein", "mmd"):
    q = record["quality"][name]
    assert np.isfinite(q["samples"]) and np.isfinite(q["held_out"]), (name, q)
  assert record["quality_sample_size"] == 100


def _config_only_run(tmp_path, config):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  shutil.copy(config, run_dir / "config.yaml")
  return run_dir


def test_likelihood_of_a_diffusion_run_is_refused(capsys, tmp_path):
  run_dir = _config_only_run(tmp_path, TINY)
  expect_user_error(capsys, ["eval", str(run_dir), "--metrics", "likelihood"],
                    "--metrics likelihood", "family diffusion has no likelihood")
  assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_eval_without_checkpoints_is_refused_and_creates_nothing(capsys, tmp_path):
  run_dir = _config_only_run(tmp_path, TINY_FLOW)
  expect_user_error(capsys, ["eval", str(run_dir)], "no checkpoint to evaluate",
                    str(run_dir / "checkpoints"))
  assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_eval_num_below_1_is_refused(capsys, tmp_path):
  run_dir = _config_only_run(tmp_path, TINY_FLOW)
  expect_user_error(capsys, ["eval", str(run_dir), "--num", "0"], "--num 0", "at least 1")
  assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]
