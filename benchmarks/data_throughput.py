"""Does the input pipeline keep up? Loader throughput against what the step consumes.

    python3 benchmarks/data_throughput.py        # ~1 minute on 2 CPU cores

For each shipped config, on 8 simulated devices (the default debug mesh):
  * loader: global batches per second out of `BatchLoader` (grain, prefetch thread) and
    `to_global` (jax.make_array_from_process_local_data), the loop's own data path;
  * step: compiled train steps per second on pre-placed batches.
Target: loader / step >= 2, also for the tiny model, whose steps are the fastest.
Figures go to benchmarks/results/data_throughput.json.
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ("configs/tiny_diffusion.yaml", "configs/diffusion_moons.yaml",
           "configs/diffusion_digits.yaml")
TARGET = 2.0


def measure(path, loader_batches=300, steps=60):
  import jax

  from scaler import config as config_lib
  from scaler import experiment as experiment_lib
  from scaler import mesh as mesh_lib
  from scaler import state as state_lib
  from scaler.data import BatchLoader, load_source, to_global
  from scaler.train import compile_step

  cfg = config_lib.load(ROOT / path)
  source = load_source(cfg.data, "train")
  exp = experiment_lib.build(cfg, train_source=source)
  bsh = mesh_lib.batch_sharding(exp.mesh)

  loader = BatchLoader(source, cfg.train.batch_size, seed=0, prefetch=cfg.data.prefetch)
  it = iter(loader)
  jax.block_until_ready(to_global(next(it), bsh, cfg.train.batch_size))
  t0 = time.perf_counter()
  for _ in range(loader_batches):
    batch = to_global(next(it), bsh, cfg.train.batch_size)
  jax.block_until_ready(batch)
  loader_rate = loader_batches / (time.perf_counter() - t0)

  _, shardings = experiment_lib.abstract_shardings(exp)
  state, _ = state_lib.create(exp.family, exp.txs, cfg.train.ema_decay > 0, exp.networks,
                              exp.rules, exp.mesh, 0)
  rng = jax.random.key(0)
  step = compile_step(exp, shardings, bsh).lower(state, batch, rng).compile()
  state, m = step(state, batch, rng)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = step(state, batch, rng)
    if i % 8 == 7:  # bounded in flight, as in the train loop
      jax.block_until_ready(m)
  jax.block_until_ready(m)
  step_rate = steps / (time.perf_counter() - t0)
  return {"config": path, "batch_size": cfg.train.batch_size,
          "loader_batches_per_sec": loader_rate, "steps_per_sec": step_rate,
          "ratio": loader_rate / step_rate, "meets_target": loader_rate / step_rate >= TARGET}


def main():
  import jax
  rows = [measure(p) for p in CONFIGS]
  result = {"devices": len(jax.devices()), "cpu_count": os.cpu_count(), "target": TARGET,
            "rows": rows, "date": time.strftime("%Y-%m-%d")}
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "data_throughput.json").write_text(json.dumps(result, indent=1))
  for r in rows:
    print(f"{r['config']}: loader {r['loader_batches_per_sec']:.0f} batches/s, step "
          f"{r['steps_per_sec']:.1f} steps/s, ratio {r['ratio']:.1f}")


if __name__ == "__main__":
  main()
