"""The `scaler` command end to end: the run directory, sample, layout, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launch.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_diffusion.yaml")


def scaler(*args, cwd=None, timeout=300):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd or ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def expect_user_error(capsys, argv, *words):
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  for w in words:
    assert w in err, err
  return err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("runs") / "tiny"
  out = scaler("train", TINY, "--debug", "--run-dir", str(run_dir), "train.steps=20")
  assert out.returncode == 0, out.stderr[-3000:]
  return run_dir, out


def test_train_writes_the_run_directory(trained_run):
  run_dir, out = trained_run
  for name in ("config.yaml", "metrics.jsonl", "samples.png", "loss.png", "final_metrics.json"):
    assert (run_dir / name).is_file(), name
  assert any((run_dir / "tensorboard").iterdir())
  assert any((run_dir / "checkpoints").iterdir())
  rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  for key in ("denoiser/loss", "denoiser/grad_norm", "lr/denoiser", "steps_per_sec",
              "examples_per_sec", "flops_per_sec"):
    assert np.isfinite(rows[-1][key]), key
  assert rows[-1]["flops_per_sec"] > 0
  assert "done at step 20" in out.stdout


def test_sample_npz_and_png(trained_run, tmp_path):
  run_dir, _ = trained_run
  out = scaler("sample", str(run_dir), "--num", "100", "--out", str(tmp_path / "s.npz"))
  assert out.returncode == 0, out.stderr[-3000:]
  samples = np.load(tmp_path / "s.npz")["samples"]
  assert samples.shape == (100, 2) and np.all(np.isfinite(samples))
  # Data space: two moons spans roughly [-1.5, 2.5] x [-1, 1.5], not a standard normal.
  assert samples[:, 0].mean() > 0.1
  out = scaler("sample", str(run_dir), "--num", "16", "--out", str(tmp_path / "s.png"))
  assert out.returncode == 0 and (tmp_path / "s.png").stat().st_size > 1000


def test_existing_run_dir_is_not_overwritten(capsys, tmp_path):
  run_dir = tmp_path / "r"
  run_dir.mkdir()
  (run_dir / "notes.txt").write_text("keep me")
  expect_user_error(capsys, ["train", TINY, "--run-dir", str(run_dir)], str(run_dir))
  assert (run_dir / "notes.txt").read_text() == "keep me"


def test_layout_prints_the_table():
  out = scaler("layout", TINY, "--devices", "8", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2",
               "rules=fsdp_tensor")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "'fsdp', 'tensor'" in out.stdout and "bytes/device" in out.stdout
  assert "compiled step, per device" in out.stdout


@pytest.mark.parametrize("argv, words", [
    (["train", TINY, "optimizer.lrr=1"], ["optimizer.lrr", "accepts"]),
    (["train", TINY, "train.steps=abc"], ["train.steps", "'abc'"]),
    (["train", TINY, "mesh.data=3"], ["data=3", "devices"]),
    (["train", TINY, "train.batch_size=63"], ["batch_size=63"]),
    (["train", TINY, "family.name=gann"], ["gann", "diffusion"]),
    (["train", TINY, "model.name=resnet"], ["resnet", "mlp_denoiser"]),
    # A whole section replaced: the file's toy-data keys would not apply to an npz.
    (["train", TINY, "data={source: npz, path: /nonexistent/x.npz}"], ["/nonexistent/x.npz"]),
    (["train", TINY, "data.source=npz", "data.path=/x.npz"], ["data.num_test", "accepts"]),
    (["train", "/nonexistent/config.yaml"], ["/nonexistent/config.yaml"]),
    (["train", TINY, "checkpoint.preemption_signal=SIGFOO"], ["SIGFOO", "SIGUSR1"]),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, words):
  expect_user_error(capsys, argv + ["--run-dir", str(tmp_path / "r")], *words)
  assert not (tmp_path / "r").exists()


def test_malformed_data_file(capsys, tmp_path):
  bad = tmp_path / "x.npy"
  bad.write_bytes(b"not a numpy file")
  expect_user_error(capsys, ["train", TINY, f"data={{source: npy, path: {bad}}}",
                             "--run-dir", str(tmp_path / "r")], str(bad))


def test_debug_mode_stops_at_the_first_non_finite_step(tmp_path):
  # lr=1e30 overflows within a couple of steps; the check runs after every step.
  out = scaler("train", TINY, "--debug", "--run-dir", str(tmp_path / "nan"), "optimizer.lr=1e30",
               "optimizer.clip_norm=0")
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("scaler: error: non-finite values at step "), last
  assert "first in state.params['" in last and "lower optimizer.lr" in last
