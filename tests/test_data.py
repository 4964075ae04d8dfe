"""Data: built-in sources, user files read by rows, the data spec, and bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from scaler import config as config_lib
from scaler.data import (DataSpec, data_config, fingerprint, load_source, load_spec, read_spec,
                         save_spec, toy)
from scaler.data import arrays, images
from scaler.errors import UserError


def save_images(folder, n, size=(6, 5), mode="L", start=0):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(start)
  shape = size if mode == "L" else (*size, len(mode))
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
        folder / f"{start + i:03d}.png")


def everything(source):
  return source.rows(np.arange(len(source)))


# --- built-in sources ---


@pytest.mark.parametrize("name", sorted(toy.TOYS))
def test_toy_sources_are_deterministic_with_distinct_splits(name):
  cfg = data_config(name, num_train=500, num_test=200)
  a, b, test = load_source(cfg, "train"), load_source(cfg, "train"), load_source(cfg, "test")
  xa, xt = everything(a)["x"], everything(test)["x"]
  assert xa.shape == (500, 2) and xt.shape == (200, 2) and xa.dtype == np.float32
  np.testing.assert_array_equal(xa, everything(b)["x"])
  assert not np.isin(xt[:, 0], xa[:, 0]).any()      # held out, not a subset
  # Standardised with the training statistics.
  np.testing.assert_allclose(xa.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(xa.std(0), 1, atol=1e-4)
  assert everything(load_source(data_config(name, seed=1, num_train=500), "train"))["x"][0, 0] \
      != xa[0, 0]


def test_toys_carry_their_labels():
  moons = load_source(data_config("two_moons", num_train=2000, noise=0.0), "train")
  gauss = load_source(data_config("eight_gaussians", num_train=2000, noise=0.01), "train")
  assert (moons.spec.num_classes, gauss.spec.num_classes) == (2, 8)
  m, g = everything(moons), everything(gauss)
  assert m["label"].dtype == np.int32 and m["label"].shape == (2000,)
  # The label is the moon: without noise the upper moon sits above the lower one's centre.
  raw = moons.read(np.arange(2000)).x
  assert raw[m["label"] == 0, 1].min() >= 0 and raw[m["label"] == 1, 1].max() <= 0.5
  # ... and the gaussian component: points at angle label * 45 degrees.
  raw = gauss.read(np.arange(2000)).x
  angle = np.round(np.arctan2(raw[:, 1], raw[:, 0]) / (np.pi / 4)) % 8
  np.testing.assert_array_equal(angle, g["label"])
  for name in ("checkerboard", "swiss_roll"):
    src = load_source(data_config(name, num_train=100), "train")
    assert src.spec.num_classes == 0 and set(src.rows([0, 1])) == {"x"}


def test_digits_are_real_images_with_a_fixed_split():
  train, test = (load_source(data_config("digits"), s) for s in ("train", "test"))
  x = everything(train)
  assert x["x"].shape == (1437, 8, 8, 1) and len(test) == 360
  assert x["x"].min() == -1 and x["x"].max() == 1         # [0, 16] -> [-1, 1]
  assert set(np.unique(x["label"])) == set(range(10)) and train.spec.num_classes == 10
  raw = train.spec.denormalize(x["x"])
  np.testing.assert_allclose(raw, np.round(raw), atol=1e-4)  # 17 grey levels, as shipped
  assert fingerprint(train) == fingerprint(load_source(data_config("digits"), "train"))
  assert fingerprint(train) != fingerprint(test)


# --- user files ---


def test_npy_is_memory_mapped_in_its_stored_dtype(tmp_path):
  x = np.random.default_rng(0).integers(0, 200, (50, 4, 4, 1)).astype(np.uint8)
  np.save(tmp_path / "a.npy", x)
  src = load_source(data_config("npy", path=str(tmp_path / "a.npy")), "train")
  assert isinstance(src.reader, arrays.MmapReader) and src.reader.x.dtype == np.uint8
  assert len(src) == 45 and src.spec.dtype == "uint8"     # 10% held out
  test = load_source(data_config("npy", path=str(tmp_path / "a.npy")), "test")
  assert len(test) == 5 and not set(src.index) & set(test.index)
  rows = src.rows([3, 0, 3])
  assert rows["x"].dtype == np.float32 and set(rows) == {"x"}
  np.testing.assert_array_equal(src.spec.denormalize(rows["x"]), x[src.index[[3, 0, 3]]])
  together = np.concatenate([src.read(np.arange(45)).x, test.read(np.arange(5)).x])
  assert sorted(together.reshape(50, -1).tolist()) == sorted(x.reshape(50, -1).tolist())


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_with_labels_mapped_or_loaded(tmp_path, save):
  x = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
  np.save(tmp_path / "a.npy", x)
  save(tmp_path / "b.npz", points=x, y=np.arange(60) % 4)
  a = load_source(data_config("npy", path=str(tmp_path / "a.npy")), "train")
  b = load_source(data_config("npz", path=str(tmp_path / "b.npz"), key="points",
                              label_key="y"), "train")
  assert isinstance(b.reader, arrays.MmapReader) == (save is np.savez)  # stored members map
  np.testing.assert_array_equal(everything(a)["x"], everything(b)["x"])
  assert b.spec.num_classes == 4
  np.testing.assert_array_equal(everything(b)["label"], b.index % 4)
  # Without data.key, the one array that is not the labels.
  c = load_source(data_config("npz", path=str(tmp_path / "b.npz"), label_key="y"), "train")
  np.testing.assert_array_equal(everything(c)["x"], everything(b)["x"])
  save(tmp_path / "u.npz", img=np.zeros((10, 2, 2, 1), np.uint8))  # kept as uint8
  u = load_source(data_config("npz", path=str(tmp_path / "u.npz")), "train")
  assert u.reader.x.dtype == np.uint8 and u.spec.dtype == "uint8"


def test_image_folder_is_read_lazily_with_class_subfolders(tmp_path, monkeypatch):
  for k, name in enumerate(("cat", "dog")):
    save_images(tmp_path / "imgs" / name, 10, start=10 * k)
  decoded = []
  decode = images.decode
  monkeypatch.setattr(images, "decode", lambda *a, **kw: decoded.append(1) or decode(*a, **kw))
  src = load_source(data_config("image_folder", path=str(tmp_path / "imgs"), stats_examples=4),
                    "train")
  opened = len(decoded)
  assert opened <= 1 + 4 + 1 and len(src) == 18          # first image, stats sample
  assert src.spec.shape == (6, 5, 1) and src.spec.kind == "image"
  assert src.spec.num_classes == 2 and src.spec.class_names == ("cat", "dog")
  rows = src.rows([0, 17])
  assert len(decoded) == opened + 2                       # a batch decodes its rows only
  files = [src.reader.files[i] for i in src.index[[0, 17]]]
  assert [f.parts[0] for f in files] == ["cat", "dog"] and rows["label"].tolist() == [0, 1]
  flat = load_source(data_config("image_folder", path=str(tmp_path / "imgs"), classes=False,
                                 image_size=4, grayscale=False), "train")
  assert flat.spec.num_classes == 0 and flat.spec.shape == (4, 4, 3)


# --- bad input: one line naming the value and what is accepted ---


def _npz(p, **arrays_):
  np.savez(p / "f.npz", **arrays_)


@pytest.mark.parametrize("make, cfg, words", [
    (None, dict(source="npy", path="missing.npy"), ["data file not found", "missing.npy"]),
    (None, dict(source="npy"), ["data.source=npy needs data.path"]),
    (lambda p: (p / "f.npy").write_text("not numpy"), dict(source="npy", path="f.npy"),
     ["is not a readable .npy array"]),
    (lambda p: np.save(p / "f.npy", np.arange(5.0)), dict(source="npy", path="f.npy"),
     ["expected a numeric array of shape (N, ...)"]),
    (lambda p: _npz(p, a=np.ones((4, 2))), dict(source="npy", path="f.npz"),
     ["is an .npz archive; use data.source=npz"]),
    (lambda p: np.save(p / "f.npy", np.ones((4, 2))), dict(source="npz", path="f.npy"),
     ["is an .npy array; use data.source=npy"]),
    (lambda p: _npz(p, a=np.ones((4, 2)), b=np.ones((4, 2))),
     dict(source="npz", path="f.npz"), ["holds arrays ['a', 'b']; name the examples with data.key"]),
    (lambda p: _npz(p, a=np.ones((4, 2))), dict(source="npz", path="f.npz", key="z"),
     ["data.key='z' is not in", "['a']"]),
    (lambda p: _npz(p, a=np.ones((4, 2))), dict(source="npz", path="f.npz", label_key="y"),
     ["data.label_key='y' is not in", "['a']"]),
    (lambda p: _npz(p, a=np.ones((4, 2)), y=np.ones(4)),
     dict(source="npz", path="f.npz", key="a", label_key="y"),
     ["data.label_key='y'", "float64 (4,)", "accepted: integers 0..K-1, one per example"]),
    (lambda p: _npz(p, a=np.ones((4, 2)), y=np.arange(3)),
     dict(source="npz", path="f.npz", key="a", label_key="y"), ["int64 (3,)", "shape (4,)"]),
    (lambda p: _npz(p, a=np.ones((4, 2)), y=-np.arange(4)),
     dict(source="npz", path="f.npz", key="a", label_key="y"), ["negative label -3"]),
    (lambda p: np.save(p / "f.npy", np.zeros((4, 3, 3, 2), np.uint8)),
     dict(source="npy", path="f.npy"), ["2 channels", "accepted: 1 (grey), 3 (RGB) or 4 (RGBA)"]),
    (lambda p: np.save(p / "f.npy", np.where(np.arange(40).reshape(20, 2) % 7 == 3, np.nan, 1.0)),
     dict(source="npy", path="f.npy"), ["4 non-finite values (NaN or Inf) in 4 examples",
                                        "first at f.npy row 5, f.npy row 8"]),
    (lambda p: (p / "d").mkdir(), dict(source="image_folder", path="d"), ["no images"]),
    (None, dict(source="image_folder", path="nowhere"), ["data.path=", "does not exist"]),
    (lambda p: save_images(p / "d", 3, mode="LA"), dict(source="image_folder", path="d"),
     ["grey with alpha (2 channels)", "data.grayscale=true"]),
    (lambda p: (save_images(p / "d", 3), save_images(p / "d", 3, size=(7, 7), start=3)),
     dict(source="image_folder", path="d"),
     ["images differ in size", "000.png is 6x5 with 1 channel", "is 7x7", "data.image_size"]),
    (lambda p: (save_images(p / "d", 2), save_images(p / "d" / "c", 2)),
     dict(source="image_folder", path="d"), ["both directly", "data.classes=false"]),
    (lambda p: (p / "d").mkdir(), dict(source="array_record", path="d"),
     ["no ArrayRecord files at data.path=", "searched the folder", "*.array_record*"]),
    (None, dict(source="array_record", path="shards/*.array_record"),
     ["no ArrayRecord files", "searched the glob", "shards/*.array_record"]),
    (None, dict(source="array_record", path="none.array_record"),
     ["searched the path", "does not exist"]),
])
def test_bad_data_is_one_clear_error(tmp_path, make, cfg, words):
  if make:
    make(tmp_path)
  if "path" in cfg:
    cfg["path"] = str(tmp_path / cfg["path"])
  with pytest.raises(UserError) as e:
    load_source(data_config(cfg.pop("source"), **cfg), "train")
  message = str(e.value)
  assert "\n" not in message
  for w in words:
    assert w in message, message


def test_unknown_source_lists_the_accepted_ones():
  raw = {"family": {"name": "diffusion"}, "model": {"name": "mlp_denoiser"},
         "data": {"source": "mnist"}}
  with pytest.raises(UserError, match="unknown data 'mnist'; accepted: array_record, "):
    config_lib.from_dict(raw)


def test_non_finite_rows_past_the_sample_stop_the_batch_that_holds_them(tmp_path):
  x = np.ones((200, 3), np.float32)
  x[150, 2] = np.inf
  np.save(tmp_path / "f.npy", x)
  src = load_source(data_config("npy", path=str(tmp_path / "f.npy"), stats_examples=5), "train")
  pos = int(np.flatnonzero(src.index == 150)[0])
  src.rows([0, 1])
  with pytest.raises(UserError, match=r"1 non-finite values \(NaN or Inf\) in 1 examples, "
                                      r"first at f.npy row 150"):
    src.rows([0, pos])


# --- config keys that a source does not use are refused (issue 9) ---

UNUSED = [("two_moons", k) for k in ("path", "key", "label_key", "image_size", "grayscale",
                                     "stats_examples", "workers")] + \
    [("checkerboard", "noise")] + \
    [("digits", k) for k in ("path", "num_train", "num_test", "seed", "noise", "image_size")] + \
    [("npy", k) for k in ("key", "label_key", "image_size", "grayscale", "num_train",
                          "num_test", "noise")] + \
    [("npz", k) for k in ("image_size", "grayscale", "noise", "num_train", "num_test")] + \
    [("image_folder", k) for k in ("key", "label_key", "noise", "num_train", "num_test")] + \
    [("array_record", k) for k in ("noise", "num_train", "num_test", "classes")]


@pytest.mark.parametrize("source, key", UNUSED)
def test_keys_a_source_does_not_use_are_refused(source, key):
  raw = {"family": {"name": "diffusion"}, "model": {"name": "mlp_denoiser"},
         "data": {"source": source, key: 1}}
  with pytest.raises(UserError, match=rf"unknown config key 'data\.{key}'"):
    config_lib.from_dict(raw)


# --- the data spec and its statistics ---


def test_spec_round_trips_through_json_exactly(tmp_path):
  src = load_source(data_config("two_moons", num_train=300), "train")
  save_spec(src.spec, tmp_path / "spec.json")
  back = read_spec(tmp_path / "spec.json")
  assert json.loads((tmp_path / "spec.json").read_text())["format"] == "scaler.data_spec/1"
  assert (back.shape, back.kind, back.num_classes) == ((2,), "vector", 2)
  raw = src.read(np.arange(300)).x
  np.testing.assert_array_equal(back.normalize(raw), src.spec.normalize(raw))  # bit for bit
  again = load_source(data_config("two_moons", num_train=300), "train", spec=back)
  np.testing.assert_array_equal(everything(again)["x"], everything(src)["x"])
  (tmp_path / "bad.json").write_text('{"format": "something else"}')
  for path, words in ((tmp_path / "bad.json", "is not a scaler data spec"),
                      (tmp_path / "none.json", "not found")):
    with pytest.raises(UserError, match=words):
      read_spec(path)
  with pytest.raises(UserError, match=r"data spec has examples of shape \(3,\)"):
    load_source(data_config("two_moons"), "train", spec=DataSpec((3,), "vector", 0.0, 1.0))


def test_statistics_are_computed_once_on_a_bounded_training_sample(tmp_path, monkeypatch):
  x = np.random.default_rng(0).integers(0, 256, (1000, 2, 2, 1)).astype(np.uint8)
  np.save(tmp_path / "f.npy", x)
  cfg = data_config("npy", path=str(tmp_path / "f.npy"), stats_examples=100)
  read = []
  real = arrays.MmapReader.read
  monkeypatch.setattr(arrays.MmapReader, "read", lambda self, i: read.append(np.array(i))
                      or real(self, i))
  spec = load_spec(cfg)
  sampled = np.concatenate(read)
  assert len(sampled) == 100                               # the sample, not the data
  test_rows = load_source(cfg, "test").index
  assert not set(sampled.tolist()) & set(test_rows.tolist())  # never the held-out rows
  cache = list((tmp_path / ".scaler").glob("f.npy.npy-stats-*.json"))
  assert len(cache) == 1
  read.clear()
  again = load_spec(cfg)                                   # from the cache: no sample read
  assert not read
  assert again.to_json() == spec.to_json()
  # Other data in the same file: another fingerprint, so the statistics are recomputed.
  np.save(tmp_path / "f.npy", x // 2)
  read.clear()
  assert load_spec(cfg).scale != spec.scale and sum(len(r) for r in read) == 100


def test_statistics_work_where_the_data_folder_is_read_only(tmp_path, monkeypatch):
  np.save(tmp_path / "f.npy", np.ones((20, 3), np.float32))

  def refuse(self, *a, **kw):
    raise PermissionError("read-only file system")
  monkeypatch.setattr(type(tmp_path), "mkdir", refuse)
  spec = load_spec(data_config("npy", path=str(tmp_path / "f.npy")))
  assert spec.shape == (3,) and not (tmp_path / ".scaler").exists()


def test_fingerprint_reads_a_sample_and_sees_changes(tmp_path):
  x = np.zeros((10_000, 4), np.float32)
  np.save(tmp_path / "f.npy", x)
  cfg = data_config("npy", path=str(tmp_path / "f.npy"))
  a = fingerprint(load_source(cfg, "train"))
  assert a == fingerprint(load_source(cfg, "train")) != fingerprint(load_source(cfg, "test"))
  x[-1] = 1.0  # a sampled row: the last
  np.save(tmp_path / "f.npy", x)
  assert fingerprint(load_source(cfg, "train")) != a
