"""Pictures of a run: samples (scatter or image grid) beside held-out data, and curves."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training hosts
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scaler.metrics import read_jsonl  # noqa: E402

MIN_GRID_PX = 512   # small images (8x8 digits) are scaled up to at least this


def _view(points_Nx2, quantile=0.005, margin=0.1):
  """Axis limits that hold the bulk of the points: a few outliers must not shrink the
  data to a dot. Returns ((xlo, xhi), (ylo, yhi))."""
  lo = np.quantile(points_Nx2, quantile, axis=0)
  hi = np.quantile(points_Nx2, 1 - quantile, axis=0)
  pad = (hi - lo) * margin + 1e-6
  return (lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1])


def scatter(views, reference_Nx2, path: Path) -> None:
  """Samples, beside held-out data when given, on the same axes. `views` is an array of
  points or {title: points}, one panel each (a family's `sample_views`)."""
  views = views if isinstance(views, dict) else {"samples": views}
  panels = [(np.asarray(pts), title) for title, pts in views.items()]
  if reference_Nx2 is not None:
    panels.insert(0, (reference_Nx2, "held-out data"))
  basis = reference_Nx2 if reference_Nx2 is not None else np.concatenate(
      [pts for pts, _ in panels])
  (xlo, xhi), (ylo, yhi) = _view(np.asarray(basis))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
  for ax, (pts, title) in zip(axes[0], panels):
    pts = np.asarray(pts)
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
    outside = np.sum((pts[:, 0] < xlo) | (pts[:, 0] > xhi) | (pts[:, 1] < ylo) | (pts[:, 1] > yhi))
    ax.set_title(title + (f" ({outside} of {len(pts)} outside the view)" if outside else ""),
                 fontsize=9)
    ax.set_xlim(xlo, xhi)
    ax.set_ylim(ylo, yhi)
    ax.set_aspect("equal")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def grid(images_NxHxWxC, bounds=None) -> np.ndarray:
  """Tiles images (values in their data range) into one array, scaled to [0, 1] (from
  `bounds` (lo, hi) when given, else their own range) and up to at least MIN_GRID_PX on
  its shorter side."""
  images = np.asarray(images_NxHxWxC, np.float32)
  n, h, w, c = images.shape
  ncols = int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  lo, hi = bounds or (float(images.min()), float(images.max()))
  images = np.clip((images - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
  out = np.ones((nrows * (h + 1) + 1, ncols * (w + 1) + 1, c), np.float32)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    out[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img
  scale = max(1, int(math.ceil(MIN_GRID_PX / min(out.shape[:2]))))
  return np.kron(out, np.ones((scale, scale, 1), np.float32))


def _show(ax, grid_HxWxC):
  c = grid_HxWxC.shape[-1]
  if c in (3, 4):
    ax.imshow(grid_HxWxC, interpolation="nearest")
  else:  # one channel, or a count no colour map has: the first channel in grey
    ax.imshow(grid_HxWxC[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  ax.axis("off")


def image_grid(views, path: Path, reference_NxHxWxC=None) -> None:
  """A grid of every given image; held-out images beside it when given. `views` is an
  array of images or {title: images}, one grid each."""
  views = views if isinstance(views, dict) else {"samples": views}
  panels = [(grid(images), f"{title} ({len(images)})") for title, images in views.items()]
  if reference_NxHxWxC is not None and len(reference_NxHxWxC):
    panels.insert(0, (grid(reference_NxHxWxC), "held-out data"))
  height = max(p[0].shape[0] for p in panels)
  width = sum(p[0].shape[1] for p in panels)
  fig, axes = plt.subplots(1, len(panels), squeeze=False,
                           figsize=(width / 100 + 0.4 * len(panels), height / 100 + 0.4))
  for ax, (g, title) in zip(axes[0], panels):
    _show(ax, g)
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def samples(samples, reference, path: Path, kind: str) -> None:
  """A scatter for vectors (their first two coordinates), a grid for images; held-out
  data beside them when `reference` is given. `samples` may be {title: samples}: one
  panel each, in one picture (a family's `sample_views`, e.g. an EBM's chains from
  noise and from its buffer)."""
  views = samples if isinstance(samples, dict) else {"samples": samples}
  views = {title: np.asarray(v) for title, v in views.items()}
  reference = None if reference is None else np.asarray(reference)
  if kind == "image":
    image_grid(views, path, reference)
  else:
    first2 = lambda a: a.reshape(len(a), -1)[:, :2]
    scatter({title: first2(v) for title, v in views.items()},
            None if reference is None else first2(reference), path)


def _smooth(values, weight=0.9):
  """TensorBoard's exponential smoothing, debiased."""
  out, acc = [], 0.0
  for i, v in enumerate(values):
    acc = weight * acc + (1 - weight) * v
    out.append(acc / (1 - weight ** (i + 1)))
  return out


def reconstructions(originals, recons, path: Path, kind: str) -> None:
  """Held-out examples beside their reconstructions (the same grid positions), a scatter
  of each for vectors."""
  originals, recons = np.asarray(originals), np.asarray(recons)
  if kind != "image":
    scatter({"reconstructions": recons.reshape(len(recons), -1)[:, :2]},
            originals.reshape(len(originals), -1)[:, :2], path)
    return
  # One grey scale for both, the originals' range: a reconstruction's error shows.
  bounds = (float(originals.min()), float(originals.max()))
  panels = [(grid(originals, bounds), "held-out data"), (grid(recons, bounds), "reconstructions")]
  height, width = panels[0][0].shape[:2]
  fig, axes = plt.subplots(1, 2, figsize=(2 * width / 100 + 0.8, height / 100 + 0.4))
  for ax, (g, title) in zip(axes, panels):
    _show(ax, g)
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def curves(metrics_path: Path, path: Path) -> None:
  """Every `*/loss` series against the step, smoothed where it is long, on a log scale
  when positive; a single logged point shows as a marker."""
  if not Path(metrics_path).exists():
    return
  rows = read_jsonl(metrics_path)
  keys = sorted({k for r in rows for k in r if k.endswith("/loss")})
  if not keys:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for k in keys:
    steps, values = zip(*[(r["step"], r[k]) for r in rows if k in r])
    if len(values) > 10:
      line, = ax.plot(steps, values, alpha=0.25)
      ax.plot(steps, _smooth(values), color=line.get_color(), label=f"{k} (smoothed)")
    else:
      ax.plot(steps, values, marker="o", label=k)
  if all(r[k] > 0 for r in rows for k in keys if k in r):
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
