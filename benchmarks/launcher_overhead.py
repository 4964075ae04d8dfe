"""What `--hosts 2` costs before training starts, against one process.

    python3 benchmarks/launcher_overhead.py          # ~2 minutes on 2 CPU cores

Time from the command to the first step (the wall time in the first row of
metrics.jsonl, `train.log_every=1`), for the tiny diffusion config:
  * one process on 4 simulated devices: `scaler train ... --debug --devices 4`;
  * 2 hosts x 2 simulated devices through Ray: `scaler train ... --hosts 2
    --devices-per-host 2` (a local Ray instance started by the command itself).
Runs alternate, REPEATS of each; the overhead is the difference of the medians.
Target: <= 10 s on this machine. Figures go to benchmarks/results/launcher_overhead.json.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TINY = "configs/tiny_diffusion.yaml"
REPEATS = 3
TARGET_S = 10.0
COMMON = ["train.steps=2", "train.log_every=1", "--debug"]
MODES = {
    "one_process": ["--devices", "4"],
    "two_hosts": ["--hosts", "2", "--devices-per-host", "2"],
}


def first_step_s(mode: str, run_dir: Path) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SCALER_FAULT")}
  t0 = time.time()
  out = subprocess.run([sys.executable, "-m", "launch", "train", TINY, *COMMON, *MODES[mode],
                        "--run-dir", str(run_dir)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  if out.returncode:
    raise SystemExit(f"{mode} failed:\n{(out.stdout + out.stderr)[-3000:]}")
  first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
  ray = re.search(r"Ray started on 127.0.0.1 in ([\d.]+) s", out.stderr)
  return {"first_step_s": first["time"] - t0, "total_s": time.time() - t0,
          "ray_start_s": float(ray.group(1)) if ray else None}


def main():
  runs = {mode: [] for mode in MODES}
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(REPEATS):
      for mode in MODES:
        r = first_step_s(mode, Path(tmp) / f"{mode}{i}")
        runs[mode].append(r)
        print(f"{mode:12s} run {i}: first step after {r['first_step_s']:.1f} s", flush=True)
  med = {m: statistics.median(r["first_step_s"] for r in rs) for m, rs in runs.items()}
  overhead = med["two_hosts"] - med["one_process"]
  result = {
      "what": "command -> first step, tiny diffusion config, 2x2 via Ray minus 1x4 alone",
      "machine": f"{os.cpu_count()} CPU cores",
      "repeats": REPEATS,
      "median_first_step_s": {m: round(v, 2) for m, v in med.items()},
      "median_ray_start_s": round(statistics.median(
          r["ray_start_s"] for r in runs["two_hosts"]), 2),
      "overhead_s": round(overhead, 2),
      "target_s": TARGET_S,
      "meets_target": overhead <= TARGET_S,
      "runs": runs,
  }
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "launcher_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
  print(f"overhead {overhead:.1f} s (target <= {TARGET_S:.0f} s); "
        f"Ray start {result['median_ray_start_s']:.1f} s")


if __name__ == "__main__":
  main()
