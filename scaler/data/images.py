"""Images: decoding (PNG, JPEG, ...) with one rule for channels and size, and folders of
image files read lazily, one subfolder per class.

Channels: `grayscale` true gives 1, false gives RGB (3), null keeps the stored mode
(grey 1, RGB 3, RGBA 4; palettes become RGB or RGBA). Grey with alpha (2 channels) has
no picture to show, so it is refused with the setting that would convert it.
"""

import io
import os
import re
from pathlib import Path

import numpy as np

from scaler.data.reader import Rows
from scaler.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_AS_STORED = {"1": "L", "L": "L", "RGB": "RGB", "RGBA": "RGBA", "I;16": "I;16", "I": "I",
              "F": "F", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


class BadImage(Exception):
  """Bytes that do not decode as an image (the caller names the file or record)."""


def decode(data: bytes, image_size: int = 0, grayscale: bool | None = None,
           where: str = "image") -> np.ndarray:
  """(H, W, C) in the stored dtype (uint8, or uint16/int32/float32 for such files)."""
  from PIL import Image  # imported here: only image sources need it
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
    reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
    raise BadImage(f"{type(e).__name__}: {reason}") from None
  if grayscale is not None:
    mode = "L" if grayscale else "RGB"
  elif img.mode == "P":
    mode = "RGBA" if "transparency" in img.info else "RGB"
  elif img.mode in ("LA", "La", "PA"):
    raise UserError(f"{where} is grey with alpha (2 channels), which cannot be pictured; "
                    "set data.grayscale=true (1 channel) or data.grayscale=false (RGB)")
  else:
    mode = _AS_STORED.get(img.mode, "RGB")
  if img.mode != mode:
    img = img.convert(mode)
  if image_size:
    img = img.resize((image_size, image_size), Image.BILINEAR)
  x = np.asarray(img)
  return x[..., None] if x.ndim == 2 else x


def same_shape(images: list, wheres: list, first_shape, first_where) -> np.ndarray:
  """Stacks decoded images; images of another size or channel count are refused."""
  for img, where in zip(images, wheres):
    if img.shape != first_shape or img.dtype != images[0].dtype:
      raise UserError(
          f"images differ in size or channels: {first_where} is {_describe(first_shape)}, "
          f"{where} is {_describe(img.shape)}; set data.image_size to resize every image "
          "to a square (and data.grayscale to fix the channels)")
  return np.stack(images)


def _describe(shape) -> str:
  h, w, c = shape
  return f"{h}x{w} with {c} channel{'s' if c > 1 else ''}"


def list_images(root: Path, classes: bool):
  """(files relative to root, labels or None, class names). Hidden entries (such as the
  statistics cache .scaler/) are skipped; files are in sorted order."""
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    rel = Path(dirpath).relative_to(root)
    files += [rel / f for f in sorted(filenames)
              if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
  files.sort()
  if not files:
    raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under data.path={root}")
  if not classes:
    return files, None, ()
  top = [f for f in files if len(f.parts) == 1]
  if len(top) == len(files):
    return files, None, ()  # a flat folder: no classes to read
  if top:
    raise UserError(
        f"data.path={root} holds images both directly ({top[0]}) and in subfolders; with "
        "data.classes=true each subfolder is a class, so put every image in one, or set "
        "data.classes=false")
  names = sorted({f.parts[0] for f in files})
  index = {n: i for i, n in enumerate(names)}
  return files, np.array([index[f.parts[0]] for f in files], np.int32), tuple(names)


class ImageFolderReader:
  """Image files under a folder, decoded when a batch asks for them."""

  def __init__(self, root: Path, image_size: int, grayscale, classes: bool):
    self.root, self.name = Path(root), str(root)
    self.image_size, self.grayscale = image_size, grayscale
    self.files, self.labels, self.class_names = list_images(self.root, classes)
    self.num_classes = len(self.class_names)
    first = self._decode(0)
    self.shape, self.dtype = first.shape, first.dtype

  def __len__(self):
    return len(self.files)

  def where(self, i: int) -> str:
    return str(self.root / self.files[i])

  def _decode(self, i: int) -> np.ndarray:
    path = self.root / self.files[i]
    try:
      return decode(path.read_bytes(), self.image_size, self.grayscale, str(path))
    except (BadImage, OSError) as e:
      raise UserError(f"cannot read image {path} ({e})") from None

  def read(self, idx) -> Rows:
    idx = np.asarray(idx)
    images = [self._decode(int(i)) for i in idx]
    x = same_shape(images, [self.where(int(i)) for i in idx], self.shape, self.where(0))
    return Rows(x, None if self.labels is None else self.labels[idx])

  def fingerprint_bytes(self) -> bytes:
    names = "\n".join(str(f) for f in self.files)
    return f"{len(self.files)} {self.image_size} {self.grayscale}\n{names}".encode()

  def sample_bytes(self, idx) -> bytes:
    return b"".join((self.root / self.files[int(i)]).read_bytes() for i in idx)

  def stats_path(self, name: str) -> Path:
    return self.root / ".scaler" / f"{name}.json"
