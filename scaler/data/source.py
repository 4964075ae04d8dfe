"""A data source: one split of a dataset, read by rows, normalised batch by batch.

    source = load_source(cfg.data, "train")     # opens files; reads no examples but
                                                # the statistics sample (or its cache)
    len(source), source.spec                    # examples; shape, kind, statistics
    source.rows(idx)   # {"x": float32 (n, *shape) normalised, "label": int32 (n,)}

Generated and shipped data (toys, digits) live in memory; user files stay on disk and
a batch reads only its rows. User files have no held-out file: the last 10% of a
permutation seeded by `data.seed` is the test split, and the training split never
contains those rows (nor are they sampled for the statistics).
"""

import dataclasses

import numpy as np

from scaler.config import Named
from scaler.data import arrays
from scaler.data import digits as digits_lib
from scaler.data import stats
from scaler.data import toy
from scaler.data.config import DATA_SOURCES, TOYS
from scaler.data.reader import Rows
from scaler.data.spec import DataSpec, check_shape, non_finite_message
from scaler.errors import UserError

SOURCES = tuple(DATA_SOURCES)


@dataclasses.dataclass(frozen=True)
class ReadOptions:
  """How the loader reads this source: batches ahead, threads, worker processes."""
  prefetch: int = 2
  threads: int = 1
  workers: int = 0


@dataclasses.dataclass(eq=False)
class Source:
  reader: object                 # a dataset reader (see reader.py)
  index: np.ndarray | None       # the split's rows of the dataset; None: all of them
  spec: DataSpec
  split: str
  options: ReadOptions = ReadOptions()

  def __len__(self) -> int:
    return len(self.reader) if self.index is None else len(self.index)

  def read(self, idx) -> Rows:
    """The examples at split positions `idx` as stored, checked finite and in range."""
    idx = np.asarray(idx, np.int64)
    rows_idx = idx if self.index is None else self.index[idx]
    rows = self.reader.read(rows_idx)
    bad = non_finite_message(rows.x, lambda i: self.reader.where(int(rows_idx[i])))
    if bad:
      raise UserError(f"data {self.reader.name}: {bad}")
    k = self.spec.num_classes
    if k and rows.label is not None and len(rows.label) and rows.label.max() >= k:
      i = int(np.argmax(rows.label >= k))
      raise UserError(f"{self.reader.where(int(rows_idx[i]))} has label {int(rows.label[i])}, "
                      f"but the data has {k} classes (counted on a sample); set "
                      "data.num_classes")
    return rows

  def rows(self, idx) -> dict:
    """{"x": float32 normalised (n, *shape), "label": int32 (n,)} (no label when
    unlabelled), reading only those rows."""
    return self.batch(self.read(idx))

  def batch(self, rows: Rows) -> dict:
    x = self.spec.normalize(rows.x.astype(np.float32)).astype(np.float32, copy=False)
    out = {"x": x}
    if self.spec.num_classes:
      out["label"] = rows.label
    return out


def split_rows(n: int, seed: int):
  """(train rows, test rows) of a dataset of n examples, each sorted."""
  order = np.random.default_rng(seed).permutation(n)
  n_test = max(1, n // 10)
  dtype = np.int32 if n < 2**31 else np.int64
  return np.sort(order[:-n_test]).astype(dtype), np.sort(order[-n_test:]).astype(dtype)


def _open(cfg: Named, split: str):
  """(reader of the split's examples, its rows or None, reader of the training
  examples, the training rows or None): what the spec and the split are read from."""
  name, c = cfg.name, cfg.cfg
  if name in TOYS:
    def make(s):
      n = c.num_train if s == "train" else c.num_test
      x, label = toy.generate(name, n, c.seed, s, getattr(c, "noise", 0.0))
      return arrays.ArrayReader(x, label, toy.NUM_CLASSES.get(name, 0) if label is not None
                                else 0, f"{name} ({s})")
    train = make("train")
    return (train if split == "train" else make(split)), None, train, None
  if name == "digits":
    def make(s):
      x, label = digits_lib.digits(s)
      return arrays.ArrayReader(x, label, 10, f"digits ({s})")
    train = make("train")
    return (train if split == "train" else make(split)), None, train, None
  reader = _open_file(name, c)
  train_rows, test_rows = split_rows(len(reader), c.seed)
  return reader, (train_rows if split == "train" else test_rows), reader, train_rows


def _open_file(name: str, c):
  if name == "npy":
    return arrays.open_npy(c.path)
  if name == "npz":
    return arrays.open_npz(c.path, c.key, c.label_key)
  if c.path is None:
    raise UserError(f"data.source={name} needs data.path")
  if name == "image_folder":
    from pathlib import Path

    from scaler.data.images import ImageFolderReader
    p = Path(c.path)
    if not p.is_dir():
      raise UserError(f"data.path={p} is not a folder of images"
                      + (" (it does not exist)" if not p.exists() else ""))
    return ImageFolderReader(p, c.image_size, c.grayscale, c.classes)
  from scaler.data.records import ArrayRecordReader
  return ArrayRecordReader(c.path, c.key, c.label_key, c.num_classes, c.image_size,
                           c.grayscale, c.skip_bad_records)


def load_source(cfg: Named, split: str, spec: DataSpec | None = None) -> Source:
  """The `split` ("train" or "test") of the configured source.

  `spec`: the statistics to normalise with (a run's saved spec, so a resume never
  recomputes them); default: the training split's, from the cache or a sample.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if cfg.name not in DATA_SOURCES:
    raise UserError(f"unknown data.source '{cfg.name}'; accepted: {', '.join(SOURCES)}")
  reader, rows, train_reader, train_rows = _open(cfg, split)
  if spec is None:
    spec = stats.train_spec(train_reader, train_rows, cfg.name, cfg.cfg)
  elif tuple(spec.shape) != tuple(reader.shape):
    raise UserError(f"the run's data spec has examples of shape {tuple(spec.shape)}, but "
                    f"data {reader.name} gives {tuple(reader.shape)}")
  check_shape(reader.shape, f"data {reader.name}")
  c = cfg.cfg
  options = ReadOptions(c.prefetch, getattr(c, "threads", 1), getattr(c, "workers", 0))
  return Source(reader, rows, spec, split, options)


def load_spec(cfg: Named) -> DataSpec:
  """The training split's spec: shape, kind, normalisation, classes. Cheap: it opens
  the files and reads the cached statistics (or computes them on a bounded sample)."""
  return load_source(cfg, "train").spec


def fingerprint(source: Source) -> str:
  """A short hash of the split: file metadata, a few examples' bytes and the split's
  rows; the checkpoint record notes what a run trained on. Never reads every byte."""
  index = b"" if source.index is None else np.ascontiguousarray(
      source.index[::max(1, len(source.index) // 64)]).tobytes()
  return arrays.digest(stats.reader_fingerprint(source.reader).encode(),
                       f"{source.split} {len(source)}".encode(), index)
