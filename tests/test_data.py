"""Data: built-in sources, user files, and the step-keyed batch loader."""

import numpy as np
import pytest
from PIL import Image

from scaler.data import DataConfig, BatchLoader, fingerprint, load_source
from scaler.data import toy
from scaler.errors import UserError


def _source(n=103):
  return load_source(DataConfig(source="two_moons", num_train=n, num_test=10), "train")


# --- built-in sources ---


@pytest.mark.parametrize("name", sorted(toy.TOYS))
def test_toy_sources_are_deterministic_with_distinct_splits(name):
  cfg = DataConfig(source=name, num_train=500, num_test=200)
  a, b = load_source(cfg, "train"), load_source(cfg, "train")
  test = load_source(cfg, "test")
  assert a.x.shape == (500, 2) and test.x.shape == (200, 2) and a.x.dtype == np.float32
  np.testing.assert_array_equal(a.x, b.x)
  assert not np.isin(test.x[:, 0], a.x[:, 0]).any()      # held out, not a subset
  # Standardised with the training statistics, which undo exactly.
  np.testing.assert_allclose(a.x.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(a.x.std(0), 1, atol=1e-4)
  assert load_source(DataConfig(source=name, seed=1, num_train=500), "train").x[0, 0] != a.x[0, 0]


def test_digits_are_real_images_with_a_fixed_split():
  train, test = (load_source(DataConfig(source="digits"), s) for s in ("train", "test"))
  assert train.x.shape == (1437, 8, 8, 1) and test.x.shape == (360, 8, 8, 1)
  assert train.x.min() == -1 and train.x.max() == 1         # [0, 16] -> [-1, 1]
  assert set(np.unique(train.label)) == set(range(10))
  raw = train.spec.denormalize(train.x)
  np.testing.assert_allclose(raw, np.round(raw), atol=1e-4)  # 17 grey levels, as shipped
  assert fingerprint(train) == fingerprint(load_source(DataConfig(source="digits"), "train"))
  assert fingerprint(train) != fingerprint(test)


# --- user files ---


def test_npy_npz_and_image_folder(tmp_path):
  x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
  np.save(tmp_path / "a.npy", x)
  np.savez(tmp_path / "b.npz", points=x, other=x[:3])
  a = load_source(DataConfig(source="npy", path=str(tmp_path / "a.npy")), "train")
  b = load_source(DataConfig(source="npz", path=str(tmp_path / "b.npz"), key="points"),
                  "train")
  assert a.x.shape == (45, 3)                                 # 10% held out
  np.testing.assert_array_equal(a.x, b.x)
  test = load_source(DataConfig(source="npy", path=str(tmp_path / "a.npy")), "test")
  assert test.x.shape == (5, 3)
  together = np.concatenate([a.spec.denormalize(a.x), test.spec.denormalize(test.x)])
  np.testing.assert_allclose(np.sort(together, 0), np.sort(x, 0), atol=1e-5)

  folder = tmp_path / "imgs" / "sub"
  folder.mkdir(parents=True)
  for i in range(12):
    Image.fromarray(np.full((6, 5), i * 20, np.uint8)).save(folder / f"{i:02d}.png")
  img = load_source(DataConfig(source="image_folder", path=str(tmp_path / "imgs")), "train")
  assert img.x.shape == (11, 6, 5, 1) and img.spec.kind == "image"
  sized = load_source(DataConfig(source="image_folder", path=str(tmp_path / "imgs"),
                                 image_size=4, grayscale=False), "train")
  assert sized.x.shape == (11, 4, 4, 3)


@pytest.mark.parametrize("make, cfg, message", [
    (None, dict(source="npy", path="missing.npy"), "data file not found"),
    (None, dict(source="npy"), "data.source=npy needs data.path"),
    (lambda p: (p / "f.npy").write_text("not numpy"), dict(source="npy", path="f.npy"),
     "is not a readable .npy array"),
    (lambda p: np.save(p / "f.npy", np.arange(5.0)), dict(source="npy", path="f.npy"),
     "expected a numeric array of shape (N, ...)"),
    (lambda p: np.savez(p / "f.npz", a=np.ones((4, 2)), b=np.ones((4, 2))),
     dict(source="npz", path="f.npz"), "holds arrays ['a', 'b']; name one with data.key"),
    (lambda p: np.savez(p / "f.npz", a=np.ones((4, 2))),
     dict(source="npz", path="f.npz", key="z"), "data.key='z' is not in"),
    (lambda p: (p / "d").mkdir(), dict(source="image_folder", path="d"), "no images"),
    (None, dict(source="mnist"), "unknown data.source 'mnist'; accepted: two_moons"),
])
def test_bad_data_is_one_clear_error(tmp_path, make, cfg, message):
  if make:
    make(tmp_path)
  if "path" in cfg:
    cfg["path"] = str(tmp_path / cfg["path"])
  with pytest.raises(UserError, match=None) as e:
    load_source(DataConfig(**cfg), "train")
  assert message in str(e.value)


# --- the batch loader ---


def test_each_epoch_sees_every_example_once_and_batches_straddle_epochs():
  src = _source(103)
  loader = BatchLoader(src, 10, seed=0)
  seen = np.concatenate([loader.global_indices(s) for s in range(103)])  # 10 epochs
  for epoch in seen.reshape(10, 103):
    assert sorted(epoch) == list(range(103))
  assert not np.array_equal(seen[:103], seen[103:206])      # a fresh order each epoch
  # Step 10 holds the last 3 examples of epoch 0 and the first 7 of epoch 1.
  np.testing.assert_array_equal(loader.global_indices(10), seen[100:110])


def test_batches_are_a_function_of_seed_and_step():
  src = _source()
  a, b = BatchLoader(src, 8, seed=3), BatchLoader(src, 8, seed=3)
  np.testing.assert_array_equal(a.batch(5)["x"], b.batch(5)["x"])
  assert not np.array_equal(a.batch(5)["x"], BatchLoader(src, 8, seed=4).batch(5)["x"])
  np.testing.assert_array_equal(next(iter(a))["x"], a.batch(0)["x"])


def test_each_process_reads_only_its_rows_of_the_global_batch():
  src = _source()
  whole = BatchLoader(src, 12, seed=0).batch(7)["x"]
  parts = [BatchLoader(src, 12, seed=0, process_index=i, process_count=3).batch(7)["x"]
           for i in range(3)]
  assert all(p.shape == (4, 2) for p in parts)
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_state_resumes_the_sequence_on_another_process_count():
  src = _source()
  straight = BatchLoader(src, 12, seed=0)
  it = iter(straight)
  expected = [next(it)["x"] for _ in range(9)]
  first = BatchLoader(src, 12, seed=0, prefetch=4)
  it = iter(first)
  for _ in range(5):
    next(it)                       # prefetched further; only handed-out batches count
  state = first.get_state()
  assert state["step"] == 5
  rows = []
  for i in range(2):               # resumed on 2 processes
    loader = BatchLoader(src, 12, seed=0, process_index=i, process_count=2)
    loader.set_state(state)
    it = iter(loader)
    rows.append([next(it)["x"] for _ in range(4)])
  for k in range(4):
    np.testing.assert_array_equal(np.concatenate([rows[0][k], rows[1][k]]), expected[5 + k])


def test_loader_bad_input():
  src = _source()
  with pytest.raises(UserError, match="batch_size=10 is not divisible by the 3 processes"):
    BatchLoader(src, 10, seed=0, process_count=3)
  with pytest.raises(UserError, match="data seed 1 differs from train.seed=0"):
    BatchLoader(src, 10, seed=0).set_state({"step": 3, "seed": 1})
