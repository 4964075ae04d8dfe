"""The driver's stages and the hooks families use: data-dependent initialisation, extra
state sharded by its roles, held-out evaluation, finite-only checkpoints, FLOP counts,
and the mesh checks made before anything compiles."""

import jax
import numpy as np
import pytest

from scaler import config as config_lib
from scaler import experiment as experiment_lib
from scaler import perf
from scaler import state as state_lib
from scaler import train as train_lib
from scaler.checkpoint import Checkpointer
from scaler.data import load_source, to_global
from scaler.errors import UserError
from scaler.evaluate import evaluate
from scaler.loop import first_non_finite
from scaler.families import FAMILIES
from test_cli import TINY
from toy_family import HooksConfig, HooksFamily


@pytest.fixture
def hooks(monkeypatch):
  monkeypatch.setitem(FAMILIES, "hooks", (HooksConfig, HooksFamily))


def _cfg(*overrides):
  return config_lib.load(TINY, ["family={name: hooks}", "train.steps=8", "train.log_every=4",
                                "checkpoint.every=4", *overrides])


def _first_state(cfg, tmp_path, devices=None):
  run = train_lib.setup(cfg, tmp_path, devices)
  ckpt = train_lib.open_checkpoints(run)
  state, loader, start = train_lib.restore_or_init(run, ckpt, None)
  first = to_global(next(iter(loader)), run.batch_sharding, cfg.train.batch_size)
  ckpt.close()
  return run, loader, train_lib.data_init(run, state, first)


def test_data_init_uses_the_first_global_batch_on_any_mesh(hooks, tmp_path):
  cfg = _cfg()
  run, loader, one = _first_state(cfg, tmp_path / "one", jax.devices()[:1])
  expected = loader.batch(0)["x"].mean(axis=0)          # step 0's whole global batch
  np.testing.assert_allclose(one.params["net"]["shift"], expected, rtol=1e-6)
  _, _, fsdp = _first_state(_cfg("mesh.data=1", "mesh.fsdp=8", "rules=fsdp"), tmp_path / "f")
  np.testing.assert_allclose(fsdp.params["net"]["shift"], expected, rtol=1e-6)


def _final(cfg, run_dir):
  exp = experiment_lib.build(cfg)
  ckpt = Checkpointer(str(run_dir / "checkpoints"), cfg.checkpoint, {})
  state, _, step = ckpt.restore(experiment_lib.abstract_target(exp))
  ckpt.close()
  return jax.device_get(state), step


def test_data_init_is_saved_and_not_repeated_on_resume(hooks, tmp_path):
  cfg = _cfg()
  train_lib.train(cfg, tmp_path / "straight")
  train_lib.train(cfg, tmp_path / "split", stop_at=4)
  train_lib.train(cfg, tmp_path / "split")   # a second data_init (step 4's batch) would differ
  (a, sa), (b, sb) = _final(cfg, tmp_path / "straight"), _final(cfg, tmp_path / "split")
  assert sa == sb == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(x) if x.dtype == jax.random.key(0).dtype else x),
                                  np.asarray(jax.random.key_data(y) if y.dtype == jax.random.key(0).dtype else y))
  assert np.any(a.params["net"]["shift"] != 0)


@pytest.mark.parametrize("mesh, rules", [
    (["mesh.data=-1"], "data_parallel"),
    (["mesh.data=2", "mesh.fsdp=4"], "fsdp"),
])
def test_extra_state_is_sharded_along_the_batch_axes(hooks, mesh, rules):
  exp = experiment_lib.build(_cfg(*mesh, f"rules={rules}"))
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, False, exp.rules, exp.mesh, 0)
  buffer = state.extra["buffer"]
  assert tuple(buffer.sharding.spec) == (("data", "fsdp"), None)
  assert {s.data.shape for s in buffer.addressable_shards} == {(HooksFamily.BUFFER // 8, 2)}


def test_evaluate_averages_the_familys_metric_over_every_held_out_example(hooks):
  cfg = _cfg("data.num_test=100")   # not a multiple of the batch (64): one padded batch
  exp = experiment_lib.build(cfg)
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, False, exp.rules, exp.mesh, 0)
  test = load_source(cfg.data, "test")
  got = evaluate(exp, state, test)
  net = state_lib.merge(exp.networks, state.params, state.rest)["net"]
  x = test.rows(np.arange(len(test)))["x"]
  expected = float(np.mean(np.mean((np.asarray(net(x)) - x) ** 2, axis=1)))
  assert got["mse"] == pytest.approx(expected, rel=1e-5)


def test_a_diverging_run_never_checkpoints_a_non_finite_state(tmp_path):
  # SGD at a learning rate that diverges within a few steps, saving every 2 steps and
  # logging rarely: before, saves were not gated on the finiteness check.
  cfg = config_lib.load(TINY, ["optimizer={name: sgd, lr: 30.0, schedule: constant}",
                               "train.steps=200", "train.log_every=100", "checkpoint.every=2",
                               "checkpoint.keep_last=2"])
  with pytest.raises(train_lib.NonFiniteError):
    train_lib.train(cfg, tmp_path)
  exp = experiment_lib.build(cfg)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), cfg.checkpoint, {})
  steps = ckpt.all_steps()
  assert steps, "the run diverged before its first save: raise the learning rate's onset"
  for step in steps:
    state, _, _ = ckpt.restore(experiment_lib.abstract_target(exp), step)
    assert first_non_finite(state) is None, step
  ckpt.close()


def test_flops_are_global_and_per_device(tmp_path):
  cfg = config_lib.load(TINY)
  per_step = {}
  for n in (1, 8):
    exp = experiment_lib.build(cfg, jax.devices()[:n])
    _, shardings = experiment_lib.abstract_shardings(exp)
    target = experiment_lib.abstract_target(exp)
    batch = {"x": jax.ShapeDtypeStruct((64, 2), np.float32,
                                       sharding=jax.sharding.NamedSharding(
                                           exp.mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                               sharding=jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec()))
    compiled = train_lib.compile_step(exp, shardings, batch["x"].sharding).lower(
        target, batch, key).compile()
    per_step[n] = perf.per_device_flops(compiled)
  # cost_analysis counts one device's program: an eighth of the step's matmuls, plus the
  # work every device repeats (the optimizer on replicated parameters). Times 8 it covers
  # the whole step.
  assert per_step[8] < 0.5 * per_step[1], per_step
  assert 8 * per_step[8] >= per_step[1], per_step
  rates = perf.throughput(2.0, 1e6, 64, "float32")
  assert rates["flops_per_sec"] == pytest.approx(2.0 * 1e6 * jax.device_count())
  assert rates["flops_per_sec_per_device"] == pytest.approx(2.0 * 1e6)


@pytest.mark.parametrize("overrides, words", [
    (["mesh.tensor=2", "rules=data_parallel"], ["mesh.tensor=2", "data_parallel", "duplicate"]),
    (["mesh.tensor=2", "rules=fsdp"], ["mesh.tensor=2", "'fsdp'"]),
])
def test_a_mesh_axis_nothing_uses_is_refused(overrides, words):
  with pytest.raises(UserError) as e:
    experiment_lib.build(config_lib.load(TINY, overrides))
  for w in words:
    assert w in str(e.value), str(e.value)
  experiment_lib.build(config_lib.load(TINY, ["mesh.tensor=2", "rules=fsdp_tensor"]))


def test_per_network_optimizer_names_must_be_networks():
  with pytest.raises(UserError, match="no network 'generator'; its networks: denoiser"):
    experiment_lib.build(config_lib.load(TINY, ["optimizer={generator: {lr: 1.0e-4}}"]))
