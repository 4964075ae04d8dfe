"""Arrays as data: generated or shipped ones in memory, .npy and .npz files memory-mapped.

A memory-mapped file stays on disk in its stored dtype; a batch reads its rows only.
An .npz member saved uncompressed (np.savez) is an .npy file at an offset inside the
zip, so it maps the same way; a compressed member (np.savez_compressed) has to be read
once, and stays in memory in its stored dtype.
"""

import hashlib
import math
import mmap
import zipfile
from pathlib import Path

import numpy as np

from scaler.data.reader import Rows, check_labels, ordered_read
from scaler.errors import UserError

NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"


class ArrayReader:
  """Examples held in memory (generated points, the digits, a compressed .npz member)."""

  def __init__(self, x: np.ndarray, labels=None, num_classes=0, name="data",
               path: Path | None = None):
    self.x, self.labels, self.name, self.path = x, labels, name, path
    self.shape, self.dtype = tuple(x.shape[1:]), x.dtype
    self.num_classes, self.class_names = num_classes, ()

  def __len__(self):
    return len(self.x)

  def read(self, idx) -> Rows:
    return Rows(self.x[idx], None if self.labels is None else self.labels[idx])

  def where(self, i: int) -> str:
    return f"{self.name} row {i}"

  def fingerprint_bytes(self) -> bytes:
    return f"{self.name} {self.x.shape} {self.x.dtype}".encode()

  def sample_bytes(self, idx) -> bytes:
    return np.ascontiguousarray(self.x[idx]).tobytes()

  def stats_path(self, name: str):
    return None if self.path is None else _beside(self.path, name)


class MmapReader(ArrayReader):
  """An .npy array (or an uncompressed .npz member) mapped read-only from its file.

  The mapping is advised random (no read-ahead around each row of a shuffled batch) and
  its pages are let go after every read: the kernel maps the pages around each touched
  row into the process, so without that the resident set of a process that has sampled
  rows all over a cached file grows to the whole file, though it read a few rows.
  """

  def __init__(self, path: Path, offset: int, dtype, shape, fortran: bool, name: str,
               labels=None, num_classes=0):
    self.mmap_args = (str(path), offset, np.dtype(dtype), tuple(shape), "F" if fortran else "C")
    super().__init__(self._map(), labels, num_classes, name, Path(path))

  def _map(self) -> np.ndarray:
    path, offset, dtype, shape, order = self.mmap_args
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset - start + dtype.itemsize * math.prod(shape)
    with open(path, "rb") as f:
      self._mmap = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=start)
    if hasattr(mmap, "MADV_RANDOM"):
      self._mmap.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype, self._mmap, offset - start, order=order)

  def _release(self) -> None:
    if hasattr(mmap, "MADV_DONTNEED"):
      self._mmap.madvise(mmap.MADV_DONTNEED)  # the file's pages stay in the page cache

  def read(self, idx) -> Rows:
    x = ordered_read(lambda i: self.x[i], np.asarray(idx))
    self._release()
    return Rows(x, None if self.labels is None else self.labels[idx])

  def sample_bytes(self, idx) -> bytes:
    out = super().sample_bytes(idx)
    self._release()
    return out

  def fingerprint_bytes(self) -> bytes:
    path, offset, dtype, shape, order = self.mmap_args
    return f"{Path(path).name} {Path(path).stat().st_size} {offset} {dtype} {shape} {order}".encode()

  # Pickled for grain worker processes by file and offset, never by content (pickling
  # the array would copy the whole file into the message).
  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("x", "_mmap")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.x = self._map()


def _beside(path: Path, name: str) -> Path:
  return Path(path).parent / ".scaler" / f"{Path(path).name}.{name}.json"


def _existing(path, source) -> Path:
  if path is None:
    raise UserError(f"data.source={source} needs data.path")
  p = Path(path)
  if not p.exists():
    raise UserError(f"data file not found: data.path={p}")
  if p.is_dir():
    raise UserError(f"data.path={p} is a folder; data.source={source} reads one file "
                    "(data.source=image_folder or array_record read folders)")
  return p


