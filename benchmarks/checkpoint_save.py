"""What a checkpoint costs the train loop, against raw file I/O of the same bytes, and
what verifying every array (scaler/checkpoint_checksums.py) adds to it.

    python3 benchmarks/checkpoint_save.py          # ~2 minutes on 2 CPU cores

On 8 simulated CPU devices, a ~200 MB state (params + adam mu, nu; matrices sharded over
`data`) goes through `Checkpointer`:
  * time the loop is blocked by one async save / by one synchronous save; target <= 0.10;
  * synchronous save throughput / a raw write of the same shards (tofile + fsync);
  * restore into the same shardings / a raw read of those files put back on the devices;
  * each save and restore with checksums (as shipped) and without them (the checksum
    functions replaced by no-ops, in the same process): targets, verification adds at
    most 10% to restore time and nothing measurable to the async save's blocked time.
Each figure is the median of a few runs, all kinds interleaved so that the load of other
processes on the host hits them alike. Reads come from the page cache (the files were
just written), on both sides. Figures go to benchmarks/results/checkpoint_save.json.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from scaler import checkpoint_checksums as sums  # noqa: E402
from scaler.checkpoint import Checkpointer  # noqa: E402
from scaler.config import CheckpointConfig  # noqa: E402

RUNS = 11
LAYERS, WIDTH = 4, 2048     # 4 x 2048 x 2048 float32 = 67 MB of params, x3 with adam


def make_state(mesh):
  def init():
    keys = jax.random.split(jax.random.key(0), LAYERS)
    net = {f"w{i}": jax.random.normal(k, (WIDTH, WIDTH)) for i, k in enumerate(keys)}
    net["b"] = jnp.zeros(WIDTH)
    return {"step": jnp.int32(0), "params": {"net": net},
            "opt_state": {"net": optax.adam(1e-3).init(net)}, "ema": {}, "rest": {"net": {}},
            "extra": None}

  abstract = jax.eval_shape(init)
  shardings = jax.tree.map(
      lambda a: NamedSharding(mesh, P("data") if a.ndim == 2 else P()), abstract)
  state = jax.jit(init, out_shardings=shardings)()
  # Non-zero moments, so no write can be cheaper for being zeros.
  state["opt_state"] = jax.tree.map(lambda x: x + 1.0 if x.ndim == 2 else x, state["opt_state"])
  return jax.block_until_ready(state), shardings


def state_bytes(state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(state))


def unique_shards(state):
  """(leaf index, shard) for one copy of every piece of data, as a checkpoint writes."""
  for i, leaf in enumerate(jax.tree.leaves(state)):
    for shard in leaf.addressable_shards:
      if shard.replica_id == 0:
        yield i, shard


def raw_write(state, directory: Path) -> float:
  t0 = time.perf_counter()
  for i, shard in unique_shards(state):
    with open(directory / f"{i}_{shard.device.id}.bin", "wb") as f:
      np.asarray(shard.data).tofile(f)
      f.flush()
      os.fsync(f.fileno())
  return time.perf_counter() - t0


def _key(index) -> tuple:
  return tuple((i.start, i.stop) for i in index)   # slices are unhashable before 3.12


def raw_read(state, directory: Path) -> float:
  """Reads the raw files back onto the devices, each shard where it was."""
  t0 = time.perf_counter()
  out = []
  for i, leaf in enumerate(jax.tree.leaves(state)):
    files = {_key(s.index): directory / f"{i}_{s.device.id}.bin"
             for s in leaf.addressable_shards if s.replica_id == 0}

    def read(index, leaf=leaf, files=files):
      shape = tuple(len(range(*ix.indices(n))) for ix, n in zip(index, leaf.shape))
      return np.fromfile(files[_key(index)], leaf.dtype).reshape(shape)

    out.append(jax.make_array_from_callback(leaf.shape, leaf.sharding, read))
  jax.block_until_ready(out)
  return time.perf_counter() - t0


class Unverified:
  """Checksums neither computed at save time nor checked on restore, while inside."""

  def __enter__(self):
    self.saved = (sums.stored, sums.verify)
    sums.stored = lambda *_: (lambda: {"algorithm": "none"})
    sums.verify = lambda *_: None

  def __exit__(self, *_):
    sums.stored, sums.verify = self.saved


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def main():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
  state, shardings = make_state(mesh)
  nbytes = state_bytes(state)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          state, shardings)
  tmp = Path(tempfile.mkdtemp(prefix="scaler_ckpt_bench_"))
  kinds = ("async_blocked_s", "async_until_committed_s", "sync_blocked_s", "restore_s")
  samples = {k: [] for k in ("raw_write_s", "raw_read_s", "checksum_s",
                             *kinds, *(f"{k[:-2]}_unverified_s" for k in kinds))}

  def ckpt(name, async_save):
    return Checkpointer(str(tmp / name), CheckpointConfig(every=1, keep_last=RUNS + 1,
                                                          async_save=async_save), {})

  try:
    ckpts = {(a, v): ckpt(f"{'async' if a else 'sync'}_{v}", a)
             for a in (False, True) for v in ("verified", "unverified")}
    for step in range(RUNS + 1):          # step 0 compiles the checksums: not counted
      record = {}
      for (asyn, verified), c in ckpts.items():
        suffix = "" if verified == "verified" else "_unverified"
        with Unverified() if suffix else contextlib.nullcontext():
          t0 = time.perf_counter()
          c.save(step, state, {"step": step})
          blocked = time.perf_counter() - t0
          c.wait()
          if asyn:
            record[f"async_blocked{suffix}_s"] = blocked
            record[f"async_until_committed{suffix}_s"] = time.perf_counter() - t0
          else:
            record[f"sync_blocked{suffix}_s"] = blocked
      raw_dir = tmp / f"raw{step}"
      raw_dir.mkdir()
      record["raw_write_s"] = raw_write(state, raw_dir)
      record["raw_read_s"] = raw_read(state, raw_dir)
      for verified in ("verified", "unverified"):
        suffix = "" if verified == "verified" else "_unverified"
        with Unverified() if suffix else contextlib.nullcontext():
          c = ckpts[(False, verified)]
          record[f"restore{suffix}_s"] = timed(
              lambda c=c, step=step: jax.block_until_ready(c.restore(abstract, step=step)[0]))
      record["checksum_s"] = timed(lambda: sums.to_host(*sums.checksums(state)))
      if step:
        for k, v in record.items():
          samples[k].append(v)
    restored = ckpts[(False, "verified")].restore(abstract, step=RUNS)[0]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored),
                                                    jax.tree.leaves(state)))
    for c in ckpts.values():
      c.close()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  med = {k: statistics.median(v) for k, v in samples.items()}
  mb = nbytes / 1e6
  results = {
      "state_mb": round(mb, 1),
      "devices": jax.device_count(),
      "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
      "runs": RUNS,
      **med,
      "blocked_ratio_async_over_sync": med["async_blocked_s"] / med["sync_blocked_s"],
      "blocked_ratio_target": 0.10,
      "save_mb_per_s": mb / med["sync_blocked_s"],
      "raw_write_mb_per_s": mb / med["raw_write_s"],
      "save_over_raw_write_time": med["sync_blocked_s"] / med["raw_write_s"],
      "restore_over_raw_read_time": med["restore_s"] / med["raw_read_s"],
      "verified_over_unverified": {
          k: med[k] / med[f"{k[:-2]}_unverified_s"] for k in kinds},
      # Per run, then the median: both figures of a pair come from the same moment.
      "verified_over_unverified_paired": {
          k: statistics.median(a / b for a, b in zip(samples[k],
                                                     samples[f"{k[:-2]}_unverified_s"]))
          for k in kinds},
      "restore_overhead_target": 0.10,
      "samples": samples,
  }
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "checkpoint_save.json").write_text(json.dumps(results, indent=1) + "\n")
  print(json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
  main()
