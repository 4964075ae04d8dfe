"""Helpers the family tests share: tiny configs, runs through the real train loop,
their logged losses and final states."""

import jax
import numpy as np

from scaler import config as config_lib
from scaler import experiment as experiment_lib
from scaler.checkpoint import Checkpointer
from scaler.metrics import read_jsonl
from test_cli import ROOT

CONFIGS = ROOT / "configs"
PRESETS = [
    ({"data": -1, "fsdp": 1, "tensor": 1}, "data_parallel"),
    ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    ({"data": 1, "fsdp": 4, "tensor": 2}, "fsdp_tensor"),
]


def tiny(name: str) -> str:
  return str(CONFIGS / f"tiny_{name}.yaml")


def load(name: str, *overrides):
  return config_lib.load(tiny(name), list(overrides))


def mesh_overrides(mesh: dict, rules: str) -> list[str]:
  return [f"mesh.{k}={v}" for k, v in mesh.items()] + [f"rules={rules}"]


def metric(run_dir, key) -> np.ndarray:
  return np.array([r[key] for r in read_jsonl(run_dir / "metrics.jsonl")])


def final_state(cfg, run_dir, devices=None):
  exp = experiment_lib.build(cfg, devices)
  ckpt = Checkpointer(str(run_dir / "checkpoints"), cfg.checkpoint, {})
  state, data_state, step = ckpt.restore(experiment_lib.abstract_target(exp))
  ckpt.close()
  return jax.device_get(state), data_state, step


def _plain(x):
  if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(x))   # typed keys compare by their data
  return np.asarray(x)


def assert_bitwise(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), leaves_b):
    np.testing.assert_array_equal(_plain(x), _plain(y), err_msg=jax.tree_util.keystr(path))


QUALITY_TIMEOUT = 4 * 3600   # a shipped config trained in full on 2 loaded, shared cores


def _scaler(*args):
  """`scaler ARGS` in a fresh process on its own devices, without test_cli's 300 s limit."""
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=QUALITY_TIMEOUT)


def train_and_sample(config: str, run_dir, num=2000, *overrides):
  """`scaler train CONFIG --debug` as shipped (plus `overrides`), then `scaler sample`:
  (samples in data space, the run's final metrics)."""
  import json
  out = _scaler("train", str(CONFIGS / config), "--debug", "--run-dir", str(run_dir),
                *overrides)
  assert out.returncode == 0, out.stderr[-3000:]
  npz = run_dir.parent / f"{run_dir.name}_samples.npz"
  out = _scaler("sample", str(run_dir), "--num", str(num), "--out", str(npz))
  assert out.returncode == 0, out.stderr[-3000:]
  return np.load(npz)["samples"], json.loads((run_dir / "final_metrics.json").read_text())


def split_data(source: str, split: str, num: int | None = None):
  """(examples in data space, labels or None) of a built-in source's split."""
  from scaler.data import data_config, load_source
  data = load_source(data_config(source), split)
  rows = data.rows(np.arange(len(data) if num is None else min(num, len(data))))
  return data.spec.denormalize(rows["x"]), rows.get("label")


def digits_classifier():
  """A logistic regression on the training digits, in data space (the test's stand-in for
  scaler/quality.py's classifier)."""
  from sklearn.linear_model import LogisticRegression
  x, label = split_data("digits", "train")
  return LogisticRegression(max_iter=5000).fit(x.reshape(len(x), -1), label)


def recognised(classifier, images) -> tuple[float, float]:
  """(mean confidence, entropy of the predicted classes / log 10) of data-space images."""
  p = classifier.predict_proba(np.asarray(images).reshape(len(images), -1))
  share = np.bincount(p.argmax(axis=1), minlength=10) / len(p)
  entropy = -np.sum(share[share > 0] * np.log(share[share > 0]))
  return float(p.max(axis=1).mean()), float(entropy / np.log(10))


def against_a_mixture(samples, source: str) -> tuple[float, float]:
  """Sliced W1 to 2000 held-out examples of `source`: of `samples`, and of a
  GaussianMixture(8) fitted to the training split (the baseline to beat)."""
  from sklearn.mixture import GaussianMixture

  from test_quality import sliced_wasserstein
  train_x, _ = split_data(source, "train")
  test_x, _ = split_data(source, "test", 2000)
  gmm = GaussianMixture(n_components=8, random_state=0).fit(train_x).sample(2000)[0]
  return sliced_wasserstein(samples, test_x), sliced_wasserstein(gmm, test_x)
