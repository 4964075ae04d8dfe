"""Pictures of a run: samples (scatter or image grid) and training curves."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training hosts
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scaler.metrics import read_jsonl  # noqa: E402


def scatter(samples_Nx2, reference_Nx2, path: Path) -> None:
  """Held-out data beside the samples; `samples_Nx2` may be {title: points}, one panel each."""
  views = samples_Nx2 if isinstance(samples_Nx2, dict) else {"samples": samples_Nx2}
  panels = [("held-out data", reference_Nx2), *views.items()]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), sharex=True,
                           sharey=True)
  for ax, (title, pts) in zip(axes, panels):
    if pts is not None:
      ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
    ax.set_title(title)
    ax.set_aspect("equal")
  fig.tight_layout()
  # "tight": equal aspect shrinks the axes after the layout, and titles would be cut.
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def image_grid(images_NxHxWxC, path: Path, ncols: int | None = None) -> None:
  """Tiles images (values in their data range) into one PNG."""
  grid = _grid(images_NxHxWxC, ncols)
  plt.imsave(path, grid[..., 0] if grid.shape[-1] == 1 else grid,
             cmap="gray" if grid.shape[-1] == 1 else None)


def image_grids(views: dict, path: Path) -> None:
  """One titled grid per {title: images}, side by side in one PNG."""
  fig, axes = plt.subplots(1, len(views), figsize=(4.5 * len(views), 4.8))
  for ax, (title, images) in zip(np.atleast_1d(axes), views.items()):
    grid = _grid(images)
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid,
              cmap="gray" if grid.shape[-1] == 1 else None)
    ax.set_title(title)
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _grid(images_NxHxWxC, ncols: int | None = None) -> np.ndarray:
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
  return np.kron(grid, np.ones((scale, scale, 1), np.float32))


def samples(samples, reference, path: Path, kind: str) -> None:
  """A scatter for vectors (their first two coordinates), a grid of (at most 64) images
  for images. `samples` may be {title: samples}: one panel each (a family's
  `sample_views`), in one picture."""
  views = samples if isinstance(samples, dict) else {"samples": samples}
  views = {t: np.asarray(v) for t, v in views.items()}
  if kind == "image":
    if len(views) == 1:
      image_grid(next(iter(views.values()))[:64], path)
    else:
      image_grids({t: v[:64] for t, v in views.items()}, path)
    return
  ref = None if reference is None else np.asarray(reference)[:, :2]
  scatter({t: v[:, :2] for t, v in views.items()}, ref, path)


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
