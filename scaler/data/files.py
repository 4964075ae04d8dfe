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


def load_npz(path, key) -> np.ndarray:
  p = _existing(path, "npz")
  try:
    with np.load(p, allow_pickle=False) as z:
      keys = list(z.keys())
      if key is None:
        if len(keys) != 1:
          raise UserError(f"data file {p} holds arrays {keys}; name one with data.key")
        key = keys[0]
      if key not in keys:
        raise UserError(f"data.key='{key}' is not in {p}; it holds {keys}")
      return z[key]
  except (ValueError, OSError) as e:
    raise UserError(f"data file {p} is not a readable .npz archive ({e})") from None


def load_image_folder(path, image_size: int, grayscale: bool) -> np.ndarray:
  """Images (N, H, W, C) with values in [0, 255], in sorted file order."""
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
  return x[..., None] if grayscale else x


def split(x: np.ndarray, split_name: str, seed: int) -> np.ndarray:
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = max(1, len(x) // 10)
  return x[order[:-n_test]] if split_name == "train" else x[order[-n_test:]]
