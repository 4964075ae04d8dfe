"""Goodput (scaler/goodput.py) and the watchdog's allowances that follow the run
(scaler/progress.py, launch/heartbeat.py): where the wall time goes, over restarts."""

import json
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from scaler import config as config_lib
from scaler import goodput
from scaler import progress
from scaler.goodput import Recorder
from scaler.train import train
from multiprocess import free_port
from test_cli import ROOT, TINY


class Clock:
  def __init__(self, t):
    self.t = t

  def __call__(self):
    return self.t


def _read(run_dir):
  return json.loads((run_dir / goodput.FILE).read_text())


def _adds_up(record, within=0.05):
  total = sum(record["parts_s"].values())
  assert abs(total - record["wall_s"]) <= within * record["wall_s"], (total, record)


# --- the recorder, on a clock of its own ---


def test_each_second_lands_in_the_part_its_calls_name(tmp_path):
  clock = Clock(110.0)
  gp = Recorder(tmp_path, started_at=100.0, clock=clock)   # 10 s of imports before
  clock.t = 112.0
  with gp.during("restore"):
    clock.t = 117.0
  assert not (tmp_path / goodput.FILE).exists()   # nothing before the start is certain
  gp.begin(0)
  clock.t = 118.0
  gp.phase("compile")
  clock.t = 130.0
  gp.loop()
  for done in range(1, 5):
    with gp.during("data_wait"):
      clock.t += 0.5
    clock.t += 2.0
    gp.step(done)
    with gp.during("checkpoint_save"):
      clock.t += 1.0
  gp.phase("final")
  clock.t += 3.0
  summary = gp.end("done")
  parts = summary["attempts"][0]["parts_s"]
  assert parts == {"startup": 13.0, "restore": 5.0, "compile": 12.0, "steps": 8.0,
                   "data_wait": 2.0, "checkpoint_save": 4.0, "redone": 0.0, "final": 3.0}
  assert summary["wall_s"] == 47.0 and summary["goodput"] == round(8 / 47, 4)
  assert _read(tmp_path) == summary
  assert summary["attempts"][0]["status"] == "done" and summary["attempts"][0]["last_step"] == 4


def test_steps_an_earlier_attempt_reached_are_redone_and_a_killed_one_is_lost(tmp_path):
  # Attempt 1 was killed: its last record says step 6 at t=200 ("running"); the metrics
  # show it logged step 9. This attempt restored step 4: steps 5..9 are redone.
  earlier = {"started_at": 100.0, "ended_at": 200.0, "status": "running", "start_step": 0,
             "last_step": 6, "redone_steps": None, "wall_s": 100.0,
             "parts_s": dict.fromkeys(goodput.PARTS, 0.0) | {"startup": 40.0, "steps": 60.0}}
  (tmp_path / goodput.FILE).write_text(json.dumps({"attempts": [earlier]}))
  (tmp_path / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 10)))
  clock = Clock(230.0)
  gp = Recorder(tmp_path, started_at=230.0, clock=clock)
  gp.begin(4)
  gp.loop()
  for done in range(5, 13):
    clock.t += 1.0
    gp.step(done)
  summary = gp.end("done")
  first, this = summary["attempts"]
  assert first["status"] == "lost"
  assert this["redone_steps"] == [5, 9]
  assert this["parts_s"]["redone"] == 5.0 and this["parts_s"]["steps"] == 3.0
  assert summary["parts_s"]["between_attempts"] == 30.0
  assert summary["wall_s"] == 138.0 and sum(summary["parts_s"].values()) == 138.0


def test_a_recorder_writes_while_training_so_a_killed_attempt_leaves_a_record(tmp_path):
  clock = Clock(0.0)
  gp = Recorder(tmp_path, clock=clock)
  gp.begin(0)
  gp.loop()
  clock.t = goodput.FLUSH_S / 2
  gp.step(1)
  assert _read(tmp_path)["attempts"][0]["last_step"] == 0
  clock.t = goodput.FLUSH_S * 1.5
  gp.step(2)
  record = _read(tmp_path)["attempts"][0]
  assert record["last_step"] == 2 and record["status"] == "running"
  assert not (tmp_path / (goodput.FILE + ".tmp")).exists()
  # Other processes time too, but read and write nothing.
  quiet = Recorder(tmp_path / "p1", enabled=False)
  quiet.begin(0)
  assert quiet.end("done") is None and not (tmp_path / "p1").exists()


