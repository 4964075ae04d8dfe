"""A data source: the examples of one split, normalised, with the spec to undo it."""

import dataclasses
import hashlib

import numpy as np

from scaler.data import digits as digits_lib
from scaler.data import files
from scaler.data import toy
from scaler.config import Named
from scaler.errors import UserError

SOURCES = (*toy.TOYS, "digits", "npy", "npz", "image_folder")


@dataclasses.dataclass(frozen=True, eq=False)
class DataSpec:
  """Per-example shape and the affine map between data space and model space.

  Vectors are standardised per feature; images are mapped from their value range to
  [-1, 1]. The statistics come from the training split only.
  """
  shape: tuple[int, ...]
  kind: str              # "vector" | "image"
  shift: np.ndarray
  scale: np.ndarray
  num_classes: int = 0   # labels 0..num_classes-1 in the batch's "label"; 0: unlabelled

  def normalize(self, x):
    return (x - self.shift) / self.scale

  def denormalize(self, x):
    return x * self.scale + self.shift


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
  x: np.ndarray                   # (N, *shape) float32, normalised
  spec: DataSpec
  label: np.ndarray | None = None


def _raw(data: Named, split: str):
  source, cfg = data.name, data.cfg
  if source in toy.TOYS:
    n = cfg.num_train if split == "train" else cfg.num_test
    if n < 1:
      raise UserError(f"data.num_{split}={n}: needs at least 1 example")
    return toy.generate(source, n, cfg.seed, split, cfg.noise), None
  if source == "digits":
    return digits_lib.digits(split)
  if source == "npy":
    x, y = files.load_npy(cfg.path), None
  elif source == "npz":
    x, y = files.load_npz(cfg.path, cfg.key, cfg.label_key)
  else:
    x, y = files.load_image_folder(cfg.path, cfg.image_size, cfg.grayscale, cfg.classes)
  if x.ndim < 2 or not np.issubdtype(x.dtype, np.number) or len(x) < 2:
    raise UserError(
        f"data file {cfg.path}: expected a numeric array of shape (N, ...) with N >= 2, "
        f"got {x.dtype} {x.shape}")
  return (files.split(x.astype(np.float32), split, cfg.seed),
          None if y is None else files.split(y, split, cfg.seed))


def _spec(x_train: np.ndarray, label_train) -> DataSpec:
  shape = tuple(x_train.shape[1:])
  num_classes = 0 if label_train is None else int(label_train.max()) + 1
  if len(shape) == 3:  # (H, W, C) images
    lo, hi = float(x_train.min()), float(x_train.max())
    return DataSpec(shape, "image", np.float32((lo + hi) / 2),
                    np.float32(max((hi - lo) / 2, 1e-6)), num_classes)
  mean = x_train.mean(axis=0).astype(np.float32)
  std = np.maximum(x_train.std(axis=0), 1e-6).astype(np.float32)
  return DataSpec(shape, "vector", mean, std, num_classes)


def load_source(cfg: Named, split: str) -> Source:
  """The `split` ("train" or "test") of the configured source, normalised."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if cfg.name not in SOURCES:
    raise UserError(f"unknown data.source '{cfg.name}'; accepted: {', '.join(SOURCES)}")
  x, label = _raw(cfg, split)
  spec = _spec(*((x, label) if split == "train" else _raw(cfg, "train")))
  return Source(np.ascontiguousarray(spec.normalize(x), np.float32), spec, label)


def load_spec(cfg: Named) -> DataSpec:
  """The training split's spec: shape, kind, normalisation, classes."""
  return load_source(cfg, "train").spec


def fingerprint(source: Source) -> str:
  """A short hash of the examples: the checkpoint record notes what a run trained on."""
  h = hashlib.sha256(str(source.x.shape).encode())
  h.update(source.x.tobytes())
  return h.hexdigest()[:16]
