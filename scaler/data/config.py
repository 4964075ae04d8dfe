"""The `data` section of a config."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "two_moons"   # two_moons | eight_gaussians | checkerboard | swiss_roll |
                              # digits | npy | npz | image_folder
  path: str | None = None     # a user file or folder (npy, npz, image_folder)
  key: str | None = None      # the array's name in an .npz (default: its only array)
  image_size: int = 0         # image_folder: resize to this square size; 0 keeps it
  grayscale: bool = True      # image_folder: one channel, else RGB
  num_train: int = 20000      # toy distributions: examples in the training split
  num_test: int = 5000        # toy distributions: examples in the held-out split
  noise: float = 0.05         # toy distributions: noise scale (moons, gaussians, roll)
  seed: int = 0               # generation and split seed (not the shuffle)
  prefetch: int = 2           # global batches prepared ahead, in a thread
