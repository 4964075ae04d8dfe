"""The likelihood families through the real train loop: the same losses on 1 and 8 devices
under every rule preset (Glow with its ActNorm init on the first global batch, the
transformer under fsdp_tensor), and Glow's exact resume after that init."""

import jax
import numpy as np
import pytest

from scaler.train import train
from family_runs import PRESETS, assert_bitwise, final_state, load, mesh_overrides, metric

# (tiny config, the logged metrics compared); the ActNorm init lands in the first loss.
KEYS = {"flow": ("flow/loss", "flow/bpd"), "autoregressive": ("net/loss", "net/bpd")}


def _cfg(name, mesh, rules, *overrides):
  return load(name, *mesh_overrides(mesh, rules), "train.log_every=1", "checkpoint.every=1000",
              *overrides)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The 1-device run of a family, trained when a test first asks for it (the default
  suite runs one family's case only)."""
  runs = {}

  def run(name):
    if name not in runs:
      runs[name] = tmp_path_factory.mktemp(f"{name}_one")
      train(_cfg(name, {"data": 1, "fsdp": 1, "tensor": 1}, "data_parallel"), runs[name],
            devices=jax.devices()[:1])
    return runs[name]
  return run


@pytest.mark.parametrize("name", list(KEYS))
@pytest.mark.parametrize("mesh, rules", PRESETS, ids=[p[1] for p in PRESETS])
def test_same_losses_on_one_and_eight_devices(one_device, tmp_path, name, mesh, rules):
  train(_cfg(name, mesh, rules), tmp_path)
  for key in KEYS[name]:
    got, expected = metric(tmp_path, key), metric(one_device(name), key)
    assert len(got) == 20
    np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=key)


def _actnorms(state):
  """Every ActNorm (bias, log_scale) of a Glow's saved parameters, by path."""
  found = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params["flow"]):
    key = jax.tree_util.keystr(path)
    if "'norm'" in key:   # GlowStep.norm: the ActNorm
      found[key] = np.asarray(leaf)
  return found


def test_glow_resume_after_its_data_init_is_bitwise_exact(tmp_path):
  cfg = load("flow", "train.steps=8", "train.log_every=4", "checkpoint.every=4")
  train(cfg, tmp_path / "straight")
  train(cfg, tmp_path / "split", stop_at=4)
  train(cfg, tmp_path / "split")   # a second ActNorm init (on step 4's batch) would differ
  a, data_a, step_a = final_state(cfg, tmp_path / "straight")
  b, data_b, step_b = final_state(cfg, tmp_path / "split")
  assert step_a == step_b == 8 and data_a == data_b
  assert_bitwise(a, b)
  # The init ran: 8 optimizer steps at lr 1e-3 move a zero-initialised ActNorm by at most
  # ~8e-3, while the data init whitens channels whose spread is far from 1.
  actnorms = _actnorms(a)
  assert actnorms and max(np.abs(v).max() for v in actnorms.values()) > 0.1
