"""Step FLOPs from XLA's cost analysis, and model FLOPs utilisation where the peak is known.

`cost_analysis()` of an SPMD-partitioned executable counts the FLOPs of one device's
program, so the global figure is that times the device count. The count is XLA's: with
activation checkpointing it includes the recomputed forward, so the utilisation below
is of hardware FLOPs (what the chips did), an upper bound on model FLOPs utilisation.
"""

import jax

# Dense peak FLOP/s per chip by device kind (vendor data sheets; SXM parts for GPUs).
PEAKS = {
    "bfloat16": {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
                 "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
                 "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12},
    "float32": {"H200": 67e12, "H100": 67e12, "A100": 19.5e12, "L4": 30e12},
}


def per_device_flops(compiled) -> float:
  """FLOPs of one device's program for one call of `compiled`."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def peak_flops(device, dtype: str) -> float | None:
  """The chip's dense peak for `dtype` (float16 counts as bfloat16), or None if unknown."""
  table = PEAKS.get("bfloat16" if dtype == "float16" else dtype, {})
  kind = getattr(device, "device_kind", "")
  for name in sorted(table, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
    if name.lower() in kind.lower():
      return table[name]
  return None


def throughput(steps_per_sec: float, flops_per_device: float, batch_size: int,
               compute_dtype: str) -> dict:
  """The per-step rates that go into the metrics."""
  devices = jax.devices()
  out = {"steps_per_sec": steps_per_sec, "examples_per_sec": steps_per_sec * batch_size,
         "flops_per_sec": steps_per_sec * flops_per_device * len(devices),
         "flops_per_sec_per_device": steps_per_sec * flops_per_device}
  peak = peak_flops(devices[0], compute_dtype)
  if peak:
    out["flops_utilization"] = steps_per_sec * flops_per_device / peak
  return out
