"""What a run needs to know about its data without reading it: `DataSpec`, saved as JSON.

A run directory keeps its spec (`save_spec`), so sampling, export and evaluation work
after the training files have moved, and a resume reuses the statistics it trained with.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from scaler.errors import UserError

FORMAT = "scaler.data_spec/1"
PLOTTABLE_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


@dataclasses.dataclass(frozen=True, eq=False)
class DataSpec:
  """Per-example shape and the affine map between data space and model space.

  Vectors are standardised per feature; images are mapped from their value range to
  [-1, 1]. The statistics come from (a bounded sample of) the training split only.
  """
  shape: tuple[int, ...]
  kind: str              # "vector" | "image"
  shift: np.ndarray
  scale: np.ndarray
  num_classes: int = 0   # labels 0..num_classes-1 in the batch's "label"; 0: unlabelled
  class_names: tuple[str, ...] = ()   # where the data names its classes (folders)
  dtype: str = "float32"  # the stored dtype (uint8 images, float32 vectors)

  def normalize(self, x):
    return (x - self.shift) / self.scale

  def denormalize(self, x):
    return x * self.scale + self.shift

  def to_json(self) -> dict:
    return {"format": FORMAT, "shape": list(self.shape), "kind": self.kind,
            "shift": np.asarray(self.shift, np.float32).tolist(),
            "scale": np.asarray(self.scale, np.float32).tolist(),
            "num_classes": self.num_classes, "class_names": list(self.class_names),
            "dtype": self.dtype}

  @classmethod
  def from_json(cls, d: dict) -> "DataSpec":
    # float32 -> JSON (the exact double) -> float32 is lossless: a saved spec normalises
    # bit for bit as the one it was made from.
    if not isinstance(d, dict) or d.get("format") != FORMAT:
      raise ValueError(f"not a {FORMAT} record")
    return cls(tuple(int(s) for s in d["shape"]), str(d["kind"]),
               np.asarray(d["shift"], np.float32), np.asarray(d["scale"], np.float32),
               int(d["num_classes"]), tuple(str(c) for c in d.get("class_names", ())),
               str(d.get("dtype", "float32")))


def save_spec(spec: DataSpec, path) -> None:
  """Writes `spec` as JSON at `path` (atomically: a reader never sees half a file)."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(spec.to_json(), indent=1))
  tmp.replace(path)


def read_spec(path) -> DataSpec:
  """The spec saved at `path`; a UserError naming the file when it is missing or bad."""
  path = Path(path)
  try:
    return DataSpec.from_json(json.loads(path.read_text()))
  except FileNotFoundError:
    raise UserError(f"data spec {path} not found (written by `scaler train` into the run "
                    "directory)") from None
  except (ValueError, KeyError, TypeError, OSError) as e:
    raise UserError(f"data spec {path} is not a scaler data spec ({e})") from None


def check_shape(shape: tuple, where: str) -> str:
  """The kind of examples of this shape; refuses images that cannot be pictured."""
  if len(shape) == 3:
    if shape[-1] not in PLOTTABLE_CHANNELS:
      raise UserError(
          f"{where}: images of shape {tuple(shape)} have {shape[-1]} channels; accepted: "
          "1 (grey), 3 (RGB) or 4 (RGBA), which can be pictured (or reshape them to "
          "vectors (N, H*W*C))")
    return "image"
  return "vector"


def non_finite_message(x: np.ndarray, where) -> str | None:
  """'N non-finite values in K examples, first at ...' or None; `where(i)` names row i."""
  if not np.issubdtype(x.dtype, np.floating):
    return None
  bad = ~np.isfinite(x.reshape(len(x), -1))
  if not bad.any():
    return None
  rows = np.flatnonzero(bad.any(axis=1))
  first = ", ".join(where(int(i)) for i in rows[:3])
  return (f"{int(bad.sum())} non-finite values (NaN or Inf) in {len(rows)} examples, first "
          f"at {first}; fix or drop them (the run would otherwise diverge at once)")


class Moments:
  """Streaming statistics over chunks of examples: per-feature mean and std for
  vectors, the value range for images. Float64 sums: exact enough at any sample size."""

  def __init__(self):
    self.n, self.sum, self.sumsq, self.lo, self.hi = 0, 0.0, 0.0, math.inf, -math.inf

  def add(self, x: np.ndarray) -> None:
    x64 = x.astype(np.float64)
    self.n += len(x)
    self.sum = self.sum + x64.sum(axis=0)
    self.sumsq = self.sumsq + (x64 * x64).sum(axis=0)
    self.lo, self.hi = min(self.lo, float(x64.min())), max(self.hi, float(x64.max()))

  def spec(self, shape, kind, num_classes=0, class_names=(), dtype="float32") -> DataSpec:
    if kind == "image":
      return DataSpec(tuple(shape), kind, np.float32((self.lo + self.hi) / 2),
                      np.float32(max((self.hi - self.lo) / 2, 1e-6)), num_classes,
                      tuple(class_names), dtype)
    mean = self.sum / self.n
    std = np.sqrt(np.maximum(self.sumsq / self.n - mean * mean, 0.0))
    return DataSpec(tuple(shape), kind, mean.astype(np.float32),
                    np.maximum(std, 1e-6).astype(np.float32), num_classes,
                    tuple(class_names), dtype)
