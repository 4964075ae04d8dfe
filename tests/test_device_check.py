"""The accelerator check (benchmarks/device_check.sh, .py) in its CPU smoke mode: every
section runs through the same code as on a GPU, at tiny sizes, and records its figures."""

import json
import os
import subprocess
import sys

import pytest

from test_cli import ROOT


@pytest.mark.slow
@pytest.mark.timeout(1800)   # ~1 minute on two idle cores; compiles crawl on a loaded host
def test_the_smoke_run_measures_every_section(tmp_path):
  out = tmp_path / "device.json"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["DEVICE_CHECK_NO_INSTALL"] = "1"   # never pip install from a test
  run = subprocess.run(["bash", "benchmarks/device_check.sh", "--smoke", "--budget-s", "1500",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1700)
  assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
  result = json.loads(out.read_text())
  assert result["smoke"] and result["platform"] == "cpu" and result["local_devices"] == 4
  sections = result["sections"]
  assert set(sections) == {"step", "parallel", "checkpoint", "data"}
  step = sections["step"]
  # No dit in this checkout's registry: the UNet in float32 and bfloat16, and it says so.
  assert step["network"] == "unet" and "no dit" in step["why"]
  assert [r["compute"] for r in step["rows"]] == ["float32", "bfloat16"]
  for r in step["rows"]:
    assert r["step_s"] > 0 and r["flops_per_step"] > 0 and r["utilization"] is None  # no CPU peak
  par = sections["parallel"]
  assert par["fsdp"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert par["data_parallel"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert par["fsdp_over_dp_state_bytes"] < 1   # the state is split, not replicated
  ckpt = sections["checkpoint"]
  assert ckpt["state_bytes"] > 0 and ckpt["blocked_s"] >= 0
  assert ckpt["save_bytes_per_sec"] > 0 and ckpt["restore_bytes_per_sec"] > 0
  data = sections["data"]
  assert {(r["source"], r["workers"]) for r in data["rows"]} == {
      ("image_folder", 0), ("image_folder", 1), ("array_record", 0), ("array_record", 1)}
  assert all(r["examples_per_sec"] > 0 and r["over_step"] > 0 for r in data["rows"])
  for name in sections:
    assert f"device_check: {name}: " in run.stdout


def test_without_an_accelerator_the_full_check_refuses_with_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  env["JAX_PLATFORMS"] = "cpu"
  run = subprocess.run([sys.executable, "benchmarks/device_check.py", "--out", str(tmp_path / "x")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 2 and "no accelerator here" in run.stderr
  assert run.stderr.count("\n") == 1 and not (tmp_path / "x").exists()
