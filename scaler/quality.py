"""Sample-quality metrics: distances between a model's samples and held-out data.

For vectors: the sliced Wasserstein-1 distance and the kernel MMD. For the 8x8 digits: a
small classifier trained on the training digits, whose hidden features give a Frechet
distance (FID's recipe, Heusel et al. 2017, with this classifier in place of Inception),
and whose predictions give the samples' confidence and the entropy of their classes
(Inception-score-like: confident and evenly spread over the classes is good).

Everything takes arrays in data space, as a user sees them, on the host (numpy).
"""

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

# --- vectors -----------------------------------------------------------------------------


def sliced_wasserstein(a_NxD, b_MxD, num_projections: int = 256, seed: int = 0) -> float:
  """Mean 1-D Wasserstein-1 distance over random unit projections (the first min(N, M)
  rows of each)."""
  a_NxD, b_MxD = _flat(a_NxD), _flat(b_MxD)
  n = min(len(a_NxD), len(b_MxD))
  dirs_DxP = np.random.default_rng(seed).normal(size=(a_NxD.shape[1], num_projections))
  dirs_DxP /= np.linalg.norm(dirs_DxP, axis=0, keepdims=True)
  pa_NxP = np.sort(a_NxD[:n] @ dirs_DxP, axis=0)
  pb_NxP = np.sort(b_MxD[:n] @ dirs_DxP, axis=0)
  return float(np.mean(np.abs(pa_NxP - pb_NxP)))


def mmd(a_NxD, b_MxD, bandwidth: float | None = None) -> float:
  """Unbiased squared MMD with a Gaussian kernel exp(-|x - y|^2 / (2 h^2)).

  h defaults to the median pairwise distance of the pooled samples (Gretton et al. 2012),
  so the figure has no unit to choose; 0 in expectation when both come from one
  distribution (it can be slightly negative).
  """
  a_NxD, b_MxD = _flat(a_NxD), _flat(b_MxD)
  both = np.concatenate([a_NxD, b_MxD])
  d2 = _sq_dists(both, both)
  if bandwidth is None:
    bandwidth = float(np.sqrt(np.median(d2[np.triu_indices(len(both), 1)]) / 2))
  k = np.exp(-d2 / (2 * max(bandwidth, 1e-12) ** 2))
  n, m = len(a_NxD), len(b_MxD)
  kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
  return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1))
               + (kbb.sum() - np.trace(kbb)) / (m * (m - 1)) - 2 * kab.mean())


def frechet_distance(f_NxF, g_MxF) -> float:
  """|mu_f - mu_g|^2 + tr(S_f + S_g - 2 (S_f S_g)^1/2) between Gaussians fitted to two
  feature sets.

  tr (S_f S_g)^1/2 is taken as the sum of the square roots of the eigenvalues of the
  symmetric S_f^1/2 S_g S_f^1/2 (the same spectrum), with eigh: ReLU features have dead
  units, so the covariances are singular, and scipy's sqrtm of the product then warns
  and may return complex noise.
  """
  mu_f, mu_g = f_NxF.mean(0), g_MxF.mean(0)
  s_f, s_g = np.cov(f_NxF, rowvar=False), np.cov(g_MxF, rowvar=False)
  vals, vecs = np.linalg.eigh(s_f)
  root_f = (vecs * np.sqrt(np.maximum(vals, 0.0))) @ vecs.T
  cross = np.sqrt(np.maximum(np.linalg.eigvalsh(root_f @ s_g @ root_f), 0.0)).sum()
  return float(np.sum((mu_f - mu_g) ** 2) + np.trace(s_f) + np.trace(s_g) - 2 * cross)


def _flat(x):
  x = np.asarray(x, np.float64)
  return x.reshape(len(x), -1)


def _sq_dists(a_NxD, b_MxD):
  return np.maximum((a_NxD ** 2).sum(1)[:, None] + (b_MxD ** 2).sum(1)[None]
                    - 2 * a_NxD @ b_MxD.T, 0.0)


# --- digits ------------------------------------------------------------------------------

# Bump when the classifier's recipe changes: the cache file is keyed on it.
_RECIPE = "mlp-128-64-relu-fullbatch-adam-600-seed0-v1"


