"""The accelerator check: what scaler does on this machine's GPU (or TPU), in one run.

    bash benchmarks/device_check.sh              # installs the project if needed, then this
    python3 benchmarks/device_check.py           # one GPU: about 5 minutes, at most ~7
    python3 benchmarks/device_check.py --smoke   # CPU, 4 simulated devices, tiny sizes: the
                                                 # same code paths (the tests run it)

Four sections, each given what is left of a time budget (`--budget-s`); one that fails or
would not fit is recorded with the reason, and the others run:

  step        the train step's FLOPs utilisation. DiT-XL/2 (32x32x4 latents, patch 2) in
              bfloat16 at batch 256 when `dit` is in the model registry; else the UNet on
              64x64x3 images at batch 256, in float32 and in bfloat16. The record says which
              network ran and where its FLOP count comes from (the architecture, or XLA's
              count of the compiled step, which includes any recomputation).
  parallel    the UNet step with fsdp over every local device against data-parallel: step
              time and per-device bytes of the state and of the compiled step.
  checkpoint  the time the loop is blocked by one asynchronous save of that state, the
              commit's wait, and save and restore throughput to local disk.
  data        the loader's throughput on real image files made on the fly (an image folder
              of PNGs, and the ArrayRecord shards `scaler data convert` makes of it), with
              threads and with worker processes, against what the UNet step consumes.

Results: benchmarks/results/device/<device kind>.json (smoke runs: cpu-smoke.json), or
--out; also copied to $OUT when that is set (the device tool's output folder).
"""

import argparse
import os
import sys

SMOKE_DEVICES = 4


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, every section")
  p.add_argument("--out", help="the JSON to write (default: benchmarks/results/device/...)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="seconds for all sections (default 420; --smoke: 600)")
  p.add_argument("--sections", default="step,parallel,checkpoint,data")
  return p.parse_args(argv)


ARGS = _args()
if ARGS.smoke:   # before jax is imported: the device count is read once
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")]
      + [f"--xla_force_host_platform_device_count={SMOKE_DEVICES}"])
  os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "device"


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What each section runs at: the real check, or the smoke run's tiny stand-ins."""
  unet: dict            # model section of the UNet
  image: int            # UNet image side (RGB)
  batch: int            # global batch of every step
  dit_size: str
  dit_latent: int       # DiT latent side (4 channels)
  steps: int            # timed steps per repeat
  repeats: int
  data_images: int      # images made for the data section
  data_batches: int     # batches the loader is timed over
  workers: int


FULL = Sizes(unet={"name": "unet", "base": 128, "mults": [1, 2, 2, 2], "num_res_blocks": 2},
             image=64, batch=256, dit_size="XL", dit_latent=32, steps=10, repeats=3,
             data_images=4096, data_batches=12, workers=min(8, max(1, (os.cpu_count() or 2) // 2)))
SMOKE = Sizes(unet={"name": "unet", "base": 8, "mults": [1], "num_res_blocks": 1,
                    "groups": 4, "time_dim": 16},
              image=8, batch=8, dit_size="tiny", dit_latent=8, steps=2, repeats=1,
              data_images=64, data_batches=4, workers=1)


def _config(model: dict, compute: str, batch: int, mesh=None, rules="data_parallel",
            micro_batches: int = 1):
  from scaler import config as config_lib
  return config_lib.from_dict({
      "family": {"name": "diffusion", "schedule": "linear", "num_timesteps": 1000},
      "model": model,
      "data": {"source": "npz", "path": "unused.npz"},   # never read: the spec is given
      "optimizer": {"name": "adamw", "lr": 1e-4, "schedule": "constant"},
      "precision": {"params": "float32", "compute": compute},
      "mesh": mesh or {"data": -1, "fsdp": 1, "tensor": 1},
      "rules": rules,
      "train": {"steps": 1000, "batch_size": batch, "micro_batches": micro_batches},
  })


def _spec(shape):
  import numpy as np

  from scaler.data import DataSpec
  return DataSpec(tuple(shape), "image", np.float32(0), np.float32(1))


def _per_device_bytes(tree) -> int:
  import jax
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "sharding"))


def measure_step(cfg, shape, sizes: Sizes, model_flops_per_example=None) -> tuple[dict, object]:
  """Compiles scaler's own step on random data and times it; returns (row, state)."""
  import jax
  import numpy as np

  from scaler import experiment as experiment_lib
  from scaler import mesh as mesh_lib
  from scaler import perf
  from scaler import state as state_lib
  from scaler.train import compile_step

  exp = experiment_lib.build(cfg, spec=_spec(shape))
  _, shardings = experiment_lib.abstract_shardings(exp)
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, exp.use_ema, exp.rules,
                              exp.mesh, 0)
  bsh = mesh_lib.batch_sharding(exp.mesh)
  x = np.random.default_rng(0).normal(size=(cfg.train.batch_size, *shape)).astype(np.float32)
  batch = {"x": jax.device_put(x, bsh)}
  key = jax.device_put(jax.random.key(0), mesh_lib.replicated(exp.mesh))
  t0 = time.perf_counter()
  step = compile_step(exp, shardings, bsh).lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = step(state, batch, key)     # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(sizes.repeats):
    t0 = time.perf_counter()
    for _ in range(sizes.steps):
      state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t0) / sizes.steps)
  step_s = statistics.median(times)
  devices = exp.mesh.devices.size
  xla_flops = perf.per_device_flops(step) * devices
  if model_flops_per_example:
    flops, source = 3 * model_flops_per_example * cfg.train.batch_size, "architecture (3 x forward)"
  else:
    flops, source = xla_flops, "XLA cost analysis of the compiled step"
  peak = perf.peak_flops(jax.devices()[0], cfg.precision.compute)
  mem = step.memory_analysis()
  row = {"network": cfg.model.name, "compute": cfg.precision.compute,
         "mesh": dict(exp.mesh.shape), "rules": cfg.rules, "batch": cfg.train.batch_size,
         "shape": list(shape), "micro_batches": cfg.train.micro_batches,
         "compile_s": round(compile_s, 2), "step_s": step_s, "step_s_all": times,
         "examples_per_sec": cfg.train.batch_size / step_s, "flops_per_step": flops,
         "flops_source": source, "xla_flops_per_step": xla_flops,
         "flops_per_sec_per_device": flops / step_s / devices,
         "peak_flops_per_device": peak,
         "utilization": flops / step_s / devices / peak if peak else None,
         "state_bytes_per_device": _per_device_bytes(state),
         "step_temp_bytes_per_device": getattr(mem, "temp_size_in_bytes", None),
         "loss": float(jax.device_get(metrics["denoiser/loss"]))}
  if cfg.model.name == "unet":
    row["unet"] = {k: v for k, v in cfg.model.cfg.__dict__.items()}
  return row, state


