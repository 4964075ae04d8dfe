"""The 8x8 handwritten digits that ship with scikit-learn (no download)."""

import numpy as np


def digits(split: str):
  """(images (N, 8, 8, 1) in [0, 16], labels); a fixed stratified 80/20 split."""
  # Imported here: scikit-learn takes over a second to import, and only this source needs it.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  d = load_digits()
  x = d.images.astype(np.float32)[..., None]
  idx_train, idx_test = train_test_split(
      np.arange(len(x)), test_size=0.2, random_state=0, stratify=d.target)
  idx = idx_train if split == "train" else idx_test
  return x[idx], d.target[idx].astype(np.int32)
