"""Start-up on a large .npy: memory-mapped reading against the former whole-array load.

    python3 benchmarks/data_startup.py           # ~3 minutes on 2 shared CPU cores

A 1,000,000-example uint8 .npy of 16x16 grey images (256 MB) is written once. Each
way of reading it runs in a fresh process, on a warm page cache: the time from opening
the data to the first global batch on the 8-device mesh (the part of start-up that
depends on the data; compilation is the same for both), and the peak resident memory.

  * mmap: `load_source` (statistics on a bounded sample, computed once and then read
    from the cache beside the data, both timed) + `BatchLoader` + `to_global`;
  * whole array: what `load_source` did before: np.load, a float32 copy, the split by
    fancy indexing, statistics over every example, a normalised copy; then the batch.
Figures go to benchmarks/results/data_startup.json.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
N, SHAPE = 1_000_000, (16, 16, 1)

CHILD = r"""
import os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from scaler import config as config_lib, mesh as mesh_lib
from scaler.data import BatchLoader, data_config, load_source, to_global
mode, path = sys.argv[1], sys.argv[2]
bsh = mesh_lib.batch_sharding(mesh_lib.make_mesh(config_lib.MeshConfig()))
jax.block_until_ready(to_global({"x": np.zeros((128, 16, 16, 1), np.float32)}, bsh, 128))
t0 = time.perf_counter()
if mode == "mmap":
  source = load_source(data_config("npy", path=path), "train")
  batch = next(iter(BatchLoader(source, 128, seed=0)))
else:  # the former path, as it was
  x = np.load(path, allow_pickle=False).astype(np.float32)
  order = np.random.default_rng(0).permutation(len(x))
  x = x[order[:-(len(x) // 10)]]
  lo, hi = float(x.min()), float(x.max())
  x = np.ascontiguousarray((x - (lo + hi) / 2) / ((hi - lo) / 2), np.float32)
  idx = np.random.default_rng([0, 0]).permutation(len(x))[:128]
  batch = {"x": x[idx]}
jax.block_until_ready(to_global(batch, bsh, 128))
seconds = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("RESULT", seconds, int(hwm) * 1024)
"""


def run(mode, path):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  seconds, peak = out.stdout.split("RESULT")[-1].split()
  return float(seconds), int(peak)


def main():
  import numpy as np
  with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "big.npy"
    x = np.lib.format.open_memmap(path, "w+", np.uint8, (N, *SHAPE))
    for start in range(0, N, 100_000):
      x[start:start + 100_000] = np.random.default_rng(start).integers(
          0, 256, (100_000, *SHAPE), dtype=np.uint8)
    x.flush()
    del x
    size = path.stat().st_size
    cold_stats = run("mmap", path)       # computes the statistics, caches them
    cached = run("mmap", path)           # reads them back
    whole = run("whole", path)
  rows = {"mmap, statistics computed": cold_stats, "mmap, statistics cached": cached,
          "whole array (before)": whole}
  result = {"examples": N, "example_shape": list(SHAPE), "file_bytes": size,
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "rows": [{"case": k, "seconds_to_first_batch": s, "peak_rss_bytes": m}
                     for k, (s, m) in rows.items()],
            "speedup_cached": whole[0] / cached[0], "speedup_computed": whole[0] / cold_stats[0],
            "peak_rss_ratio": whole[1] / cached[1]}
  for k, (s, m) in rows.items():
    print(f"{k}: {s:.2f} s to the first batch, peak RSS {m / 2**20:.0f} MiB")
  print(f"speedup {result['speedup_cached']:.0f}x (cached), {result['speedup_computed']:.0f}x "
        f"(computed); peak RSS ratio {result['peak_rss_ratio']:.1f}x")
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "data_startup.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
