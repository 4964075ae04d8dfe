"""2D toy distributions, generated deterministically, vectorised, with their labels
where they have them (the moon, the gaussian component)."""

import numpy as np


def two_moons(n, rng, noise):
  # Imported here: scikit-learn takes over a second to import; other sources skip it.
  from sklearn.datasets import make_moons
  x, moon = make_moons(n, noise=noise, random_state=int(rng.integers(2**31)))
  return x, moon


def eight_gaussians(n, rng, noise):
  component = rng.integers(0, 8, n)
  angles = component * (np.pi / 4)
  centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return centers + rng.normal(scale=max(noise, 1e-3) * 2, size=(n, 2)), component


def checkerboard(n, rng, noise):
  # 8 unit squares of a 4x4 board, the "black" ones.
  x1 = rng.uniform(-2, 2, n)
  x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2 - 2
  x2 = x2 + (np.floor(x1) % 2)
  return np.stack([x1, x2], axis=1), None


def swiss_roll(n, rng, noise):
  t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
  x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / 5.0
  return x + rng.normal(scale=noise * 2, size=(n, 2)), None


TOYS = {"two_moons": two_moons, "eight_gaussians": eight_gaussians,
        "checkerboard": checkerboard, "swiss_roll": swiss_roll}
NUM_CLASSES = {"two_moons": 2, "eight_gaussians": 8}


def generate(name: str, n: int, seed: int, split: str, noise: float = 0.0):
  """(`n` points (n, 2) float32, labels (n,) int32 or None); the train and test splits
  come from different streams of `seed`."""
  rng = np.random.default_rng([seed, 0 if split == "train" else 1, len(name)])
  x, label = TOYS[name](n, rng, noise)
  return x.astype(np.float32), None if label is None else label.astype(np.int32)
