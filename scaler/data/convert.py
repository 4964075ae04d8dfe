"""An image folder, .npy or .npz to ArrayRecord shards: what `scaler data convert` does.

    DIR/data-00000-of-00004.array_record ...   tf.train.Example records: "image" (PNG or
                                               JPEG bytes) and "label" (int64) if any
    DIR/dataset.json                           examples, classes and their names

Records keep the source's order, in contiguous blocks per shard (training shuffles by
the step, not by the file). PNG and JPEG files are copied as they are, without a
decode and re-encode; arrays (uint8 or uint16 images) are encoded as PNG.
"""

import io
import json
from pathlib import Path

import numpy as np

from scaler.data import arrays, images
from scaler.data.records import DESCRIPTION
from scaler.errors import UserError

KEEP_ENCODED = (".png", ".jpg", ".jpeg")


def _png(x: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(buf, "PNG", compress_level=1)
  return buf.getvalue()


def _from_folder(root: Path):
  files, labels, names = images.list_images(root, classes=True)

  def items():
    for i, f in enumerate(files):
      data = (root / f).read_bytes()
      if f.suffix.lower() not in KEEP_ENCODED:
        try:
          data = _png(images.decode(data, where=str(root / f)))
        except images.BadImage as e:
          raise UserError(f"cannot read image {root / f} ({e})") from None
      yield data, None if labels is None else int(labels[i])
  return len(files), items(), names, len(names)


def _from_array(src: Path, key, label_key):
  reader = arrays.open_npy(src) if src.suffix == ".npy" else arrays.open_npz(src, key, label_key)
  x = reader.x
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3, 4) or x.dtype not in (np.uint8, np.uint16):
    raise UserError(
        f"{reader.name} is {reader.dtype} {tuple(reader.x.shape)}; ArrayRecord shards hold "
        "encoded images: uint8 or uint16 arrays (N, H, W[, C]) with 1, 3 or 4 channels. "
        "Train on this file directly (data.source=npy or npz streams it from disk)")

  def items():
    for i in range(len(x)):
      yield _png(np.asarray(x[i])), None if reader.labels is None else int(reader.labels[i])
  return len(x), items(), (), reader.num_classes


def convert(src, out, shards: int = 1, key=None, label_key=None, progress=True) -> dict:
  """Writes `src` as `shards` ArrayRecord files into the new folder `out`; returns
  the description written to dataset.json."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm import tqdm

  from scaler.data import example_proto
  src, out = Path(src), Path(out)
  if not src.exists():
    raise UserError(f"convert: {src} not found")
  if shards < 1:
    raise UserError(f"--shards {shards}: needs at least 1")
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"--out {out} exists and is not an empty folder; choose a new one "
                    "(nothing is overwritten)")
  if src.is_dir():
    if key is not None or label_key is not None:
      raise UserError("--key and --label-key name arrays of an .npz; a folder's labels are "
                      "its class subfolders")
    count, items, names, num_classes = _from_folder(src)
  elif src.suffix in (".npy", ".npz"):
    if src.suffix == ".npy" and (key is not None or label_key is not None):
      raise UserError("--key and --label-key name arrays of an .npz; an .npy holds one array")
    count, items, names, num_classes = _from_array(src, key, label_key)
  else:
    raise UserError(f"convert: {src} is not a folder of images, an .npy or an .npz")
  if shards > count:
    raise UserError(f"--shards {shards} is more than the {count} examples of {src}")
  out.mkdir(parents=True, exist_ok=True)
  paths = [out / f"data-{s:05d}-of-{shards:05d}.array_record" for s in range(shards)]
  bounds = [count * s // shards for s in range(shards + 1)]
  with tqdm(total=count, desc=f"convert {src.name}", unit="ex", disable=not progress) as bar:
    for s, path in enumerate(paths):
      # group_size 1: every record is read on its own, as random access needs.
      writer = ArrayRecordWriter(str(path), "group_size:1")
      for _ in range(bounds[s + 1] - bounds[s]):
        data, label = next(items)
        writer.write(example_proto.encode(data, label))
        bar.update(1)
      writer.close()
  description = {"format": "scaler.dataset/1", "source": str(src), "num_examples": count,
                 "num_classes": num_classes, "class_names": list(names),
                 "files": [p.name for p in paths]}
  (out / DESCRIPTION).write_text(json.dumps(description, indent=1))
  return description