def _dit_available() -> bool:
  from scaler.nn.registry import NETWORKS
  return "dit" in NETWORKS


def section_step(sizes: Sizes, ctx: dict) -> dict:
  if _dit_available():
    from scaler.nn import registry
    dit_cfg = registry.NETWORKS["dit"][0]
    fields = {f.name for f in dataclasses.fields(dit_cfg)}
    model = {"name": "dit", "size": sizes.dit_size, "patch": 2}
    shape = (sizes.dit_latent, sizes.dit_latent, 4)
    # DiT-XL/2 at batch 256 needs ~170 GB of activations without recomputation: per-block
    # remat where the network offers it, else two micro-batches.
    variants = [({**model, "remat": "block"}, 1)] if "remat" in fields else []
    variants.append((model, 2))
    per_example = None
    try:
      from scaler.nn.dit import flops_per_example
      per_example = lambda m: flops_per_example(_config(m, "bfloat16", sizes.batch).model.cfg,  # noqa: E731
                                                shape)
    except ImportError:
      pass
    rows, errors = [], []
    for m, micro in variants:
      try:
        cfg = _config(m, "bfloat16", sizes.batch, micro_batches=micro)
        row, _ = measure_step(cfg, shape, sizes, per_example(m) if per_example else None)
        row.update(variant={"remat": m.get("remat", "none"), "micro_batches": micro})
        rows.append(row)
        break
      except Exception as e:  # noqa: BLE001 - out of memory: the next variant
        errors.append(f"remat={m.get('remat', 'none')} micro_batches={micro}: "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    return {"network": f"dit {sizes.dit_size}/2", "why": "dit is in the model registry",
            "rows": rows, "errors": errors}
  rows = []
  for compute in ("float32", "bfloat16"):
    cfg = _config(sizes.unet, compute, sizes.batch)
    row, state = measure_step(cfg, (sizes.image, sizes.image, 3), sizes)
    rows.append(row)
  ctx["unet_state"], ctx["unet_bf16_dp"] = state, rows[-1]
  ctx["unet_examples_per_sec"] = rows[-1]["examples_per_sec"]
  return {"network": "unet", "why": "no dit in the model registry (the UNet instead)",
          "rows": rows}


def section_parallel(sizes: Sizes, ctx: dict) -> dict:
  import jax
  n = jax.local_device_count()
  shape = (sizes.image, sizes.image, 3)
  dp = ctx.get("unet_bf16_dp")   # measured by the step section when it ran the UNet
  if dp is None:
    dp, ctx["unet_state"] = measure_step(_config(sizes.unet, "bfloat16", sizes.batch), shape,
                                         sizes)
  fsdp, _ = measure_step(_config(sizes.unet, "bfloat16", sizes.batch,
                                 mesh={"data": 1, "fsdp": n, "tensor": 1}, rules="fsdp"),
                         shape, sizes)
  ctx["unet_examples_per_sec"] = dp["examples_per_sec"]
  note = ("one device: fsdp and data-parallel are the same mesh" if n == 1 else
          f"fsdp over {n} devices")
  return {"devices": n, "note": note, "data_parallel": dp, "fsdp": fsdp,
          "fsdp_over_dp_step_time": fsdp["step_s"] / dp["step_s"],
          "fsdp_over_dp_state_bytes": fsdp["state_bytes_per_device"] / dp["state_bytes_per_device"]}


def section_checkpoint(sizes: Sizes, ctx: dict, workdir: Path) -> dict:
  import jax

  from scaler.checkpoint import Checkpointer
  from scaler.config import CheckpointConfig

  state = ctx.get("unet_state")
  if state is None:
    _, state = measure_step(_config(sizes.unet, "bfloat16", sizes.batch),
                            (sizes.image, sizes.image, 3), dataclasses.replace(sizes, steps=1))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  directory = workdir / "checkpoints"
  ckpt = Checkpointer(str(directory), CheckpointConfig(every=1, keep_last=2, async_save=True),
                      {"check": "device"})
  rows = []
  for step in (1, 2, 3):   # the first includes orbax's one-time set-up
    t0 = time.perf_counter()
    ckpt.save(step, state, {"step": step}, force=True)
    blocked = time.perf_counter() - t0
    ckpt.wait()
    total = time.perf_counter() - t0
    rows.append({"step": step, "blocked_s": blocked, "commit_s": total,
                 "save_bytes_per_sec": nbytes / total})
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
  restores = []
  for _ in range(2):
    t0 = time.perf_counter()
    restored, _, _ = ckpt.restore(target)
    jax.block_until_ready(restored)
    restores.append(time.perf_counter() - t0)
  ckpt.close()
  restore_s = min(restores)
  return {"state_bytes": nbytes, "directory": "a temporary directory on local disk",
          "saves": rows, "blocked_s": statistics.median(r["blocked_s"] for r in rows[1:]),
          "save_bytes_per_sec": statistics.median(r["save_bytes_per_sec"] for r in rows[1:]),
          "restore_s": restore_s, "restore_bytes_per_sec": nbytes / restore_s,
          "note": "reads may come from the page cache: the files were just written"}


def make_images(root: Path, n: int, side: int) -> None:
  """`n` RGB PNGs in two class folders: smooth blobs with noise, which compress like
  photographs rather than like pure noise."""
  import numpy as np
  from PIL import Image

  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:side, 0:side] / side
  for c in ("a", "b"):
    (root / c).mkdir(parents=True)
  for i in range(n):
    centre = rng.uniform(0.2, 0.8, 2)
    d = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2
    img = (np.exp(-d / rng.uniform(0.05, 0.3))[..., None] * rng.uniform(0, 255, 3)
           + rng.normal(0, 12, (side, side, 3)) + 40)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "PNG")
    (root / "ab"[i % 2] / f"{i:06d}.png").write_bytes(buf.getvalue())