# --- the watchdog's allowances ---


def test_the_allowance_follows_the_restore_size_and_the_last_compile():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  mb = 1 << 20
  state = {"sharded": jax.ShapeDtypeStruct((400 * mb // 4,), np.float32,
                                           sharding=NamedSharding(mesh, P("fsdp"))),
           "replicated": jax.ShapeDtypeStruct((100 * mb // 4,), np.float32,
                                              sharding=NamedSharding(mesh, P()))}
  # This process reads both halves of the sharded array once and the replicated one once.
  assert progress.restore_allowance(state) == pytest.approx(
      progress.SLOW_S + 500 * mb / progress.RESTORE_BYTES_PER_S)
  assert progress.compile_allowance(None) == progress.SLOW_S
  assert progress.compile_allowance(50.0) == progress.SLOW_S
  assert progress.compile_allowance(1000.0) == 3000.0


def test_the_watchdog_gives_an_announced_stretch_its_own_allowance(monkeypatch):
  monkeypatch.setattr(progress, "_last", (-1, time.monotonic()))
  monkeypatch.setattr(progress, "_expected", None)
  monkeypatch.setattr(progress, "_limits", dict(progress._limits))
  fired = []
  progress.watch(0.3, lambda step, idle, what: fired.append((step, idle, what)), slow_s=0.3,
                 poll_s=0.05)
  progress.expect("compile", 1.5)
  time.sleep(0.9)            # past slow_s, within the compile's allowance
  assert not fired and progress.allowance() == (1.5, "compile")
  time.sleep(1.2)
  assert fired and fired[0][0] == -1 and fired[0][2] == "compile" and fired[0][1] > 1.5
  import faulthandler
  faulthandler.cancel_dump_traceback_later()


_ALLOWED = """
import importlib.util, sys, time
from launch import heartbeat
heartbeat.start(sys.argv[1])
# scaler.progress alone, without the scaler package (flax, jax: seconds to import).
spec = importlib.util.spec_from_file_location("scaler.progress", "scaler/progress.py")
progress = sys.modules["scaler.progress"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(progress)
progress.expect("restore", 1234.0)
time.sleep(120)
"""


def test_the_heartbeat_carries_the_allowance_and_the_driver_heeds_it(tmp_path):
  path = str(tmp_path / "progress.json")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen([sys.executable, "-c", _ALLOWED, path], cwd=ROOT, env=env)
  try:
    deadline = time.time() + 120
    beat = {}
    while beat.get("doing") != "restore" and time.time() < deadline:
      time.sleep(0.2)
      if os.path.exists(path):
        from launch import heartbeat
        beat = heartbeat.read(path, proc.pid, time.time())
    assert beat["allow_s"] == 1234.0 and beat["doing"] == "restore", beat
  finally:
    proc.kill()
    proc.wait()
  # The driver: a host silent 700 s while it restores within 1234 s is not frozen.
  from launch.ray_launcher import Attempt
  attempt = Attempt.__new__(Attempt)
  attempt.args = type("Args", (), {"hosts": 1, "stall_timeout": 300.0})()
  attempt.ended = [None]
  attempt.beats = [{"step": -1, "silent_s": 700.0, "state": "S", "allow_s": 1234.0}]
  attempt._find_frozen()
  assert attempt.ended == [None]
  attempt.beats[0]["silent_s"] = 1300.0
  attempt._find_frozen()
  assert attempt.ended[0].kind == "frozen"


# --- through the real driver ---


def _cfg():
  return config_lib.load(TINY, ["train.steps=12", "train.log_every=1", "checkpoint.every=4",
                                "train.num_samples=64"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_an_injected_restart_shows_its_redone_steps_and_the_parts_add_up(tmp_path, monkeypatch):
  beat = progress.beat

  def crash_at_9(step):
    beat(step)
    if step == 9:
      raise RuntimeError("injected fault at step 9")

  monkeypatch.setattr(progress, "beat", crash_at_9)
  t0 = time.time()
  with pytest.raises(RuntimeError, match="injected"):
    train(_cfg(), tmp_path, started_at=t0)
  monkeypatch.setattr(progress, "beat", beat)
  train(_cfg(), tmp_path, started_at=time.time())
  t1 = time.time()
  summary = _read(tmp_path)
  first, second = summary["attempts"]
  assert first["status"] == "failed: RuntimeError" and first["last_step"] == 9
  # Restored step 8; step 9 was reached before: its row moved to metrics.redone.jsonl.
  assert second["start_step"] == 8 and second["redone_steps"] == [9, 9]
  redone = [json.loads(l)["step"] for l in (tmp_path / "metrics.redone.jsonl").open()]
  assert redone == [9]
  assert second["parts_s"]["redone"] > 0 and second["parts_s"]["restore"] > 0
  assert first["parts_s"]["compile"] > 0 and first["parts_s"]["checkpoint_save"] > 0
  for record in (first, second, summary):
    _adds_up(record)
  assert abs(summary["wall_s"] - (t1 - t0)) <= 0.05 * (t1 - t0)
  tags = _tensorboard_tags(tmp_path / "tensorboard")
  assert {"goodput/redone_s", "goodput/steps_s", "goodput/fraction"} <= tags


def _tensorboard_tags(directory):
  """Scalar tags in TensorBoard event files (TFRecords of Event protos), read without
  TensorBoard."""
  import struct

  from tensorboardX.proto import event_pb2
  tags = set()
  for events in directory.glob("events.*"):
    data = events.read_bytes()
    i = 0
    while i + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      tags |= {v.tag for v in event.summary.value}
      i += 12 + length + 4
  return tags


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_host_s_lost_steps_are_redone_and_the_whole_adds_up(tmp_path):
  # The launcher's restart path without Ray: host 0 of 1 is SIGKILLed at step 7 of its
  # first attempt (SCALER_FAULT), with no chance to write; the second attempt restores
  # the last committed checkpoint and redoes the steps the first one had logged.
  run_dir = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             SCALER_FAULT="kill:0:7")
  t0 = time.time()
  outs = []
  for attempt in (0, 1):
    argv = [sys.executable, "-m", "launch.host", "--rank", "0", "--hosts", "1",
            "--coordinator", f"127.0.0.1:{free_port()}", "--attempt", str(attempt),
            "--status-file", str(tmp_path / f"status{attempt}.json"), "--",
            "train", TINY, "train.steps=16", "train.log_every=1", "checkpoint.every=3",
            "train.num_samples=64", "--run-dir", str(run_dir)]
    outs.append(subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=420))
  t1 = time.time()
  assert outs[0].returncode == -9, outs[0].stderr[-3000:]
  assert outs[1].returncode == 0, outs[1].stderr[-3000:]
  summary = _read(run_dir)
  first, second = summary["attempts"]
  assert first["status"] == "lost"
  restored = second["start_step"]
  assert restored in (3, 6), second   # 6, unless its async commit had not finished
  assert second["redone_steps"] == [restored + 1, 7]
  assert sorted(json.loads(l)["step"] for l in (run_dir / "metrics.redone.jsonl").open()) == (
      list(range(restored + 1, 8)))
  assert summary["parts_s"]["between_attempts"] > 0   # the killed attempt after its record
  _adds_up(second)
  _adds_up(summary)
  assert abs(summary["wall_s"] - (t1 - t0)) <= 0.05 * (t1 - t0), (summary["wall_s"], t1 - t0)
  assert "goodput: " in outs[1].stderr and "redone" in outs[1].stderr
