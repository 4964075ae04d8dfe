"""The same model, seed and global batch give the same losses on 1 device and on 8."""

import jax
import numpy as np
import pytest

from scaler import config as config_lib
from scaler import experiment as experiment_lib
from scaler import state as state_lib
from scaler.metrics import read_jsonl
from scaler.train import train
from test_cli import TINY

PRESETS = [
    ({"data": -1, "fsdp": 1, "tensor": 1}, "data_parallel"),
    ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    ({"data": 1, "fsdp": 4, "tensor": 2}, "fsdp_tensor"),
]


def _cfg(mesh, rules):
  overrides = [f"mesh.{k}={v}" for k, v in mesh.items()] + [
      f"rules={rules}", "train.steps=20", "train.log_every=1", "checkpoint.every=1000"]
  return config_lib.load(TINY, overrides)


def _losses(run_dir):
  return np.array([r["denoiser/loss"] for r in read_jsonl(run_dir / "metrics.jsonl")])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("one")
  cfg = _cfg({"data": 1, "fsdp": 1, "tensor": 1}, "data_parallel")
  train(cfg, run_dir, devices=jax.devices()[:1])
  return _losses(run_dir)


@pytest.mark.parametrize("mesh, rules", PRESETS)
def test_same_losses_on_one_and_eight_devices(one_device, tmp_path, mesh, rules):
  train(_cfg(mesh, rules), tmp_path)
  losses = _losses(tmp_path)
  assert len(losses) == 20
  np.testing.assert_allclose(losses, one_device, rtol=1e-5)


@pytest.mark.parametrize("mesh, rules", PRESETS[1:])
def test_arrays_carry_the_layout_shardings(mesh, rules):
  cfg = _cfg(mesh, rules)
  exp = experiment_lib.build(cfg)
  _, shardings = experiment_lib.abstract_shardings(exp)  # what `scaler layout` prints
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, False, exp.rules, exp.mesh, 0)
  planned = jax.tree.leaves(shardings.params)
  actual = jax.tree.leaves(state.params)
  assert any(s.spec != jax.sharding.PartitionSpec(*[None] * len(s.spec)) for s in planned)
  for s, a in zip(planned, actual):
    assert a.sharding.is_equivalent_to(s, a.ndim)
    assert a.addressable_shards[0].data.shape == s.shard_shape(a.shape)