def _loader_rate(cfg_data, batch: int, batches: int, workers: int) -> float:
  import jax

  from scaler import mesh as mesh_lib
  from scaler.config import MeshConfig
  from scaler.data import BatchLoader, load_source, to_global

  source = load_source(cfg_data, "train")
  bsh = mesh_lib.batch_sharding(mesh_lib.make_mesh(MeshConfig()))
  it = iter(BatchLoader(source, batch, seed=0, workers=workers))
  for _ in range(2):   # workers started, buffers filled once
    jax.block_until_ready(to_global(next(it), bsh, batch))
  t0 = time.perf_counter()
  for _ in range(batches):
    out = to_global(next(it), bsh, batch)
  jax.block_until_ready(out)
  rate = batches * batch / (time.perf_counter() - t0)
  it.close()
  return rate


def section_data(sizes: Sizes, ctx: dict, workdir: Path) -> dict:
  from scaler.data.config import data_config
  from scaler.data.convert import convert

  folder, shards = workdir / "images", workdir / "shards"
  t0 = time.perf_counter()
  make_images(folder, sizes.data_images, sizes.image)
  made_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  convert(folder, shards, shards=4, progress=False)
  convert_s = time.perf_counter() - t0
  consumption = ctx.get("unet_examples_per_sec")
  rows = []
  for name, cfg in (("image_folder", data_config("image_folder", path=str(folder))),
                    ("array_record", data_config("array_record", path=str(shards)))):
    for workers in (0, sizes.workers):
      rate = _loader_rate(cfg, sizes.batch, sizes.data_batches, workers)
      rows.append({"source": name, "workers": workers, "threads": cfg.cfg.threads,
                   "examples_per_sec": rate,
                   "over_step": rate / consumption if consumption else None})
  return {"images": sizes.data_images, "image": [sizes.image, sizes.image, 3],
          "make_s": made_s, "convert_s": convert_s,
          "step_examples_per_sec": consumption,
          "step": "the UNet bf16 data-parallel step of the sections above", "rows": rows}


