"""Pictures of a run: samples (scatter or image grid) and training curves."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training hosts
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scaler.metrics import read_jsonl  # noqa: E402


def scatter(samples_Nx2, reference_Nx2, path: Path) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharex=True, sharey=True)
  for ax, pts, title in ((axes[0], reference_Nx2, "held-out data"),
                         (axes[1], samples_Nx2, "samples")):
    if pts is not None:
      ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
    ax.set_title(title)
    ax.set_aspect("equal")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def image_grid(images_NxHxWxC, path: Path, ncols: int | None = None) -> None:
  """Tiles images (values in their data range) into one PNG."""
  images = np.asarray(images_NxHxWxC, np.float32)
  n = len(images)
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  lo, hi = float(images.min()), float(images.max())
  images = (images - lo) / max(hi - lo, 1e-8)
  h, w, c = images.shape[1:]
  grid = np.ones((nrows * (h + 1) + 1, ncols * (w + 1) + 1, c), np.float32)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img
  scale = max(1, 256 // grid.shape[0])
  grid = np.kron(grid, np.ones((scale, scale, 1), np.float32))
  plt.imsave(path, grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None)


def samples(samples, reference, path: Path, kind: str) -> None:
  """A scatter for 2D vectors, a grid of (at most 64) images for images."""
  samples = np.asarray(samples)
  if kind == "image":
    image_grid(samples[:64], path)
  elif samples.ndim == 2 and samples.shape[1] == 2:
    scatter(samples, None if reference is None else np.asarray(reference), path)
  else:  # other vectors: the first two coordinates
    scatter(samples[:, :2], None if reference is None else np.asarray(reference)[:, :2], path)


def reconstructions(originals, recons, path: Path, kind: str) -> None:
  """Held-out examples and their reconstructions: images in column pairs (original,
  reconstruction), vectors as two scatters."""
  originals, recons = np.asarray(originals), np.asarray(recons)
  if kind != "image":
    scatter(recons[:, :2], originals[:, :2], path)
    return
  pairs = np.stack([originals, recons], axis=1).reshape(-1, *originals.shape[1:])
  image_grid(pairs, path, ncols=8)


def curves(metrics_path: Path, path: Path) -> None:
  """Every `*/loss` series against the step, on a log scale when positive."""
  if not Path(metrics_path).exists():
    return
  rows = read_jsonl(metrics_path)
  keys = sorted({k for r in rows for k in r if k.endswith("/loss")})
  if not keys:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for k in keys:
    pts = [(r["step"], r[k]) for r in rows if k in r]
    ax.plot(*zip(*pts), label=k)
  if all(r[k] > 0 for r in rows for k in keys if k in r):
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
