"""Does the input pipeline keep up? Loader throughput against what the step consumes.

    python3 benchmarks/data_throughput.py        # ~10 minutes on 2 shared CPU cores

On 8 simulated devices (the default debug mesh), for each case:
  * loader: global batches per second out of `BatchLoader` (grain: threads or worker
    processes) and `to_global` (jax.make_array_from_process_local_data), the loop's own
    data path, after the workers have started;
  * step: compiled train steps per second on a pre-placed batch.
Cases: the shipped configs (data in memory); the digits UNet reading the digits as PNG
records from ArrayRecord shards; a UNet on a 64x64 RGB image dataset made on the fly
(PNG records), each with and without worker processes. Target: loader / step >= 2.
Figures go to benchmarks/results/data_throughput.json.
"""

import io
import json
import os
import sys
import tempfile
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


def _config(path, data=None, overrides=()):
  from scaler import config as config_lib
  raw = config_lib.read_yaml(ROOT / path)
  if data is not None:
    raw["data"] = data
  return config_lib.from_dict(config_lib.apply_overrides(raw, list(overrides)))


def loader_rate(source, cfg, bsh, workers=None, batches=60):
  import jax

  from scaler.data import BatchLoader, to_global
  loader = BatchLoader(source, cfg.train.batch_size, seed=0, workers=workers)
  it = iter(loader)
  for _ in range(5):  # workers started, buffers filled once
    jax.block_until_ready(to_global(next(it), bsh, cfg.train.batch_size))
  t0 = time.perf_counter()
  for _ in range(batches):
    batch = to_global(next(it), bsh, cfg.train.batch_size)
  jax.block_until_ready(batch)
  rate = batches / (time.perf_counter() - t0)
  it.close()
  return rate, batch


def step_rate(exp, batch, bsh, steps):
  import jax

  from scaler import experiment as experiment_lib
  from scaler import state as state_lib
  from scaler.train import compile_step
  _, shardings = experiment_lib.abstract_shardings(exp)
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, exp.use_ema, exp.rules,
                              exp.mesh, 0)
  key = jax.random.key(0)
  step = compile_step(exp, shardings, bsh).lower(state, batch, key).compile()
  state, m = step(state, batch, key)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = step(state, batch, key)
    if i % 8 == 7:  # bounded in flight, as in the train loop
      jax.block_until_ready(m)
  jax.block_until_ready(m)
  return steps / (time.perf_counter() - t0)


def measure(case, cfg, workers_options=(None,), steps=40):
  from scaler import experiment as experiment_lib
  from scaler import mesh as mesh_lib
  from scaler.data import load_source
  source = load_source(cfg.data, "train")
  exp = experiment_lib.build(cfg, spec=source.spec)
  bsh = mesh_lib.batch_sharding(exp.mesh)
  loaders = {}
  for workers in workers_options:
    loaders[workers], batch = loader_rate(source, cfg, bsh, workers)
  steps_per_sec = step_rate(exp, batch, bsh, steps)
  rows = []
  for workers, rate in loaders.items():
    rows.append({"case": case, "batch_size": cfg.train.batch_size,
                 "workers": source.options.workers if workers is None else workers,
                 "threads": source.options.threads,
                 "loader_batches_per_sec": rate, "steps_per_sec": steps_per_sec,
                 "ratio": rate / steps_per_sec, "meets_target": rate / steps_per_sec >= TARGET})
    print(f"{case} workers={rows[-1]['workers']}: loader {rate:.1f} batches/s, step "
          f"{steps_per_sec:.2f} steps/s, ratio {rate / steps_per_sec:.1f}", flush=True)
  return rows


def _pngs_to_shards(images_NxHxWxC, labels, out: Path):
  """Records of PNG bytes, as `scaler data convert` writes them."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from PIL import Image

  from scaler.data import example_proto
  out.mkdir(parents=True)
  for s in range(4):
    writer = ArrayRecordWriter(str(out / f"data-{s:05d}-of-00004.array_record"), "group_size:1")
    for i in range(s, len(images_NxHxWxC), 4):
      img = images_NxHxWxC[i]
      buf = io.BytesIO()
      Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "PNG")
      writer.write(example_proto.encode(buf.getvalue(), None if labels is None else labels[i]))
    writer.close()


def images_64(n=2048, seed=0):
  """Smooth coloured blobs with noise, 64x64 RGB uint8: compresses like photographs
  more than like pure noise."""
  import numpy as np
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:64, 0:64] / 64.0
  out = np.empty((n, 64, 64, 3), np.uint8)
  for i in range(n):
    c = rng.uniform(0.2, 0.8, (2, 3))
    r = rng.uniform(0.05, 0.3)
    d = (xx - c[0, 0]) ** 2 + (yy - c[0, 1]) ** 2
    img = np.exp(-d / r)[..., None] * rng.uniform(0, 255, 3) + rng.normal(0, 12, (64, 64, 3))
    out[i] = np.clip(img + 40, 0, 255)
  return out


def main():
  import jax
  import numpy as np
  rows = [r for p in CONFIGS for r in measure(p, _config(p))]
  with tempfile.TemporaryDirectory() as d:
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = (digits.images * 255 / 16).round().astype(np.uint8)[..., None]
    _pngs_to_shards(x, digits.target, Path(d) / "digits")
    cfg = _config("configs/diffusion_digits.yaml",
                  {"source": "array_record", "path": f"{d}/digits"})
    rows += measure("digits UNet, ArrayRecord PNG", cfg, (0, 2))
    _pngs_to_shards(images_64(), None, Path(d) / "img64")
    cfg = _config("configs/diffusion_digits.yaml",
                  {"source": "array_record", "path": f"{d}/img64"},
                  ["train.batch_size=32"])
    rows += measure("64x64 RGB UNet, ArrayRecord PNG", cfg, (0, 2), steps=5)
  result = {"devices": len(jax.devices()), "cpu_count": os.cpu_count(), "target": TARGET,
            "rows": rows, "date": time.strftime("%Y-%m-%d")}
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "data_throughput.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
