"""User data: .npy, .npz and image folders. No held-out file: the last 10% of a seeded
permutation is the test split."""

from pathlib import Path

import numpy as np

from scaler.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _existing(path, what) -> Path:
  if path is None:
    raise UserError(f"data.source={what} needs data.path")
  p = Path(path)
  if not p.exists():
    raise UserError(f"data file not found: {p}")
  return p


def load_npy(path) -> np.ndarray:
  p = _existing(path, "npy")
  try:
    return np.load(p, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise UserError(f"data file {p} is not a readable .npy array ({e})") from None


def load_npz(path, key, label_key=None):
  """(examples, labels or None): the array under `key` (default: the only array), and
  under `label_key` one integer class per example."""
  p = _existing(path, "npz")
  try:
    with np.load(p, allow_pickle=False) as z:
      keys = list(z.keys())
      if key is None:
        others = [k for k in keys if k != label_key]
        if len(others) != 1:
          raise UserError(f"data file {p} holds arrays {keys}; name one with data.key")
        key = others[0]
      for name, value in (("key", key), ("label_key", label_key)):
        if value is not None and value not in keys:
          raise UserError(f"data.{name}='{value}' is not in {p}; it holds {keys}")
      x = z[key]
      return x, None if label_key is None else _labels(z[label_key], len(x), p)
  except (ValueError, OSError) as e:
    raise UserError(f"data file {p} is not a readable .npz archive ({e})") from None


def _labels(y, n, where):
  """Integer classes 0..K-1, one per example."""
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and y.min() < 0):
    raise UserError(f"labels in {where}: expected {n} integer classes >= 0, one per "
                    f"example, got {y.dtype} {y.shape}")
  return y.astype(np.int32)


def load_image_folder(path, image_size: int, grayscale: bool, classes: bool = False):
  """(images (N, H, W, C) with values in [0, 255] in sorted file order, labels or None).

  `classes`: each image's class is its first-level subfolder, numbered in sorted order
  (ImageNet's train/n01440764/... layout); images directly under `path` are refused.
  """
  from PIL import Image
  p = _existing(path, "image_folder")
  files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under data.path={p}")
  images = []
  for f in files:
    try:
      img = Image.open(f).convert("L" if grayscale else "RGB")
    except OSError as e:
      raise UserError(f"cannot read image {f} ({e})") from None
    if image_size:
      img = img.resize((image_size, image_size), Image.BILINEAR)
    images.append(np.asarray(img, np.float32))
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise UserError(f"images under {p} differ in size {sorted(shapes)[:3]}; set data.image_size")
  x = np.stack(images)
  x = x[..., None] if grayscale else x
  if not classes:
    return x, None
  parts = [f.relative_to(p).parts for f in files]
  loose = [f for f, part in zip(files, parts) if len(part) < 2]
  if loose:
    raise UserError(f"data.classes=true reads classes from subfolders of {p}, but {loose[0]} "
                    "is in no subfolder")
  names = sorted({part[0] for part in parts})
  index = {name: i for i, name in enumerate(names)}
  return x, np.array([index[part[0]] for part in parts], np.int32)


def split(x: np.ndarray, split_name: str, seed: int) -> np.ndarray:
  """The split's rows of x (examples or their labels: the same rows for both)."""
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = max(1, len(x) // 10)
  return x[order[:-n_test]] if split_name == "train" else x[order[-n_test:]]
