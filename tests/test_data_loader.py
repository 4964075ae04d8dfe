"""The step-keyed batch loader: epochs, determinism, per-process rows, resume, workers."""

import jax
import numpy as np
import pytest

from scaler import mesh as mesh_lib
from scaler.config import MeshConfig
from scaler.data import BatchLoader, data_config, load_source, to_global
from scaler.data import arrays
from scaler.errors import UserError


def _source(n=103):
  return load_source(data_config("two_moons", num_train=n, num_test=10), "train")


@pytest.fixture
def npy_source(tmp_path):
  x = np.arange(300 * 4, dtype=np.float32).reshape(300, 4)
  np.save(tmp_path / "f.npy", x)
  return load_source(data_config("npy", path=str(tmp_path / "f.npy")), "train")


@pytest.fixture
def rows_read(monkeypatch):
  """Every file row that a memory-mapped source reads, call by call."""
  calls = []
  real = arrays.MmapReader.read
  monkeypatch.setattr(arrays.MmapReader, "read",
                      lambda self, idx: calls.append(np.array(idx)) or real(self, idx))
  return calls


def test_each_epoch_sees_every_example_once_and_batches_straddle_epochs():
  loader = BatchLoader(_source(103), 10, seed=0)
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
  first = next(iter(a))
  np.testing.assert_array_equal(first["x"], a.batch(0)["x"])
  assert first["label"].dtype == np.int32 and first["label"].shape == (8,)


def test_each_process_reads_only_its_rows(npy_source, rows_read):
  whole = BatchLoader(npy_source, 12, seed=0)
  expected = whole.batch(7)["x"]
  rows_read.clear()
  parts = []
  for lo in (0, 4, 8):
    loader = BatchLoader(npy_source, 12, seed=0, rows=(lo, lo + 4))
    parts.append(loader.batch(7)["x"])
    # One read of exactly its 4 rows of the global batch, nothing else.
    assert len(rows_read) == 1
    np.testing.assert_array_equal(
        rows_read.pop(), npy_source.index[whole.global_indices(7)[lo:lo + 4]])
  np.testing.assert_array_equal(np.concatenate(parts), expected)


def test_an_epoch_reads_the_training_rows_once_and_never_the_held_out_ones(npy_source,
                                                                            rows_read):
  test = load_source(data_config("npy", path=npy_source.reader.path.as_posix()), "test")
  n = len(npy_source)
  loader = BatchLoader(npy_source, n // 6, seed=1, prefetch=0)
  it = iter(loader)
  rows_read.clear()
  for _ in range(6):
    next(it)
  read = np.concatenate(rows_read)
  assert sorted(read.tolist()) == sorted(npy_source.index.tolist())
  assert not set(read.tolist()) & set(test.index.tolist())


def test_state_resumes_the_sequence_on_another_process_count():
  src = _source()
  it = iter(BatchLoader(src, 12, seed=0))
  expected = [next(it)["x"] for _ in range(9)]
  first = BatchLoader(src, 12, seed=0, prefetch=4)
  it = iter(first)
  for _ in range(5):
    next(it)                       # prefetched further; only handed-out batches count
  state = first.get_state()
  assert state["step"] == 5
  rows = []
  for lo in (0, 6):                # resumed on 2 processes
    loader = BatchLoader(src, 12, seed=0, rows=(lo, lo + 6))
    loader.set_state(state)
    it = iter(loader)
    rows.append([next(it)["x"] for _ in range(4)])
  for k in range(4):
    np.testing.assert_array_equal(np.concatenate([rows[0][k], rows[1][k]]), expected[5 + k])


def test_threads_and_prefetch_do_not_change_the_sequence(npy_source):
  want = [BatchLoader(npy_source, 16, seed=2).batch(s)["x"] for s in range(12)]
  for kw in (dict(prefetch=0), dict(prefetch=1, threads=1), dict(prefetch=8, threads=4)):
    it = iter(BatchLoader(npy_source, 16, seed=2, **kw))
    for s in range(12):
      np.testing.assert_array_equal(next(it)["x"], want[s], err_msg=str(kw))


def test_loader_bad_input():
  src = _source()
  with pytest.raises(UserError, match="train.batch_size=0: needs at least 1"):
    BatchLoader(src, 0, seed=0)
  with pytest.raises(UserError, match="data seed 1 differs from train.seed=0"):
    BatchLoader(src, 10, seed=0).set_state({"step": 3, "seed": 1})


def test_labels_are_sharded_with_the_batch():
  mesh = mesh_lib.make_mesh(MeshConfig(), jax.devices())
  sharding = mesh_lib.batch_sharding(mesh)
  batch = BatchLoader(load_source(data_config("digits"), "train"), 16, seed=0).batch(0)
  out = to_global(batch, sharding, 16)
  assert out["label"].dtype == np.int32 and out["label"].sharding == sharding
  assert out["x"].sharding == sharding
  for shard in out["label"].addressable_shards:   # each device holds its examples' labels
    np.testing.assert_array_equal(shard.data, batch["label"][shard.index])
