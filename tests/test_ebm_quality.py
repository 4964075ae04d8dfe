"""EBM sample quality: the shipped configs, trained as shipped, against simple baselines.

Eight gaussians: samples from fresh noise and from the buffer cover all 8 modes and are
closer to the held-out split (sliced Wasserstein-1) than a uniform box over the data
and a GaussianMixture(2). Digits: the buffer's samples are recognised by a classifier
trained on the training digits. The classifier is an RBF SVM with calibrated
probabilities: a logistic regression (also reported) gives uniform noise a mean
confidence of 0.89, so it cannot tell digits from noise; the SVM gives it 0.22 and the
held-out digits 0.93. (scaler/quality.py will replace these helpers on merge.)
"""

import jax
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from scaler import config as config_lib
from scaler import experiment as experiment_lib
from scaler.checkpoint import Checkpointer
from scaler.data import load_source
from scaler.sampling import draw_samples
from scaler.train import train
from test_cli import ROOT, scaler
from test_quality import sliced_wasserstein

GAUSSIANS = ROOT / "configs" / "ebm_eight_gaussians.yaml"
DIGITS = ROOT / "configs" / "ebm_digits.yaml"


# Training as shipped takes 5-10 minutes on 2 shared cores (2000 steps on 8 simulated
# devices); the CLI helper's default 300 s stopped the eight gaussians at step ~1900.
TRAIN_TIMEOUT_S = 3600


def _train_and_sample(config, run_dir, tmp_path, num, *overrides):
  out = scaler("train", str(config), "--debug", "--run-dir", str(run_dir), *overrides,
               timeout=TRAIN_TIMEOUT_S)
  assert out.returncode == 0, out.stderr[-3000:]
  samples = {}
  for name, extra in (("noise", []), ("buffer", ["--from-buffer"])):
    path = tmp_path / f"{name}.npz"
    out = scaler("sample", str(run_dir), "--num", str(num), "--out", str(path), *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    samples[name] = np.load(path)["samples"]
  return samples


def _data(config):
  cfg = config_lib.load(config)
  # In data space, as stored: the samples `scaler sample` writes are there too.
  train, test = (load_source(cfg.data, s) for s in ("train", "test"))
  train, test = train.read(np.arange(len(train))), test.read(np.arange(len(test)))
  return train.x.astype(np.float32), train.label, test.x.astype(np.float32), test.label


def _modes(samples_Nx2):
  """Share of samples nearest to each of the 8 centres, counting those within 0.5 of one."""
  angles = np.arange(8) * np.pi / 4
  centres = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  d = np.linalg.norm(samples_Nx2[:, None] - centres[None], axis=-1)
  near = d.min(axis=1) < 0.5
  return np.bincount(d.argmin(axis=1)[near], minlength=8) / len(samples_Nx2)


def _check_gaussians(samples, margin):
  train_x, _, test_x, _ = _data(GAUSSIANS)
  test_x = test_x[:2000]
  rng = np.random.default_rng(0)
  box = rng.uniform(train_x.min(axis=0), train_x.max(axis=0), size=(2000, 2))
  gmm = GaussianMixture(n_components=2, random_state=0).fit(train_x).sample(2000)[0]
  gmm = gmm[rng.permutation(2000)]   # sample() returns the components in order
  base = {"box": sliced_wasserstein(box, test_x), "gmm2": sliced_wasserstein(gmm, test_x),
          "fresh data": sliced_wasserstein(train_x[:2000], test_x)}
  print("sliced W1 to held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()))
  for name, x in samples.items():
    ours, modes = sliced_wasserstein(x, test_x), _modes(x)
    print(f"  EBM from {name}: {ours:.4f}; share per mode {np.round(modes, 3).tolist()}")
    assert np.all(modes > 0.05), (name, modes)            # every mode covered
    assert ours < margin * base["box"], (name, ours, base)
    assert ours < base["gmm2"], (name, ours, base)


@pytest.mark.slow
def test_eight_gaussians_as_shipped_cover_every_mode_and_beat_the_baselines(tmp_path):
  samples = _train_and_sample(GAUSSIANS, tmp_path / "run", tmp_path, 2000)
  _check_gaussians(samples, margin=0.5)


@pytest.mark.slow
def test_eight_gaussians_short_run_finds_every_mode(tmp_path):
  # The shipped recipe for 500 steps with shorter chains, in this process on one device
  # (the same numbers as on 8): already all 8 modes. It stops one step short of the
  # schedule's end, which skips the final picture (samples are drawn below). 300 steps
  # were enough before the normalisation statistics came from a 4096-example sample
  # (main's data rows): since, one mode gets 4% of the samples from noise; at 500 the
  # least-visited mode gets 6.3% (from noise) and 6.7% (from the buffer), sliced W1
  # 0.151 / 0.149 against the box's 0.257 and GMM(2)'s 0.293. Slow: ~80 s on 2 cores.
  cfg = config_lib.load(GAUSSIANS, ["train.steps=501", "train.log_every=100",
                                    "checkpoint.every=0", "family.langevin_steps=20",
                                    "family.sample_steps=100", "mesh.data=1"])
  train(cfg, tmp_path, devices=jax.devices()[:1], stop_at=500)
  exp = experiment_lib.build(cfg, jax.devices()[:1])
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), cfg.checkpoint, {})
  state, _, _ = ckpt.restore(experiment_lib.abstract_target(exp))
  ckpt.close()
  samples = {name: exp.spec.denormalize(draw_samples(exp, state, 2000, **kw))
             for name, kw in (("noise", {}), ("buffer", {"from_buffer": True}))}
  _check_gaussians(samples, margin=0.8)


def digit_classifiers(train_x, train_y):
  """An RBF SVM with calibrated probabilities, and a logistic regression, on pixels."""
  from sklearn.calibration import CalibratedClassifierCV
  from sklearn.linear_model import LogisticRegression
  from sklearn.svm import SVC
  flat = train_x.reshape(len(train_x), -1)
  return {"svm": CalibratedClassifierCV(SVC(), ensemble=False).fit(flat, train_y),
          "logistic": LogisticRegression(max_iter=3000).fit(flat, train_y)}


def _confidence(clf, x):
  p = clf.predict_proba(x.reshape(len(x), -1))
  share = np.bincount(p.argmax(axis=1), minlength=10) / len(x)
  return float(p.max(axis=1).mean()), float(-(share * np.log(share + 1e-12)).sum())


@pytest.mark.slow
def test_digits_from_the_buffer_are_recognised(tmp_path):
  samples = _train_and_sample(DIGITS, tmp_path / "run", tmp_path, 500)
  train_x, train_y, test_x, test_y = _data(DIGITS)
  clfs = digit_classifiers(train_x, train_y)
  noise = np.random.default_rng(0).uniform(0, 16, (500, 8, 8, 1))
  for name, clf in clfs.items():
    print(f"{name}: held-out accuracy {clf.score(test_x.reshape(len(test_x), -1), test_y):.3f}; "
          "mean confidence / class entropy (max 2.303): " + ", ".join(
              f"{k} {c:.3f} / {h:.3f}" for k, (c, h) in
              [(k, _confidence(clf, v)) for k, v in
               (("held-out", test_x), ("uniform noise", noise), ("EBM from noise",
                samples["noise"]), ("EBM from the buffer", samples["buffer"]))]))
  confidence, entropy = _confidence(clfs["svm"], samples["buffer"])
  assert confidence >= 0.8, confidence
  assert entropy > 1.9, entropy     # many classes, not one mode (10 equal classes: 2.303)
