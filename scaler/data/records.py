"""ArrayRecord image datasets: the files a path names, and records decoded into images.

A record is a tf.train.Example with the encoded image (PNG/JPEG) under `data.key` and
an optional integer label, or the bare encoded image. Reading goes through grain's
ArrayRecordDataSource (random access by record index; local paths and gs:// alike, the
file names listed through etils.epath). `scaler data convert` writes a `dataset.json`
beside the shards with the class count and names.

A record that does not decode is an error naming its file and index; with
`data.skip_bad_records` it is replaced by a good record of the same batch (so batches
keep their shape and stay within the split) and counted.
"""

import glob as glob_lib
import json
import logging

import numpy as np

from scaler.data import example_proto
from scaler.data import images
from scaler.data.reader import Rows
from scaler.errors import UserError

log = logging.getLogger("scaler")
DESCRIPTION = "dataset.json"
_GLOB_CHARS = "*?["
_MAGICS = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"GIF8")


def _epath(path):
  from etils import epath  # imported here: only this source needs it
  return epath.Path(path)


def find_files(path: str) -> list[str]:
  """The ArrayRecord files of `data.path`: a file, a glob, or a folder's
  `*.array_record*` files; sorted. A UserError says what was searched."""
  if any(c in path for c in _GLOB_CHARS):
    cut = min(path.find(c) for c in _GLOB_CHARS if c in path)
    base = path[:path.rfind("/", 0, cut) + 1] or "."
    pattern = path[len(base):] if base != "." else path
    files = sorted(str(p) for p in _epath(base).glob(pattern) if not p.is_dir()) \
        if "://" in path else sorted(glob_lib.glob(path))
    searched = f"the glob {path}"
  else:
    p = _epath(path)
    if p.is_dir():
      files = sorted(str(f) for f in p.glob("*.array_record*") if not f.is_dir())
      searched = f"the folder {path} for *.array_record* files"
    elif p.exists():
      files = [str(p)]
    else:
      files, searched = [], f"the path {path}: it does not exist"
  if not files:
    raise UserError(f"no ArrayRecord files at data.path={path}: searched {searched}")
  return files


def read_description(files: list[str]) -> dict:
  """The `dataset.json` that `scaler data convert` wrote beside the shards, or {}."""
  p = _epath(files[0]).parent / DESCRIPTION
  try:
    return json.loads(p.read_text()) if p.exists() else {}
  except (ValueError, OSError):
    log.warning("ignoring %s: not readable JSON", p)
    return {}


class BadRecord(Exception):
  pass


