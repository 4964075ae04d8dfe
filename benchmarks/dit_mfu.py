"""DiT-XL/2 train steps in bf16 on one accelerator: model FLOPs utilisation (MFU).

    python3 benchmarks/dit_mfu.py        # one GPU: DiT-XL/2, batch 256, bf16; ~5 minutes
    python3 benchmarks/dit_mfu.py --size tiny --image 8 --batch 8 --steps 2   # CPU smoke run

The paper's setting: 32x32x4 latents (256x256 images through the SD VAE, which is not
part of the step), patch 2 = 256 tokens, 1000 classes with label dropout, AdamW, EMA.
The step is scaler's own (`scaler.train.compile_step`), with random latents and labels.

Model FLOPs are counted from the architecture, not from the compiler: 3 x the forward
pass's matmul FLOPs (`scaler.nn.dit.flops_per_example`, which matches the paper's
Gflops) x batch. With `remat` the chip also recomputes the forward pass; XLA's count of
the compiled step includes that, so it is reported beside it as hardware FLOPs
utilisation (HFU), an upper bound. (XLA's count covers one trip of a loop, so over
micro-batches, a `lax.scan`, it undercounts: HFU is left out there.) MFU = model FLOPs / step time / the chip's dense bf16
peak (`scaler.perf.PEAKS`: 989 TFLOP/s for an H100 or H200 SXM).

Each variant (remat, micro-batches) runs in turn; one that runs out of memory is
reported as such. Without remat, batch 256 needs ~170 GB of activations, so the default
variants are: no remat over 2 micro-batches of 128, and `block` remat in one batch.
Results go to --out (default benchmarks/results/dit_mfu.json; and $OUT/dit_mfu.json when OUT is set).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def config(args, remat, micro_batches):
  from scaler import config as config_lib
  return config_lib.from_dict({
      "family": {"name": "diffusion", "schedule": "linear", "num_timesteps": 1000,
                 "condition": {"name": "class", "label_dropout": 0.1}},
      "model": {"name": "dit", "size": args.size, "patch": 2, "remat": remat},
      # Never read: the experiment is built from the DataSpec below.
      "data": {"source": "npz", "path": "unused.npz"},
      "optimizer": {"name": "adamw", "lr": 1e-4, "schedule": "constant"},
      "precision": {"params": "float32", "compute": args.compute},
      "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
      "rules": "data_parallel",
      "train": {"steps": 1000, "batch_size": args.batch, "micro_batches": micro_batches,
                "ema_decay": 0.9999},
  })


def measure(args, remat, micro_batches):
  import jax
  import numpy as np

  from scaler import experiment as experiment_lib
  from scaler import mesh as mesh_lib
  from scaler import perf
  from scaler import state as state_lib
  from scaler.data import DataSpec
  from scaler.nn.dit import flops_per_example
  from scaler.train import compile_step

  cfg = config(args, remat, micro_batches)
  shape = (args.image, args.image, 4)
  spec = DataSpec(shape, "image", np.float32(0), np.float32(1), num_classes=1000)
  dev = jax.devices()[:1]
  exp = experiment_lib.build(cfg, dev, spec=spec)
  _, shardings = experiment_lib.abstract_shardings(exp)
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, exp.use_ema, exp.rules,
                              exp.mesh, 0)
  bsh = mesh_lib.batch_sharding(exp.mesh)
  rng = np.random.default_rng(0)
  batch = {"x": jax.device_put(rng.normal(size=(args.batch, *shape)).astype(np.float32), bsh),
           "label": jax.device_put(rng.integers(0, 1000, args.batch).astype(np.int32), bsh)}
  key = jax.random.key(0)
  t0 = time.perf_counter()
  step = compile_step(exp, shardings, bsh).lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  mem = step.memory_analysis()
  for _ in range(2):   # warm-up
    state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t0) / args.steps)
  t = statistics.median(times)
  model_flops = 3 * flops_per_example(cfg.model.cfg, shape) * args.batch
  xla_flops = perf.per_device_flops(step)
  peak = perf.peak_flops(dev[0], args.compute)
  row = {"remat": remat, "micro_batches": micro_batches, "step_s": t, "step_s_all": times,
         "compile_s": compile_s, "model_flops_per_step": model_flops,
         "xla_flops_per_step": xla_flops, "images_per_sec": args.batch / t,
         "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
         "loss": float(metrics["denoiser/loss"])}
  if peak:
    row.update(peak_flops=peak, mfu=model_flops / t / peak)
    if micro_batches == 1:   # XLA counts a loop's body once: micro-batches undercount
      row["hfu"] = xla_flops / t / peak
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="XL")
  p.add_argument("--image", type=int, default=32, help="latent side (32: 256x256 images)")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--compute", default="bfloat16")
  p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--variants", default="none:2,block:1",
                 help="remat:micro_batches pairs, comma-separated")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dit_mfu.json"))
  args = p.parse_args()
  import jax
  rows = []
  for variant in args.variants.split(","):
    remat, micro = variant.split(":")
    try:
      row = measure(args, remat, int(micro))
    except Exception as e:   # noqa: BLE001 - an out-of-memory variant is a result too
      row = {"remat": remat, "micro_batches": int(micro), "error": f"{type(e).__name__}: "
             f"{str(e).splitlines()[0][:300]}"}
    rows.append(row)
    print(json.dumps(row), flush=True)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "command": "python3 benchmarks/dit_mfu.py " + " ".join(sys.argv[1:]),
            "size": args.size, "image": args.image, "batch": args.batch,
            "compute": args.compute, "rows": rows, "date": time.strftime("%Y-%m-%d")}
  text = json.dumps(result, indent=1)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(text)
  if os.environ.get("OUT"):
    (Path(os.environ["OUT"]) / "dit_mfu.json").write_text(text)


if __name__ == "__main__":
  main()