def _magic(p: Path) -> bytes:
  with open(p, "rb") as f:
    return f.read(6)


def _check_examples(shape, dtype, where):
  if len(shape) < 2 or shape[0] < 2 or not (np.issubdtype(dtype, np.integer)
                                             or np.issubdtype(dtype, np.floating)):
    raise UserError(f"{where}: expected a numeric array of shape (N, ...) with N >= 2, "
                    f"got {dtype} {tuple(shape)}")


def open_npy(path) -> MmapReader:
  p = _existing(path, "npy")
  if _magic(p).startswith(ZIP_MAGIC):
    raise UserError(f"data.path={p} is an .npz archive; use data.source=npz "
                    "(data.source=npy reads one .npy array)")
  try:
    m = np.load(p, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as e:
    raise UserError(f"data file {p} is not a readable .npy array ({e})") from None
  _check_examples(m.shape, m.dtype, f"data file {p}")
  fortran = m.ndim > 1 and m.flags.f_contiguous and not m.flags.c_contiguous
  return MmapReader(p, m.offset, m.dtype, m.shape, fortran, p.name)


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


def _npz_member(p: Path, key: str):
  """(array, None) for member `key` of the .npz at `p`, or (None, mmap args) where the
  member is stored uncompressed and can be mapped in place."""
  with zipfile.ZipFile(p) as zf, open(p, "rb") as fp:
    info = zf.getinfo(key + ".npy")
    if info.compress_type == zipfile.ZIP_STORED:
      # The local file header: 30 bytes, then the member's name and an extra field.
      fp.seek(info.header_offset)
      header = fp.read(30)
      fp.seek(info.header_offset + 30 + int.from_bytes(header[26:28], "little")
              + int.from_bytes(header[28:30], "little"))
      read_header = _HEADER_READERS.get(np.lib.format.read_magic(fp))
      if read_header is not None:
        shape, fortran, dtype = read_header(fp)
        if not dtype.hasobject:
          return None, (fp.tell(), dtype, shape, fortran)
  with np.load(p, allow_pickle=False) as z:
    return z[key], None


def open_npz(path, key, label_key) -> ArrayReader:
  p = _existing(path, "npz")
  if _magic(p).startswith(NPY_MAGIC):
    raise UserError(f"data.path={p} is an .npy array; use data.source=npy "
                    "(data.source=npz reads arrays from an .npz archive)")
  try:
    with np.load(p, allow_pickle=False) as z:
      keys = list(z.keys())
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise UserError(f"data file {p} is not a readable .npz archive ({e})") from None
  if key is None:
    candidates = [k for k in keys if k != label_key]
    if len(candidates) != 1:
      raise UserError(f"data file {p} holds arrays {keys}; name the examples with data.key")
    key = candidates[0]
  for what, k in (("data.key", key), ("data.label_key", label_key)):
    if k is not None and k not in keys:
      raise UserError(f"{what}='{k}' is not in {p}; it holds {keys}")
  try:
    x, mapped = _npz_member(p, key)
    labels = None
    if label_key is not None:
      with np.load(p, allow_pickle=False) as z:
        labels = z[label_key]
  except (ValueError, OSError) as e:
    raise UserError(f"data file {p}: array '{key}' is not readable ({e})") from None
  shape, dtype = (x.shape, x.dtype) if mapped is None else (mapped[2], mapped[1])
  _check_examples(shape, dtype, f"data file {p} (array '{key}')")
  num_classes = 0
  if labels is not None:
    try:
      labels = check_labels(labels, shape[0], f"data.label_key='{label_key}' in {p}")
    except ValueError as e:
      raise UserError(str(e)) from None
    num_classes = int(labels.max()) + 1
  name = f"{p.name}['{key}']"
  if mapped is None:
    return ArrayReader(x, labels, num_classes, name, p)
  return MmapReader(p, mapped[0], mapped[1], mapped[2], mapped[3], name, labels, num_classes)


def digest(*parts: bytes) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(part)
  return h.hexdigest()[:16]
