"""What every reader of a dataset provides: random access to its examples as stored.

A reader covers one whole dataset (every file, before any split); `Source` (source.py)
picks a split's rows from it and normalises them. Readers are plain picklable objects
(open files are reopened after unpickling), so grain worker processes can use them.

  name                 the file or folder, for messages
  shape, dtype         one example, as stored (uint8 images stay uint8)
  num_classes          classes known without reading every example; None: count them
                       on the statistics sample; 0: unlabelled
  class_names          where the data names its classes (folder names)
  __len__()            examples
  read(idx)            Rows of the examples at `idx` (an int64 array), in that order
  where(i)             example i, for a message: "f.npy row 12", "shard-3 record 7"
  fingerprint_bytes()  file metadata (names, sizes, shapes); with some examples'
                       stored bytes (sample_bytes) it identifies the data cheaply
  stats_path(name)     where statistics are cached beside the data, or None
"""

from typing import NamedTuple

import numpy as np


class Rows(NamedTuple):
  x: np.ndarray                  # (n, *shape), the stored dtype
  label: np.ndarray | None       # (n,) int32, or None when unlabelled
  bad: int = 0                   # records that did not decode and were replaced


def ordered_read(read_sorted, idx: np.ndarray):
  """Reads rows in ascending order (sequential on disk, one pass over a memory map) and
  returns them in the order asked for."""
  order = np.argsort(idx, kind="stable")
  rows = read_sorted(idx[order])
  out = np.empty_like(rows)
  out[order] = rows
  return out


def check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
  """Labels must be one non-negative integer per example; returns them as int32."""
  accepted = f"accepted: integers 0..K-1, one per example (shape ({n},))"
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where} is {labels.dtype} {labels.shape}; {accepted}")
  if n and labels.min() < 0:
    raise ValueError(f"{where} holds the negative label {int(labels.min())}; {accepted}")
  return labels.astype(np.int32)
