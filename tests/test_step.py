"""The pure train step: micro-batches, several networks in order, extra state, EMA,
written-back module state, repeated updates, the step and labels reaching the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaler import mesh as mesh_lib
from scaler import optim
from scaler import partitioning
from scaler import state as state_lib
from scaler.config import MeshConfig, Named
from scaler.step import make_train_step
from scaler.families.base import LossOut, Update
from toy_family import DenoiseFamily, NormFamily, TwoNetFamily


def _run(family, micro_batches=1, ema_decay=0.0, steps=5, mesh_cfg=MeshConfig(),
         rules="data_parallel", devices=None, labels=False, lr=1e-2):
  mesh = mesh_lib.make_mesh(mesh_cfg, devices)
  nets = state_lib.describe(family)
  ocfg = Named("adamw", optim.AdamWConfig(lr=lr, schedule=Named("constant",
                                                                 optim.ConstantSchedule())))
  names = sorted(nets.graphdefs)
  txs = {n: optim.optimizer(ocfg, max(steps, 1)) for n in names}
  scheds = {n: optim.schedule(ocfg, max(steps, 1)) for n in names}
  state, shardings = state_lib.create(family, nets, txs, ema_decay > 0,
                                      partitioning.resolve_rules(rules), mesh, seed=0)
  step = jax.jit(make_train_step(family, nets, txs, scheds, ema_decay, micro_batches),
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh), None),
                 out_shardings=(shardings, None), donate_argnums=0)
  x = np.random.default_rng(0).normal(size=(32, 2)).astype(np.float32)
  batch = {"x": x, "label": np.arange(32, dtype=np.int32) % 4} if labels else {"x": x}
  history = []
  for i in range(steps):
    state, metrics = step(state, batch, jax.random.key(i))
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


def test_module_state_is_written_back_and_identical_on_one_and_eight_devices():
  init, _ = _run(NormFamily(), steps=0)
  one, hist_one = _run(NormFamily(), steps=3, devices=jax.devices()[:1])
  eight, hist_eight = _run(NormFamily(), steps=3)
  bn0, bn = init.rest["net"]["bn"], one.rest["net"]["bn"]
  # BatchNorm's running statistics move away from their initial values (0 and 1) ...
  assert not np.allclose(bn["mean"], bn0["mean"]) and not np.allclose(bn["var"], bn0["var"])
  # ... and the Dropout's RNG count advances, so each step draws a new mask.
  assert int(one.rest["net"]["drop"]["rngs"]["count"]) > int(init.rest["net"]["drop"]["rngs"]["count"])
  codes = [float(m["net/mask_code"]) for m in hist_one]
  assert len(set(codes)) == 3, codes
  assert codes == [float(m["net/mask_code"]) for m in hist_eight]
  for a, b in zip(jax.tree.leaves((one.params, one.rest)), jax.tree.leaves((eight.params, eight.rest))):
    if jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_running_statistics_are_sharded_by_their_role():
  state, _ = _run(NormFamily(), steps=1, mesh_cfg=MeshConfig(data=1, fsdp=8), rules="fsdp")
  mean = state.rest["net"]["bn"]["mean"]
  assert tuple(mean.sharding.spec) == ("fsdp",)
  assert mean.addressable_shards[0].data.shape == (64 // 8,)


class SampledGFamily(TwoNetFamily):
  @property
  def sampled_networks(self):
    return ("g",)


def test_ema_covers_only_the_sampled_networks():
  state, _ = _run(SampledGFamily(), ema_decay=0.9, steps=2)
  assert set(state.ema) == {"g"}
  state, _ = _run(TwoNetFamily(), ema_decay=0.9, steps=1)
  assert set(state.ema) == {"d", "g"}


class RepeatFamily(DenoiseFamily):
  """The critic update of a WGAN in miniature: `repeat` updates on slices of the batch."""

  def __init__(self, repeat):
    super().__init__(noisy=False)
    self.repeat = repeat

  @property
  def updates(self):
    return (Update("net", ("net",), self.loss, repeat=self.repeat),)

  def loss(self, nets, extra, batch, rng, step):
    out = super().loss(nets, extra, batch, rng, step)
    return LossOut(out.loss, {"rows": jnp.asarray(batch["x"].shape[0], jnp.float32),
                              "step": step.astype(jnp.float32)})


@pytest.mark.parametrize("repeat", [2, 4])
def test_repeat_slices_the_batch_and_counts_every_update(repeat):
  state, history = _run(RepeatFamily(repeat), steps=2)
  assert int(state.counts["net"]) == 2 * repeat
  assert [float(m["net/rows"]) for m in history] == [32 / repeat] * 2
  assert int(state.opt_state["net"][0].count) == 2 * repeat   # adam's own count agrees


def test_the_loss_sees_the_global_step():
  _, history = _run(RepeatFamily(2), steps=3)
  assert [float(m["net/step"]) for m in history] == [0.0, 1.0, 2.0]


class LabelFamily(DenoiseFamily):
  def loss(self, nets, extra, batch, rng, step):
    out = super().loss(nets, extra, batch, rng, step)
    return LossOut(out.loss, {"label_sum": jnp.sum(batch["label"]).astype(jnp.float32)})


def test_labels_reach_the_loss():
  _, history = _run(LabelFamily(), steps=1, labels=True)
  assert float(history[0]["net/label_sum"]) == float(np.sum(np.arange(32) % 4))


class InfExtraFamily(DenoiseFamily):
  """A finite loss and gradient, but the state it leaves holds an Inf."""

  def init_extra(self, rng):
    return {"v": jnp.zeros(())}

  def loss(self, nets, extra, batch, rng, step):
    out = super().loss(nets, extra, batch, rng, step)
    return LossOut(out.loss, {}, {"v": extra["v"] + jnp.inf})


def test_finite_flag_covers_the_new_state_not_only_loss_and_gradients():
  _, history = _run(InfExtraFamily(), steps=1)
  assert np.isfinite(history[0]["net/loss"]) and np.isfinite(history[0]["net/grad_norm"])
  assert not bool(history[0]["finite"])  # a save must not commit this state