SECTIONS = {"step": (section_step, 0.30), "parallel": (section_parallel, 0.25),
            "checkpoint": (section_checkpoint, 0.15), "data": (section_data, 0.15)}


def main() -> int:
  import jax

  sizes = SMOKE if ARGS.smoke else FULL
  budget = ARGS.budget_s or (600.0 if ARGS.smoke else 420.0)
  started = time.monotonic()
  dev = jax.devices()[0]
  kind = "cpu-smoke" if ARGS.smoke else dev.device_kind.replace(" ", "_").lower()
  out = Path(ARGS.out) if ARGS.out else RESULTS / f"{kind}.json"
  result = {"device": dev.device_kind, "platform": dev.platform,
            "local_devices": jax.local_device_count(), "jax": jax.__version__,
            "smoke": ARGS.smoke, "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python3 benchmarks/device_check.py " + " ".join(sys.argv[1:]),
            "sizes": dataclasses.asdict(sizes), "sections": {}}
  if dev.platform == "cpu" and not ARGS.smoke:
    print("device_check: no accelerator here (jax sees only the CPU); run with --smoke, or "
          "on a machine with a GPU or TPU", file=sys.stderr)
    return 2
  ctx = {}
  wanted = [s for s in ARGS.sections.split(",") if s]
  with tempfile.TemporaryDirectory(prefix="device_check-") as tmp:
    for name in wanted:
      fn, share = SECTIONS[name]
      left = budget - (time.monotonic() - started)
      if left < share * budget * 0.5:
        result["sections"][name] = {"skipped": f"{left:.0f} s of the budget left"}
        continue
      workdir = Path(tmp) / name
      workdir.mkdir()
      t0 = time.monotonic()
      try:
        args = (sizes, ctx, workdir) if name in ("checkpoint", "data") else (sizes, ctx)
        section = fn(*args)
      except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
        section = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}",
                   "traceback": traceback.format_exc()[-3000:]}
      section["seconds"] = round(time.monotonic() - t0, 1)
      result["sections"][name] = section
      print(f"device_check: {name}: {_line(name, section)}", flush=True)
      shutil.rmtree(workdir, ignore_errors=True)
  result["seconds"] = round(time.monotonic() - started, 1)
  text = json.dumps(result, indent=1, default=str)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  if os.environ.get("OUT"):
    Path(os.environ["OUT"], out.name).write_text(text)
  print(f"device_check: {result['seconds']:.0f} s; results in {out}")
  return 1 if any("error" in s for s in result["sections"].values()) else 0


def _line(name: str, s: dict) -> str:
  """One line a section, for the console."""
  if "error" in s or "skipped" in s:
    return s.get("error") or f"skipped ({s['skipped']})"
  pct = lambda u: f"{100 * u:.1f}%" if u is not None else "n/a (no known peak)"  # noqa: E731
  if name == "step":
    return f"{s['network']} ({s['why']}): " + "; ".join(
        f"{r['compute']} {r['step_s'] * 1e3:.1f} ms/step, utilisation {pct(r['utilization'])}"
        for r in s["rows"]) + (f"; failed: {s['errors']}" if s.get("errors") else "")
  if name == "parallel":
    return (f"{s['note']}: step time fsdp/dp {s['fsdp_over_dp_step_time']:.2f}, state bytes "
            f"per device fsdp/dp {s['fsdp_over_dp_state_bytes']:.2f}")
  if name == "checkpoint":
    return (f"{s['state_bytes'] / 1e6:.3g} MB: blocked {s['blocked_s'] * 1e3:.0f} ms by an "
            f"async save; save {s['save_bytes_per_sec'] / 1e6:.0f} MB/s, restore "
            f"{s['restore_bytes_per_sec'] / 1e6:.0f} MB/s")
  return "; ".join(f"{r['source']} workers={r['workers']}: {r['examples_per_sec']:.0f} ex/s"
                   + (f" ({r['over_step']:.1f}x the step)" if r["over_step"] else "")
                   for r in s["rows"])


if __name__ == "__main__":
  sys.exit(main())
