"""The run directory is the user's record: one config per directory, a finished run is
not re-run, a refused start changes nothing, one writer at a time, each step logged once,
and every user error is one line (exit 2) before any file is written."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch.cli import main
from scaler import config as config_lib
from scaler import run_dir as run_dir_lib
from scaler.train import train
from test_cli import ROOT, TINY, expect_user_error, scaler

SHORT = ["train.steps=8", "train.log_every=2", "checkpoint.every=4"]


def _snapshot(path):
  """Every file under `path` with its bytes: a directory that is 'byte-identical'."""
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
          if p.is_file()}


def _run(capsys, argv):
  with pytest.raises(SystemExit) as e:
    main(argv)
  return e.value.code, capsys.readouterr()


def test_a_sweep_in_the_default_run_directory_keeps_every_run(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code, _ = _run(capsys, ["train", TINY, *SHORT, "optimizer.lr=1e-2"])
  assert code == 0
  code, _ = _run(capsys, ["train", TINY, *SHORT, "optimizer.lr=1e-3"])
  assert code == 0
  runs = sorted((tmp_path / "runs").iterdir())
  assert len(runs) == 2 and all(r.name.startswith("tiny_diffusion-") for r in runs)
  lrs = sorted(config_lib.load(r / "config.yaml").optimizer.lr for r in runs)
  assert lrs == pytest.approx([1e-3, 1e-2])


def test_a_finished_run_is_not_rerun(capsys, tmp_path):
  run_dir = tmp_path / "r"
  assert _run(capsys, ["train", TINY, *SHORT, "--run-dir", str(run_dir)])[0] == 0
  before = _snapshot(run_dir)
  code, out = _run(capsys, ["train", TINY, *SHORT, "--run-dir", str(run_dir)])
  assert code == 0
  assert "run at step 8 >= train.steps=8; nothing to do" in out.out
  assert _snapshot(run_dir) == before


def test_another_config_is_refused_and_changes_nothing(capsys, tmp_path):
  run_dir = tmp_path / "r"
  assert _run(capsys, ["train", TINY, *SHORT, "--run-dir", str(run_dir)])[0] == 0
  before = _snapshot(run_dir)
  err = expect_user_error(capsys, ["train", TINY, *SHORT, "optimizer.lr=5e-3",
                                   "--run-dir", str(run_dir)],
                          "optimizer.lr: 0.001 -> 0.005", "--allow-config-change")
  assert "Traceback" not in err
  # Allowed, but the checkpoint does not fit the new model: refused at restore, and
  # still nothing written (before, config.yaml was rewritten first).
  code, out = _run(capsys, ["train", TINY, "train.steps=16", "train.log_every=2",
                            "checkpoint.every=4", "model.hidden=32", "--allow-config-change",
                            "--run-dir", str(run_dir)])
  # One error, listing the arrays whose shapes differ, no traceback.
  assert code == 2 and "does not fit the model" in out.err and "Traceback" not in out.err
  assert _snapshot(run_dir) == before


def test_an_allowed_change_is_recorded_beside_the_old_config(capsys, tmp_path):
  run_dir = tmp_path / "r"
  assert _run(capsys, ["train", TINY, *SHORT, "--run-dir", str(run_dir)])[0] == 0
  original = (run_dir / "config.yaml").read_bytes()
  err = expect_user_error(capsys, ["train", TINY, "train.steps=12", "train.log_every=2",
                                   "checkpoint.every=4", "--run-dir", str(run_dir)],
                          "train.steps: 8 -> 12", "schedule")
  code, _ = _run(capsys, ["train", TINY, "train.steps=12", "train.log_every=2",
                          "checkpoint.every=4", "--allow-config-change", "--run-dir", str(run_dir)])
  assert code == 0
  assert (run_dir / "config.yaml").read_bytes() == original
  assert config_lib.load(run_dir / "config.1.yaml").train.steps == 12
  assert "train.steps: 8 -> 12" in (run_dir / "config_changes.log").read_text()
  steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert steps == [2, 4, 6, 8, 10, 12]


def test_train_with_only_a_run_directory_resumes_its_saved_config(capsys, tmp_path):
  run_dir = tmp_path / "r"
  assert _run(capsys, ["train", TINY, *SHORT, "--run-dir", str(run_dir)])[0] == 0
  code, out = _run(capsys, ["train", "--run-dir", str(run_dir)])
  assert code == 0 and "nothing to do" in out.out
  code, out = _run(capsys, ["train", "--run-dir", str(run_dir), "train.steps=10",
                            "--allow-config-change"])
  assert code == 0 and "done at step 10" in out.out


def test_a_second_training_on_the_same_directory_is_refused(capsys, tmp_path):
  run_dir = tmp_path / "r"
  run_dir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (run_dir / run_dir_lib.LOCK).write_text(json.dumps(
        {"host": os.uname().nodename, "pid": holder.pid, "since": "now"}))
    expect_user_error(capsys, ["train", TINY, *SHORT, "--run-dir", str(run_dir)],
                      "in use by another training", str(holder.pid))
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone: its lock is stale and is taken over.
  code, _ = _run(capsys, ["train", TINY, *SHORT, "--run-dir", str(run_dir)])
  assert code == 0 and not (run_dir / run_dir_lib.LOCK).exists()


def test_metrics_hold_each_step_once_after_a_resume(tmp_path):
  cfg = config_lib.load(TINY, ["train.steps=12", "train.log_every=2", "checkpoint.every=4",
                              "checkpoint.keep_last=3"])
  train(cfg, tmp_path)                        # logged 2..12, checkpoints 4, 8, 12
  train(cfg, tmp_path, resume_from=4)         # redoes 6..12
  steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [2, 4, 6, 8, 10, 12]
  redone = [json.loads(l)["step"] for l in (tmp_path / "metrics.redone.jsonl").read_text().splitlines()]
  assert redone == [6, 8, 10, 12]             # kept aside, not lost


def test_an_unwritable_checkpoint_directory_fails_at_once(capsys, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  t0 = time.monotonic()
  expect_user_error(capsys, ["train", TINY, *SHORT, f"checkpoint.directory={blocker}",
                             "--run-dir", str(tmp_path / "r")], str(blocker), "not a directory")
  assert time.monotonic() - t0 < 30
  assert not (tmp_path / "r").exists()
  expect_user_error(capsys, ["train", TINY, *SHORT, "--run-dir", str(blocker)],
                    "run directory", str(blocker))


@pytest.mark.parametrize("argv, words", [
    (["train.log_every=0"], ["train.log_every"]),
    (["model.hidden=0"], ["model.hidden"]),
    (["model.hidden=-4"], ["model.hidden"]),
    (["model.time_dim=0"], ["model.time_dim"]),
    (["model.mlp_ratio=0"], ["model.mlp_ratio"]),
    (["model={name: unet, groups: 0}"], ["model.groups"]),
    (["train.num_samples=0"], ["train.num_samples"]),
    (["data.num_test=0"], ["data.num_test"]),
    (["optimizer.b1=2"], ["optimizer.b1"]),
    (["train.ema_decay=1.5"], ["train.ema_decay"]),
    (["optimizer.clip_norm=-1"], ["optimizer.clip_norm"]),
    (["train.max_in_flight=0"], ["train.max_in_flight"]),
    (["data.prefetch=-1"], ["data.prefetch"]),
    (["optimizer.schedule.min_lr_ratio=-1"], ["min_lr_ratio"]),
    (["train.steps=0"], ["train.steps"]),
    (["optimizer.lr=nan"], ["optimizer.lr"]),
    (["optimizer.lr=inf"], ["optimizer.lr"]),
    (["--devices", "4"], ["--devices", "--debug"]),
    (["rules.mpl=tensor"], ["rules.mpl"]),
])
def test_bad_input_is_one_line_before_any_file(capsys, tmp_path, argv, words):
  expect_user_error(capsys, ["train", TINY, *argv, "--run-dir", str(tmp_path / "r")], *words)
  assert not (tmp_path / "r").exists()


def test_bad_config_files(capsys, tmp_path):
  dup = tmp_path / "dup.yaml"
  dup.write_text((ROOT / "configs" / "tiny_diffusion.yaml").read_text() + "train: {steps: 5}\n")
  expect_user_error(capsys, ["train", str(dup), "--run-dir", str(tmp_path / "r")],
                    "duplicate key 'train'")
  expect_user_error(capsys, ["train", str(tmp_path), "--run-dir", str(tmp_path / "r")],
                    "is a directory")
  assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("runs") / "tiny"
  train(config_lib.load(TINY, SHORT), run_dir)
  return run_dir


def test_sample_and_export_refuse_bad_outputs_before_any_work(capsys, tmp_path, trained):
  afile = tmp_path / "afile"
  afile.write_text("x")
  expect_user_error(capsys, ["export", str(trained), "--out", str(afile)], str(afile), "file")
  expect_user_error(capsys, ["sample", str(trained), "--out", str(afile / "s.npz")],
                    "not a directory")
  expect_user_error(capsys, ["sample", str(trained), "--num", "1000000000", "--out",
                             str(tmp_path / "s.png")], "too many for a picture", ".npz")


def test_sample_streams_chunks_into_one_archive(capsys, tmp_path, trained):
  out = tmp_path / "s.npz"
  code, _ = _run(capsys, ["sample", str(trained), "--num", "50", "--chunk", "16",
                          "--out", str(out)])
  assert code == 0
  samples = np.load(out)["samples"]
  assert samples.shape == (50, 2) and np.all(np.isfinite(samples))
  # Each chunk draws its own noise: no chunk repeats another.
  assert not np.allclose(samples[:16], samples[16:32])


def test_export_writes_the_config_beside_the_weights(capsys, tmp_path, trained):
  code, _ = _run(capsys, ["export", str(trained), "--out", str(tmp_path / "e")])
  assert code == 0
  assert config_lib.load(tmp_path / "e" / "scaler_config.yaml").train.steps == 8
  assert (tmp_path / "e" / "data_spec.json").is_file()


def test_ctrl_c_saves_and_the_resume_is_exact(tmp_path):
  from test_resume import _assert_bitwise, _final_state
  run_dir = tmp_path / "int"
  args = ["train", TINY, "--run-dir", str(run_dir), "train.steps=3000", "checkpoint.every=1000",
          "train.log_every=100"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen([sys.executable, "-m", "launch", *args, "--debug"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = run_dir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size):
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=240)
  assert proc.returncode == 42, stderr[-3000:]
  assert "Traceback" not in stderr and "interrupted: saving" in stderr
  cfg = config_lib.load(TINY, args[4:])
  stopped = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert 0 < stopped < 3000 and stopped % 1000
  end = stopped + 5
  train(cfg, run_dir, stop_at=end)
  train(cfg, tmp_path / "straight", stop_at=end)
  a, _, _ = _final_state(cfg, run_dir)
  b, _, _ = _final_state(cfg, tmp_path / "straight")
  _assert_bitwise(a, b)


def test_another_mesh_is_recorded_not_refused(tmp_path):
  # Resuming on another topology is the point of resharded restores: the mesh and the
  # rules may change without --allow-config-change; the change is still recorded.
  run = tmp_path / "r"
  run_dir_lib.plan(run, config_lib.load(TINY)).commit()
  moved = config_lib.load(TINY, ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
                                 "rules=fsdp_tensor"])
  plan = run_dir_lib.plan(run, moved)
  assert "mesh.fsdp: 1 -> 2" in plan.changes and "rules: data_parallel -> fsdp_tensor" in plan.changes
  plan.commit()
  assert "mesh.tensor: 1 -> 2" in (run / run_dir_lib.CHANGES).read_text()
  # A change of what is trained is still refused, and names only that key.
  with pytest.raises(run_dir_lib.UserError) as e:
    run_dir_lib.plan(run, config_lib.load(TINY, ["optimizer.lr=0.5"]))
  assert "optimizer.lr" in str(e.value) and "mesh." not in str(e.value)
