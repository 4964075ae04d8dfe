"""The `data` section of a config: one dataclass per source, chosen by `source`.

Each source takes only the keys it uses, so `data.path` with `source: two_moons`, or
`data.noise` with `source: digits`, is an unknown key rather than a silent no-op.
"""

import dataclasses

from scaler.config import Named, at_least, param, positive


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """Generated 2D distributions: two_moons, eight_gaussians, checkerboard, swiss_roll."""
  num_train: int = param(20000, positive)   # examples in the training split
  num_test: int = param(5000, positive)     # examples in the held-out split
  noise: float = param(0.05, at_least(0.0))  # noise scale (moons, gaussians, roll)
  seed: int = 0                              # generation seed (not the shuffle)
  prefetch: int = param(2, at_least(0))      # global batches prepared ahead, in a thread


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
  """scikit-learn's 8x8 digits, a fixed stratified 80/20 split, with their classes."""
  prefetch: int = param(2, at_least(0))


@dataclasses.dataclass(frozen=True)
class NpyConfig:
  """One .npy array (N, ...); the last 10% of a seeded permutation is held out."""
  path: str | None = None
  seed: int = 0                              # split seed
  prefetch: int = param(2, at_least(0))


@dataclasses.dataclass(frozen=True)
class NpzConfig:
  """An .npz archive: the examples under `key` (default: its only array), labels under
  `label_key` (optional, one integer class per example)."""
  path: str | None = None
  key: str | None = None
  label_key: str | None = None
  seed: int = 0
  prefetch: int = param(2, at_least(0))


@dataclasses.dataclass(frozen=True)
class ImageFolderConfig:
  """Image files under a folder (recursively), resized to a square `image_size`."""
  path: str | None = None
  image_size: int = param(0, at_least(0))   # 0 keeps the stored size
  grayscale: bool = True                     # one channel, else RGB
  classes: bool = False                      # labels from first-level subfolders, sorted
  seed: int = 0
  prefetch: int = param(2, at_least(0))


TOYS = ("two_moons", "eight_gaussians", "checkerboard", "swiss_roll")

DATA_SOURCES = {
    **{name: ToyConfig for name in TOYS},
    "digits": DigitsConfig,
    "npy": NpyConfig,
    "npz": NpzConfig,
    "image_folder": ImageFolderConfig,
}


def data_config(source: str, **kw) -> Named:
  """The `data` choice for `source` with keyword overrides (for code and tests)."""
  return Named(source, DATA_SOURCES[source](**kw))
