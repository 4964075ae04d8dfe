"""Normalisation statistics, computed once per dataset on a bounded sample and reused.

The statistics of a file source come from at most `data.stats_examples` examples of
its training split (a seeded sample), never from the held-out split. They are cached
beside the data (`.scaler/<file>.<settings>.json`, keyed on the dataset's fingerprint
and on the settings that change what is read), so the next run on the same data reads
them back instead of decoding the sample again. Where the data's folder cannot be
written (a read-only mount, a bucket), nothing is cached there; the run directory's
saved spec (see spec.py) still makes every resume reuse them.
"""

import hashlib
import json
import logging
import os
import socket

import numpy as np

from scaler.data.arrays import digest
from scaler.data.spec import DataSpec, Moments, check_shape, non_finite_message
from scaler.errors import UserError

log = logging.getLogger("scaler")
FORMAT = "scaler.data_stats/1"
CHUNK = 512          # examples decoded at once while computing statistics
FINGERPRINT_ROWS = 16


def reader_fingerprint(reader) -> str:
  """File metadata and the stored bytes of a few evenly spaced examples."""
  n = len(reader)
  sample = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_ROWS)).astype(np.int64))
  return digest(reader.fingerprint_bytes(), reader.sample_bytes(sample))


def settings_name(source: str, cfg) -> str:
  """A short name for the settings that change what is read and sampled."""
  reading = ("prefetch", "threads", "workers", "skip_bad_records")
  kept = {k: v for k, v in sorted(vars(cfg).items()) if k not in reading}
  return f"{source}-stats-{hashlib.sha256(repr(kept).encode()).hexdigest()[:10]}"


def sample_indices(train_index: np.ndarray | None, n: int, limit: int | None, seed: int):
  """Sorted dataset rows of a seeded sample of at most `limit` training examples."""
  rows = np.arange(n) if train_index is None else train_index
  if limit is not None and len(rows) > limit:
    pick = np.random.default_rng([seed, 0x57A7]).choice(len(rows), limit, replace=False)
    rows = rows[np.sort(pick)]
  return np.asarray(rows, np.int64)


def compute(reader, rows: np.ndarray) -> DataSpec:
  """The spec from the examples at dataset `rows`; refuses non-finite values."""
  kind = check_shape(reader.shape, f"data {reader.name}")
  moments, max_label = Moments(), -1
  for start in range(0, len(rows), CHUNK):
    chunk = rows[start:start + CHUNK]
    got = reader.read(chunk)
    bad = non_finite_message(got.x, lambda i: reader.where(int(chunk[i])))
    if bad:
      raise UserError(f"data {reader.name}: {bad}")
    moments.add(got.x)
    if got.label is not None and len(got.label):
      max_label = max(max_label, int(got.label.max()))
  num_classes = reader.num_classes
  if num_classes is None:  # labels that only a full pass could count: the sample's
    num_classes = max_label + 1
  return moments.spec(reader.shape, kind, int(num_classes), reader.class_names,
                      str(reader.dtype))


def train_spec(reader, train_index, source: str, cfg) -> DataSpec:
  """The training split's spec: from the cache beside the data when it matches, else
  computed on the bounded sample (and cached)."""
  limit = getattr(cfg, "stats_examples", None)
  path = reader.stats_path(settings_name(source, cfg))
  fingerprint = reader_fingerprint(reader) if path is not None else None
  cached = _read(path, fingerprint)
  if cached is not None:
    return cached
  spec = compute(reader, sample_indices(train_index, len(reader), limit, getattr(cfg, "seed", 0)))
  _write(path, fingerprint, spec)
  return spec


def _read(path, fingerprint) -> DataSpec | None:
  if path is None:
    return None
  try:
    if not path.exists():
      return None
    d = json.loads(path.read_text())
    if d.get("format") == FORMAT and d.get("fingerprint") == fingerprint:
      return DataSpec.from_json(d["spec"])
  except (ValueError, KeyError, TypeError, OSError) as e:
    log.warning("ignoring the cached data statistics %s (%s)", path, e)
  return None


def _write(path, fingerprint, spec: DataSpec) -> None:
  if path is None:
    return
  record = {"format": FORMAT, "fingerprint": fingerprint, "spec": spec.to_json()}
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A private name, then a rename: processes of one run may write the same file at once.
    tmp = path.parent / f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.rename(path)
  except OSError as e:
    log.info("data statistics not cached beside the data (%s): %s", path, e)
