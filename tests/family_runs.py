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
