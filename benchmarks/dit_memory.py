"""Compiled per-device memory of a DiT-B/2 train step with remat none / block /
dots_saveable, FSDP over 8 devices, as `scaler layout --devices 8` prints it.

    python3 benchmarks/dit_memory.py          # ~10 minutes on 2 CPU cores (3 compiles)

configs/dit_b2_imagenet64.yaml as shipped (bf16 compute, batch 256, 1024 tokens), on a
stand-in image folder of 1000 classes (two 64x64 images each), since layout only needs
the data's shape and classes. The figures are XLA:CPU's buffer assignment for simulated
devices: the same program's activations as on a GPU, not that backend's exact bytes.
Figures go to benchmarks/results/dit_memory.json.
"""

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = "configs/dit_b2_imagenet64.yaml"
MEMORY = re.compile(r"arguments ([\d,]+) B, outputs ([\d,]+) B, temporaries ([\d,]+) B")


def stand_in_folder(root: Path, classes=1000, per_class=2) -> Path:
  from PIL import Image
  rng = np.random.default_rng(0)
  for c in range(classes):
    d = root / f"n{c:08d}"
    d.mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(d / f"{i}.png")
  return root


def layout(folder: Path, remat: str) -> dict:
  out = subprocess.run(
      [sys.executable, "-m", "launch", "layout", CONFIG, f"data.path={folder}",
       f"model.remat={remat}", "--devices", "8"],
      cwd=ROOT, capture_output=True, text=True, check=True)
  args, outs, temps = (int(v.replace(",", "")) for v in MEMORY.search(out.stdout).groups())
  params = re.search(r"parameters: denoiser ([\d,]+)", out.stdout).group(1)
  return {"remat": remat, "parameters": int(params.replace(",", "")),
          "arguments_bytes": args, "outputs_bytes": outs, "temporaries_bytes": temps}


def main():
  with tempfile.TemporaryDirectory() as d:
    folder = stand_in_folder(Path(d) / "images")
    rows = [layout(folder, remat) for remat in ("none", "block", "dots_saveable")]
  result = {"config": CONFIG, "devices": 8, "rules": "fsdp", "rows": rows,
            "date": time.strftime("%Y-%m-%d")}
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "dit_memory.json").write_text(json.dumps(result, indent=1))
  for r in rows:
    print(f"remat {r['remat']:>13}: arguments {r['arguments_bytes'] / 2**30:.2f} GiB, "
          f"temporaries {r['temporaries_bytes'] / 2**30:.2f} GiB per device")


if __name__ == "__main__":
  main()
