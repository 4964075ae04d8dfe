"""The pure train step: micro-batches, several networks in order, extra state, EMA."""

import jax
import numpy as np
import pytest

from scaler import mesh as mesh_lib
from scaler import optim
from scaler import partitioning
from scaler import state as state_lib
from scaler.config import MeshConfig, Named
from scaler.step import make_train_step
from toy_family import DenoiseFamily, TwoNetFamily


def _run(family, micro_batches=1, ema_decay=0.0, steps=5, mesh_cfg=MeshConfig(),
         rules="data_parallel"):
  mesh = mesh_lib.make_mesh(mesh_cfg)
  nets = state_lib.describe(family)
  ocfg = Named("adamw", optim.AdamWConfig(lr=1e-2, schedule=Named("constant", optim.ConstantSchedule())))
  names = sorted(nets.graphdefs)
  txs = {n: optim.optimizer(ocfg, max(steps, 1)) for n in names}
  scheds = {n: optim.schedule(ocfg, max(steps, 1)) for n in names}
  state, shardings = state_lib.create(family, nets, txs, ema_decay > 0,
                                      partitioning.resolve_rules(rules), mesh, seed=0)
  step = jax.jit(make_train_step(family, nets, txs, scheds, ema_decay, micro_batches),
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh), None),
                 out_shardings=(shardings, None), donate_argnums=0)
  x = np.random.default_rng(0).normal(size=(32, 2)).astype(np.float32)
  history = []
  for i in range(steps):
    state, metrics = step(state, {"x": x}, jax.random.key(i))
    history.append(jax.device_get(metrics))
  return state, history


def test_micro_batches_match_the_full_batch():
  full, _ = _run(DenoiseFamily(noisy=False), micro_batches=1)
  accum, _ = _run(DenoiseFamily(noisy=False), micro_batches=4)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_updates_run_in_order_with_extra_state():
  state, history = _run(TwoNetFamily(), steps=3)
  assert int(state.extra["count"]) == 3
  # The generator's update sees the count the discriminator's update just wrote.
  assert [float(m["g/d_calls"]) for m in history] == [1.0, 2.0, 3.0]
  assert {"d/loss", "g/loss", "d/grad_norm", "g/grad_norm", "lr/d", "lr/g"} <= set(history[0])
  init, _ = _run(TwoNetFamily(), steps=0)
  for net in ("d", "g"):
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(init.params[net]),
                                                   jax.tree.leaves(state.params[net]))]
    assert any(moved), f"network {net} was not updated"


def test_ema_follows_the_parameters():
  state, _ = _run(DenoiseFamily(), ema_decay=0.5, steps=4)
  init, _ = _run(DenoiseFamily(), ema_decay=0.5, steps=0)
  p, e, p0 = (jax.tree.leaves(t["net"]) for t in (state.params, state.ema, init.params))
  assert any(not np.allclose(a, b) for a, b in zip(e, p0))
  assert any(not np.allclose(a, b) for a, b in zip(e, p))


def test_ema_warms_up_instead_of_keeping_the_init():
  # Step 0 uses decay min(0.999, 1/10): the EMA is already 90% the trained parameters.
  state, _ = _run(DenoiseFamily(), ema_decay=0.999, steps=1)
  init, _ = _run(DenoiseFamily(), ema_decay=0.999, steps=0)
  for e, p, p0 in zip(*(jax.tree.leaves(t["net"]) for t in
                        (state.ema, state.params, init.params))):
    np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mesh_cfg, rules", [
    (MeshConfig(data=1, fsdp=8), "fsdp"),
    (MeshConfig(data=1, fsdp=4, tensor=2), "fsdp_tensor"),
])
def test_state_carries_the_rule_shardings(mesh_cfg, rules):
  state, _ = _run(DenoiseFamily(), steps=1, mesh_cfg=mesh_cfg, rules=rules)
  kernel = state.params["net"]["b"]["kernel"]
  expected = ("fsdp", None) if rules == "fsdp" else ("fsdp", "tensor")
  assert tuple(kernel.sharding.spec) == expected
  mu = state.opt_state["net"][0].mu["b"]["kernel"]  # adam's first moment follows it
  assert tuple(mu.sharding.spec) == expected
  assert kernel.addressable_shards[0].data.shape == kernel.sharding.shard_shape(kernel.shape)