class DigitsClassifier:
  """An MLP 64 -> 128 -> 64 -> 10 on the 8x8 digits (values 0..16); the 64 features of its
  last hidden layer are the Frechet distance's features. Test accuracy 98.1%."""

  def __init__(self, weights: list[np.ndarray]):
    self.weights = weights   # [W1, b1, W2, b2, W3, b3]

  def features(self, images) -> np.ndarray:
    """(N, 8, 8[, 1]) images in data space -> (N, 64); values clipped to the data range."""
    h = np.clip(_flat(images), 0.0, 16.0) / 16.0
    w1, b1, w2, b2, _, _ = self.weights
    h = np.maximum(h @ w1 + b1, 0.0)
    return np.maximum(h @ w2 + b2, 0.0)

  def probs(self, images) -> np.ndarray:
    logits = self.features(images) @ self.weights[4] + self.weights[5]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)

  def predict(self, images) -> np.ndarray:
    return self.probs(images).argmax(axis=1)


def _cache_dir() -> Path:
  return Path(os.environ.get("SCALER_CACHE", Path.home() / ".cache" / "scaler"))


def _train_digits_classifier(x, y, steps=600, lr=3e-3, weight_decay=1e-4) -> list[np.ndarray]:
  """Full-batch Adam on softmax cross-entropy, in float64 numpy from a seeded He init:
  no shuffling and one BLAS thread, so the same weights on every run (about 90 GFLOP:
  a minute on one core)."""
  from threadpoolctl import threadpool_limits
  with threadpool_limits(1):   # a multi-threaded BLAS could sum in another order
    return _adam(x, y, steps, lr, weight_decay)


def _adam(x, y, steps, lr, weight_decay):
  rng = np.random.default_rng(0)
  h_NxD = _flat(x) / 16.0
  sizes = [h_NxD.shape[1], 128, 64, 10]
  weights = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    weights += [rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out)), np.zeros(fan_out)]
  onehot_NxK = np.eye(10)[y]
  m = [np.zeros_like(w) for w in weights]
  v = [np.zeros_like(w) for w in weights]
  for step in range(1, steps + 1):
    w1, b1, w2, b2, w3, b3 = weights
    a1 = h_NxD @ w1 + b1
    z1 = np.maximum(a1, 0.0)
    a2 = z1 @ w2 + b2
    z2 = np.maximum(a2, 0.0)
    logits = z2 @ w3 + b3
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    d3 = (p - onehot_NxK) / len(h_NxD)
    d2 = (d3 @ w3.T) * (a2 > 0)
    d1 = (d2 @ w2.T) * (a1 > 0)
    grads = [h_NxD.T @ d1, d1.sum(0), z1.T @ d2, d2.sum(0), z2.T @ d3, d3.sum(0)]
    for i, (w, g) in enumerate(zip(weights, grads)):
      g = g + weight_decay * w * (i % 2 == 0)   # decay the matrices, not the biases
      m[i] = 0.9 * m[i] + 0.1 * g
      v[i] = 0.999 * v[i] + 0.001 * g * g
      step_size = lr * np.sqrt(1 - 0.999 ** step) / (1 - 0.9 ** step)
      weights[i] = w - step_size * m[i] / (np.sqrt(v[i]) + 1e-8)
  return weights


@functools.lru_cache(maxsize=1)
def digits_classifier() -> DigitsClassifier:
  """The classifier, trained once on the training digits (seeded, the same on every run)
  and cached in $SCALER_CACHE (default ~/.cache/scaler) as plain arrays, keyed on the
  recipe and the training data."""
  from scaler.data.digits import digits
  x, y = digits("train")
  key = hashlib.sha256(_RECIPE.encode() + x.tobytes() + y.tobytes()).hexdigest()[:16]
  path = _cache_dir() / f"digits_classifier_{key}.npz"
  if path.is_file():
    with np.load(path, allow_pickle=False) as z:
      return DigitsClassifier([z[f"w{i}"] for i in range(6)])
  weights = _train_digits_classifier(x, y)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **{f"w{i}": w for i, w in enumerate(weights)})
    tmp.replace(path)   # atomic: parallel test processes never read half a file
  except OSError:
    pass   # a read-only home: the classifier is still returned, only not cached
  return DigitsClassifier(weights)


def digits_scores(samples, reference) -> dict:
  """The digits metrics of `samples` against `reference` digits, both in data space.

  frechet: Frechet distance of the classifier's features (lower is better);
  confidence: mean of the top class probability (real test digits: about 0.97);
  class_entropy: entropy in nats of the predicted classes' histogram (log 10 = 2.30 is
  all ten classes equally often).
  """
  clf = digits_classifier()
  probs = clf.probs(samples)
  counts = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]) / len(probs)
  nz = counts[counts > 0]
  return {"frechet": frechet_distance(clf.features(samples), clf.features(reference)),
          "confidence": float(probs.max(axis=1).mean()),
          "class_entropy": float(-(nz * np.log(nz)).sum())}