class ArrayRecordReader:
  """The records of some ArrayRecord files as one indexable dataset of images."""

  def __init__(self, path: str, key: str, label_key: str | None, num_classes: int,
               image_size: int, grayscale, skip_bad: bool):
    import grain  # imported here: only this source needs it
    self.name, self.files = path, find_files(path)
    self.key, self.image_size, self.grayscale, self.skip_bad = key, image_size, grayscale, skip_bad
    self._warned = set()
    try:
      self.records = grain.sources.ArrayRecordDataSource(self.files)
    except Exception:  # noqa: BLE001 - find which file, for the message
      self._name_bad_file()
      raise
    counts = [self.records._read_instructions[i].num_records for i in range(len(self.files))]
    self.starts = np.cumsum([0] + counts)
    if len(self.records) < 2:
      raise UserError(f"data.path={path}: {len(self.records)} records; needs at least 2")
    description = read_description(self.files)
    self.class_names = tuple(description.get("class_names", ()))
    fields, first, first_i = self._first_good()
    self.shape, self.dtype = first.shape, first.dtype
    self.first_where = self.where(first_i)
    if label_key is None:
      label_key = "label" if "label" in fields else None
    elif label_key not in fields:
      raise UserError(f"data.label_key='{label_key}' is not in the records of {path}; "
                      f"{self.where(first_i)} holds features {sorted(fields)}")
    self.label_key = label_key
    if label_key is None:
      self.num_classes = 0
    else:  # None: counted on the statistics sample, checked on every batch
      self.num_classes = num_classes or description.get("num_classes") or None

  def _name_bad_file(self):
    from array_record.python import array_record_module
    for f in self.files:
      try:
        array_record_module.ArrayRecordReader(f).close()
      except Exception as e:  # noqa: BLE001
        raise UserError(f"data file {f} is not a readable ArrayRecord file ({e})") from None

  def __len__(self):
    return len(self.records)

  def where(self, i: int) -> str:
    f = int(np.searchsorted(self.starts, i, side="right")) - 1
    return f"{self.files[f]} record {i - int(self.starts[f])}"

  def _fields(self, record: bytes, i: int) -> dict:
    if record[:4].startswith(_MAGICS):
      return {self.key: [record]}
    try:
      return example_proto.decode(record)
    except ValueError as e:
      raise BadRecord(f"{self.where(i)} is neither an encoded image nor an Example ({e})") from None

  def _decode(self, record: bytes, i: int):
    fields = self._fields(record, i)
    data = fields.get(self.key)
    if not data or not isinstance(data[0], bytes):
      raise BadRecord(f"{self.where(i)} has no image bytes under '{self.key}' (data.key); "
                      f"its features: {sorted(fields)}")
    try:
      x = images.decode(data[0], self.image_size, self.grayscale, self.where(i))
    except images.BadImage as e:
      raise BadRecord(f"{self.where(i)} does not decode as an image ({e})") from None
    label = None
    if getattr(self, "label_key", None):
      value = fields.get(self.label_key)
      if not value or not isinstance(value[0], int):
        raise BadRecord(f"{self.where(i)} has no integer '{self.label_key}' (data.label_key)")
      label = value[0]
    return fields, x, label

  def _first_good(self):
    for i in range(min(len(self.records), 64)):
      try:
        fields, x, _ = self._decode(self.records[i], i)
        return fields, x, i
      except BadRecord as e:
        if not self.skip_bad:
          raise UserError(f"{e}; set data.skip_bad_records=true to skip such records") from None
    raise UserError(f"none of the first 64 records of {self.name} decodes as an image")

  def read(self, idx) -> Rows:
    idx = [int(i) for i in np.asarray(idx)]
    raw = self.records.__getitems__(idx)
    xs, labels, wheres, bad = [], [], [], []
    for slot, (i, record) in enumerate(zip(idx, raw)):
      try:
        _, x, label = self._decode(record, i)
      except BadRecord as e:
        if not self.skip_bad:
          raise UserError(f"{e}; set data.skip_bad_records=true to skip such records") from None
        if i not in self._warned:  # once per record and process, not once per epoch
          self._warned.add(i)
          log.warning("skipping a bad record: %s", e)
        bad.append(slot)
        x, label = None, None
      xs.append(x), labels.append(label), wheres.append(self.where(i))
    if bad:
      good = [s for s in range(len(idx)) if s not in set(bad)]
      if not good:
        raise UserError(f"no record of this batch decodes, e.g. {wheres[0]}")
      for k, s in enumerate(bad):  # a good record of the same batch stands in
        xs[s], labels[s] = xs[good[k % len(good)]], labels[good[k % len(good)]]
    x = images.same_shape(xs, wheres, self.shape, self.first_where)
    label = np.array(labels, np.int32) if self.label_key else None
    return Rows(x, label, len(bad))

  def fingerprint_bytes(self) -> bytes:
    sizes = []
    for f in self.files:
      try:
        sizes.append(_epath(f).stat().length)
      except (OSError, AttributeError):
        sizes.append(-1)
    return json.dumps([[f.rsplit("/", 1)[-1] for f in self.files], sizes,
                       self.starts.tolist(), self.key, self.label_key, self.image_size,
                       self.grayscale]).encode()

  def sample_bytes(self, idx) -> bytes:
    return b"".join(self.records.__getitems__([int(i) for i in idx]))

  def stats_path(self, name: str):
    return _epath(self.files[0]).parent / ".scaler" / f"{name}.json"
