"""Pictures people look at: every sample drawn, small images scaled up, held-out data
beside the samples only when there is some, views that outliers do not shrink."""

import json

import numpy as np
from PIL import Image

from scaler import plots


def test_a_grid_holds_every_image_and_small_images_are_scaled_up():
  images = np.random.default_rng(0).uniform(size=(100, 8, 8, 1))
  g = plots.grid(images)
  # 10 x 10 tiles of 8 + 1 px, scaled to at least MIN_GRID_PX: all 100 drawn, not 64.
  assert min(g.shape[:2]) >= plots.MIN_GRID_PX
  scale = g.shape[0] // (10 * 9 + 1)
  assert g.shape[:2] == ((10 * 9 + 1) * scale, (10 * 9 + 1) * scale)


def test_sample_pictures_have_a_held_out_panel_only_when_given(tmp_path):
  images = np.random.default_rng(0).uniform(size=(16, 8, 8, 1))
  plots.samples(images, None, tmp_path / "alone.png", kind="image")
  plots.samples(images, images, tmp_path / "beside.png", kind="image")
  alone = Image.open(tmp_path / "alone.png").size
  beside = Image.open(tmp_path / "beside.png").size
  assert beside[0] > 1.6 * alone[0]      # two panels side by side, not an empty one
  assert alone[1] >= plots.MIN_GRID_PX


def test_two_channel_images_are_drawn():
  plots.grid(np.zeros((4, 8, 8, 2)))     # before: matplotlib refused after training


def test_outliers_do_not_shrink_the_view():
  pts = np.random.default_rng(0).normal(size=(1000, 2))
  pts[:3] = 1e6
  (xlo, xhi), (ylo, yhi) = plots._view(pts)
  assert xhi < 10 and yhi < 10 and xlo > -10


def test_curves_draw_a_single_point_and_smooth_long_series(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps({"step": 5, "net/loss": 1.0}) + "\n")
  plots.curves(path, tmp_path / "one.png")
  assert (tmp_path / "one.png").stat().st_size > 1000
  noisy = 1 + np.random.default_rng(0).normal(scale=0.5, size=200) ** 2
  smooth = plots._smooth(list(noisy))
  assert np.std(np.diff(smooth)) < 0.2 * np.std(np.diff(noisy))
  assert abs(smooth[0] - noisy[0]) < 1e-9     # debiased: no pull towards 0 at the start
