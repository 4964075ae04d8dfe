"""ArrayRecord: `scaler data convert`, records read by index, bad records, worker processes."""

import io
import json
import mmap

import numpy as np
import pytest
from PIL import Image

from scaler.data import BatchLoader, data_config, load_source
from scaler.data import example_proto
from scaler.errors import UserError
from test_cli import expect_user_error
from test_data import save_images


def png(value, size=(4, 4)) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full(size, value, np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def write_records(path, records):
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("imgs")
  for k, name in enumerate(("ant", "bee", "cow")):
    save_images(root / name, 10, size=(5, 5), mode="RGB", start=10 * k)
  return root


def test_convert_a_folder_and_read_the_shards_like_the_folder(folder, tmp_path, capsys):
  from launch.cli import main
  with pytest.raises(SystemExit) as e:
    main(["data", "convert", str(folder), "--out", str(tmp_path / "shards"), "--shards", "3"])
  assert e.value.code == 0
  out = capsys.readouterr()
  assert "30 examples, 3 classes -> 3 ArrayRecord shards" in out.out
  assert "30/30" in out.err                                  # the progress bar
  files = sorted(p.name for p in (tmp_path / "shards").iterdir())
  assert files == [f"data-0000{i}-of-00003.array_record" for i in range(3)] + ["dataset.json"]
  assert json.loads((tmp_path / "shards" / "dataset.json").read_text())["class_names"] == \
      ["ant", "bee", "cow"]
  for pattern in ("shards", "shards/data-*.array_record"):   # a folder or a glob
    records = load_source(data_config("array_record", path=str(tmp_path / pattern)), "train")
    images = load_source(data_config("image_folder", path=str(folder)), "train")
    assert len(records) == len(images) == 27
    a, b = records.rows(np.arange(27)), images.rows(np.arange(27))
    np.testing.assert_array_equal(a["x"], b["x"])            # PNG bytes copied as they were
    np.testing.assert_array_equal(a["label"], b["label"])
    assert records.spec.class_names == ("ant", "bee", "cow") and records.spec.num_classes == 3
  assert "data-00001-of-00003.array_record record 2" == records.reader.where(12).split("/")[-1]


def test_convert_arrays_with_labels(tmp_path):
  from scaler.data.convert import convert
  x = np.random.default_rng(0).integers(0, 256, (20, 6, 6, 3)).astype(np.uint8)
  np.savez(tmp_path / "a.npz", img=x, cls=np.arange(20) % 5)
  convert(tmp_path / "a.npz", tmp_path / "out", 2, key="img", label_key="cls", progress=False)
  src = load_source(data_config("array_record", path=str(tmp_path / "out")), "test")
  assert src.spec.num_classes == 5 and len(src) == 2
  rows = src.read(np.arange(2))
  np.testing.assert_array_equal(rows.x, x[src.index])         # PNG is lossless
  np.testing.assert_array_equal(rows.label, src.index % 5)


@pytest.mark.parametrize("args, words", [
    (["missing", "--out", "o"], ["missing not found"]),
    (["f.npy", "--out", "o", "--shards", "0"], ["--shards 0: needs at least 1"]),
    (["f.npy", "--out", "o", "--shards", "9"], ["--shards 9 is more than the 4 examples"]),
    (["f.npy", "--out", "full"], ["--out", "full exists and is not an empty folder"]),
    (["g.npy", "--out", "o"], ["float32 (4, 2)", "uint8 or uint16", "data.source=npy"]),
    (["f.npy", "--out", "o", "--key", "x"], ["--key and --label-key name arrays of an .npz"]),
    (["f.txt", "--out", "o"], ["is not a folder of images, an .npy or an .npz"]),
])
def test_convert_bad_input(tmp_path, monkeypatch, capsys, args, words):
  monkeypatch.chdir(tmp_path)
  np.save(tmp_path / "f.npy", np.zeros((4, 3, 3), np.uint8))
  np.save(tmp_path / "g.npy", np.zeros((4, 2), np.float32))
  (tmp_path / "f.txt").write_text("x")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  expect_user_error(capsys, ["data", "convert", *args], *words)
  assert not (tmp_path / "o").exists()


def test_an_undecodable_record_is_named_or_skipped_and_counted(tmp_path):
  records = [example_proto.encode(png(i), i % 2) for i in range(40)]
  records[17] = example_proto.encode(b"\x89PNG broken", 1)
  write_records(tmp_path / "x.array_record", records)
  # Met by the statistics sample at start-up, or by the batch that holds it.
  for stats_examples in (4096, 2):
    with pytest.raises(UserError) as e:
      src = load_source(data_config("array_record", path=str(tmp_path),
                                    stats_examples=stats_examples), "train")
      BatchLoader(src, 36, seed=0).batch(0)
    assert f"{tmp_path}/x.array_record record 17 does not decode as an image" in str(e.value)
    assert "set data.skip_bad_records=true" in str(e.value)
  src = load_source(data_config("array_record", path=str(tmp_path), skip_bad_records=True),
                    "train")
  loader = BatchLoader(src, 36, seed=0)                     # every batch holds record 17
  it = iter(loader)
  batches = [next(it) for _ in range(3)]
  assert loader.bad_records == 3 and all(b["x"].shape == (36, 4, 4, 1) for b in batches)
  # The stand-in is a good record of the same batch: its image and its label.
  raw = src.spec.denormalize(batches[0]["x"])[..., 0, 0, 0]
  np.testing.assert_array_equal(raw.round() % 2, batches[0]["label"])


def test_records_without_labels_and_other_feature_names(tmp_path):
  write_records(tmp_path / "bare.array_record", [png(i) for i in range(10)])
  bare = load_source(data_config("array_record", path=str(tmp_path / "bare.array_record")),
                     "train")
  assert bare.spec.num_classes == 0 and set(bare.rows([0])) == {"x"}
  write_records(tmp_path / "named.array_record",
                [example_proto.encode(png(i), i % 3, key="jpg", label_key="cls")
                 for i in range(10)])
  path = str(tmp_path / "named.array_record")
  named = load_source(data_config("array_record", path=path, key="jpg", label_key="cls"),
                      "train")
  assert named.spec.num_classes == 3
  with pytest.raises(UserError, match=r"data.label_key='y' is not in the records .* holds "
                                      r"features \['cls', 'jpg'\]"):
    load_source(data_config("array_record", path=path, key="jpg", label_key="y"), "train")
  with pytest.raises(UserError, match=r"record 0 has no image bytes under 'image' \(data.key\)"):
    load_source(data_config("array_record", path=path), "train")
  # Classes counted on a sample are checked on every batch: a larger label stops it.
  few = load_source(data_config("array_record", path=path, key="jpg", label_key="cls",
                                num_classes=2), "train")
  with pytest.raises(UserError, match=r"has label 2, but the data has 2 classes"):
    few.rows(np.arange(len(few)))


def test_not_an_array_record_file_is_named(tmp_path):
  (tmp_path / "x.array_record").write_bytes(b"not a riegeli file at all" * 10)
  with pytest.raises(UserError, match=r"x.array_record is not a readable ArrayRecord file"):
    load_source(data_config("array_record", path=str(tmp_path)), "train")


def test_worker_processes_are_sent_file_names_not_data(tmp_path):
  import cloudpickle  # what grain sends its worker processes
  from scaler.data.loader import StepBatches
  np.save(tmp_path / "f.npy", np.zeros((4000, 16, 16), np.uint8))   # 1 MB
  src = load_source(data_config("npy", path=str(tmp_path / "f.npy")), "train")
  fn = StepBatches(src, 8, 0, 0, 8)
  fn(3)
  message = cloudpickle.dumps(fn)
  assert len(message) < 50_000, len(message)   # the train split's row numbers, no pixels
  copy = cloudpickle.loads(message)
  assert isinstance(copy.source.reader.x.base, mmap.mmap)
  np.testing.assert_array_equal(copy(3)[0]["x"], fn(3)[0]["x"])


@pytest.mark.slow  # worker processes take ~15 s to start on 2 shared cores
def test_worker_processes_give_the_same_batches(folder, tmp_path):
  from scaler.data.convert import convert
  convert(folder, tmp_path / "s", 2, progress=False)
  src = load_source(data_config("array_record", path=str(tmp_path / "s")), "train")
  want = [BatchLoader(src, 8, seed=0).batch(s) for s in range(6)]
  loader = BatchLoader(src, 8, seed=0, workers=2, prefetch=2)
  loader.step = 1                                           # as after a resume
  it = iter(loader)
  for s in range(1, 6):
    got = next(it)
    np.testing.assert_array_equal(got["x"], want[s]["x"])
    np.testing.assert_array_equal(got["label"], want[s]["label"])
  it.close()
  assert loader.step == 6
