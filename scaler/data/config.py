"""The `data` section of a config: one dataclass per source, chosen by `source`.

Each source takes only the keys it uses, so `data.path` with `source: two_moons`, or
`data.noise` with `source: digits` (or `checkerboard`, which has no noise), is an
unknown key rather than a silent no-op.

Reading keys, on every source: `prefetch` global batches are prepared ahead. File
sources add `threads` (batches built at once in this process) and `workers` (grain
worker processes, each building whole batches: decoding images off the main process).
"""

import dataclasses

from scaler.config import Named, at_least, param, positive

SPLIT_NOTE = "the last 10% of a seeded permutation (data.seed) is the held-out split"


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """Generated 2D distributions with noise: two_moons (label: the moon), eight_gaussians
  (label: the component), swiss_roll (unlabelled)."""
  num_train: int = param(20000, positive)   # examples in the training split
  num_test: int = param(5000, positive)     # examples in the held-out split
  noise: float = param(0.05, at_least(0.0))  # noise scale
  seed: int = 0                              # generation seed (not the shuffle)
  prefetch: int = param(2, at_least(0))      # global batches prepared ahead, in a thread


@dataclasses.dataclass(frozen=True)
class CheckerboardConfig:
  """Uniform points on the 8 black squares of a 4x4 board: no noise to set."""
  num_train: int = param(20000, positive)
  num_test: int = param(5000, positive)
  seed: int = 0
  prefetch: int = param(2, at_least(0))


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
  """scikit-learn's 8x8 digits, a fixed stratified 80/20 split, with their classes."""
  prefetch: int = param(2, at_least(0))


@dataclasses.dataclass(frozen=True)
class NpyConfig:
  """One .npy array (N, ...), memory-mapped and kept in its stored dtype until a batch
  is built; the last 10% of a seeded permutation is held out."""
  path: str | None = None
  seed: int = 0                                  # split seed
  stats_examples: int = param(4096, positive)    # sample for the normalisation statistics
  prefetch: int = param(2, at_least(0))
  threads: int = param(1, at_least(1))
  workers: int = param(0, at_least(0))


@dataclasses.dataclass(frozen=True)
class NpzConfig:
  """An .npz archive: the examples under `key` (default: its only array), labels under
  `label_key` (optional, one integer class per example). Members saved uncompressed
  (np.savez) are memory-mapped; compressed ones are read once, in their stored dtype."""
  path: str | None = None
  key: str | None = None
  label_key: str | None = None
  seed: int = 0
  stats_examples: int = param(4096, positive)
  prefetch: int = param(2, at_least(0))
  threads: int = param(1, at_least(1))
  workers: int = param(0, at_least(0))


@dataclasses.dataclass(frozen=True)
class ImageFolderConfig:
  """Image files under a folder, read and decoded lazily, batch by batch. With
  `classes` (the default), each subfolder of `path` is a class and gives the label."""
  path: str | None = None
  image_size: int = param(0, at_least(0))   # resize to a square; 0 keeps the stored size
  grayscale: bool | None = None              # true: 1 channel; false: RGB; null: as stored
  classes: bool = True                       # subfolders are classes (sorted names -> 0..K-1)
  seed: int = 0
  stats_examples: int = param(4096, positive)
  prefetch: int = param(4, at_least(0))
  threads: int = param(2, at_least(1))
  workers: int = param(0, at_least(0))


@dataclasses.dataclass(frozen=True)
class ArrayRecordConfig:
  """ArrayRecord files (a file, a glob or a folder; local or gs://) whose records are
  tf.train.Example protos with an encoded image (PNG/JPEG) under `key` and an optional
  integer label, or bare encoded images; `scaler data convert` writes them."""
  path: str | None = None
  key: str = "image"                         # the Example feature holding the image bytes
  label_key: str | None = None               # null: the 'label' feature where records have one
  num_classes: int = param(0, at_least(0))   # 0: from dataset.json beside the shards, else a sample
  image_size: int = param(0, at_least(0))
  grayscale: bool | None = None
  skip_bad_records: bool = False             # replace undecodable records, counting them
  seed: int = 0
  stats_examples: int = param(4096, positive)
  prefetch: int = param(4, at_least(0))
  threads: int = param(2, at_least(1))
  workers: int = param(0, at_least(0))


TOYS = ("two_moons", "eight_gaussians", "checkerboard", "swiss_roll")
FILE_SOURCES = ("npy", "npz", "image_folder", "array_record")

DATA_SOURCES = {
    "two_moons": ToyConfig,
    "eight_gaussians": ToyConfig,
    "checkerboard": CheckerboardConfig,
    "swiss_roll": ToyConfig,
    "digits": DigitsConfig,
    "npy": NpyConfig,
    "npz": NpzConfig,
    "image_folder": ImageFolderConfig,
    "array_record": ArrayRecordConfig,
}


def data_config(source: str, **kw) -> Named:
  """The `data` choice for `source` with keyword overrides (for code and tests)."""
  return Named(source, DATA_SOURCES[source](**kw))
