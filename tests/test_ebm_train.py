"""The EBM through the real train loop: the same losses on 1 and 8 devices with the buffer
sharded, the buffer's layout and donation, exact resume including the buffer, resume
on 4 devices, a diverging chain named by the finiteness check, sampling from the buffer,
and several processes. The core hooks the family added are checked here too.

Every test that runs the train loop is marked slow (run them with `-m slow`): each pays
the loop's start-up and a compile of the step on 8 simulated devices, 20-90 s on 2
shared cores, and the default EBM tests must stay near a minute. By default the buffer's
layout and donation (one compiled step) and the core hooks run; test_ebm.py checks the
step's pieces and its compiled HLO."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from launch.commands import _layout_rows

from scaler import config as config_lib
from scaler import experiment as experiment_lib
from scaler import mesh as mesh_lib
from scaler import state as state_lib
from scaler.checkpoint import Checkpointer
from scaler.errors import UserError
from scaler.families import FAMILIES, langevin
from scaler.metrics import read_jsonl
from scaler.sampling import draw_samples
from scaler.train import NonFiniteError, compile_step, train
from multiprocess import run_hosts
from test_cli import scaler
from test_ebm import TINY_EBM
from toy_family import HooksConfig, HooksFamily

# Equivalence runs stop one step short of `train.steps`: the final samples and picture
# are not what they compare (the sampling test below covers them), and cost a compile.
EQ = ["train.steps=21", "train.log_every=1", "checkpoint.every=1000"]
DP = ["mesh.data=-1", "rules=data_parallel"]
FSDP = ["mesh.data=1", "mesh.fsdp=8", "rules=fsdp"]


def _losses(run_dir, key="energy/loss"):
  return np.array([r[key] for r in read_jsonl(run_dir / "metrics.jsonl")])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("one")
  train(config_lib.load(TINY_EBM, EQ + ["mesh.data=1"]), run_dir, devices=jax.devices()[:1],
        stop_at=20)
  return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [DP, FSDP], ids=["data_parallel", "fsdp"])
def test_same_losses_on_one_and_eight_devices(one_device, tmp_path, mesh):
  cfg = config_lib.load(TINY_EBM, EQ + mesh)
  exp = experiment_lib.build(cfg)
  buffer = experiment_lib.abstract_shardings(exp)[1].extra["buffer"]
  assert buffer.shard_shape((512, 2)) == (64, 2)          # the buffer is split 8 ways
  train(cfg, tmp_path, stop_at=20)
  for key in ("energy/loss", "energy/energy_pos", "energy/energy_neg"):
    ours, one = _losses(tmp_path, key), _losses(one_device, key)
    assert len(ours) == 20
    # rtol 1e-5, and atol for a contrastive loss that crosses zero (the two runs differ
    # by float rounding, ~1e-8 absolute, which is not small relative to ~0).
    np.testing.assert_allclose(ours, one, rtol=1e-5, atol=1e-6, err_msg=key)


def test_the_buffer_carries_the_layout_sharding_and_is_donated():
  cfg = config_lib.load(TINY_EBM, ["mesh.data=2", "mesh.fsdp=4", "rules=fsdp"])
  exp = experiment_lib.build(cfg)
  _, shardings = experiment_lib.abstract_shardings(exp)     # what `scaler layout` prints
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, False, exp.rules, exp.mesh, 0)
  planned, buffer = shardings.extra["buffer"], state.extra["buffer"]
  assert tuple(planned.spec) == (("data", "fsdp"), None)
  # The row `scaler layout` prints for it: path, shape, spec, bytes per device.
  abstract = experiment_lib.abstract_state(exp)
  assert _layout_rows(abstract.extra, shardings.extra, "") == [
      ("buffer", "(512, 2)", "(('data', 'fsdp'), None)", 512 * 2 * 4 // 8)]
  assert buffer.sharding.is_equivalent_to(planned, buffer.ndim)
  # No device holds more than its share, and every row is held exactly once.
  assert len(buffer.addressable_shards) == 8
  assert {s.data.shape for s in buffer.addressable_shards} == {(512 // 8, 2)}
  starts = sorted(s.index[0].start for s in buffer.addressable_shards)
  assert starts == list(range(0, 512, 64))
  # The step donates it: the old buffer's memory is reused for the new one.
  rows = mesh_lib.batch_sharding(exp.mesh)
  step = compile_step(exp, shardings, rows)
  batch = {"x": jax.device_put(np.zeros((64, 2), np.float32), rows)}
  key = jax.device_put(jax.random.key(0), mesh_lib.replicated(exp.mesh))
  new, _ = step(state, batch, key)
  assert buffer.is_deleted()
  assert new.extra["buffer"].sharding.is_equivalent_to(planned, 2)


def _restore(cfg, run_dir, devices=None):
  exp = experiment_lib.build(cfg, devices)
  ckpt = Checkpointer(str(run_dir / "checkpoints"), cfg.checkpoint, {})
  state, _, step = ckpt.restore(experiment_lib.abstract_target(exp))
  ckpt.close()
  return state, step


@pytest.mark.slow
def test_resume_is_bitwise_and_another_device_count_keeps_the_buffer(tmp_path):
  cfg = config_lib.load(TINY_EBM, ["train.steps=16", "train.log_every=4", "checkpoint.every=4",
                                   "checkpoint.keep_last=4", "train.ema_decay=0.9"])
  train(cfg, tmp_path / "straight")
  train(cfg, tmp_path / "split", stop_at=8)
  saved, _ = _restore(cfg, tmp_path / "split")
  saved = jax.device_get(saved)
  train(cfg, tmp_path / "split")
  (a, step_a), (b, step_b) = _restore(cfg, tmp_path / "straight"), _restore(cfg, tmp_path / "split")
  assert step_a == step_b == 16
  leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.extra["buffer"], saved.extra["buffer"])   # it moved after 8
  # The spectral norm's vectors are written back by the step: they moved from their init.
  exp = experiment_lib.build(cfg)
  init, _ = state_lib.create(exp.family, exp.networks, exp.txs, False, exp.rules, exp.mesh, 0)
  assert not np.allclose(init.rest["energy"]["inp"]["u"], a.rest["energy"]["inp"]["u"])

  # The step-8 checkpoint of 8 devices, read onto 4: the same rows, each device a quarter.
  four = jax.devices()[:4]
  exp4 = experiment_lib.build(cfg, four)
  ckpt = Checkpointer(str(tmp_path / "split" / "checkpoints"), cfg.checkpoint, {})
  on4, _, step = ckpt.restore(experiment_lib.abstract_target(exp4), 8)
  ckpt.close()
  assert step == 8
  buffer4 = on4.extra["buffer"]
  assert {s.data.shape for s in buffer4.addressable_shards} == {(128, 2)}
  assert {s.device for s in buffer4.addressable_shards} == set(four)
  rows = lambda x: sorted(map(tuple, np.asarray(x).tolist()))
  assert rows(buffer4) == rows(saved.extra["buffer"])      # the same multiset of examples


@pytest.mark.slow
def test_a_diverging_chain_stops_with_the_step_and_the_buffer(tmp_path, monkeypatch):
  real = langevin.langevin

  def diverging(energy, x, rng, **kw):
    out, norm = real(energy, x, rng, **kw)
    return out.at[0].set(jnp.nan), norm          # one chain of the batch blows up

  monkeypatch.setattr(langevin, "langevin", diverging)
  with pytest.raises(NonFiniteError) as e:
    train(config_lib.load(TINY_EBM), tmp_path, check_finite_every=1)
  message = str(e.value)
  assert message.startswith("non-finite values at step 1:"), message
  assert "state.extra['buffer']" in message, message


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("runs") / "tiny_ebm"
  out = scaler("train", TINY_EBM, "--debug", "--run-dir", str(run_dir))
  assert out.returncode == 0, out.stderr[-3000:]
  return run_dir


@pytest.mark.slow
def test_the_final_picture_shows_noise_and_buffer_chains(trained):
  # Three panels (held-out data, from noise, from the buffer) at 4.5 inches x 100 dpi.
  width, _ = Image.open(trained / "samples.png").size
  assert width >= 3 * 350, width
  rows = read_jsonl(trained / "metrics.jsonl")
  for key in ("energy_pos", "energy_neg", "energy_gap", "langevin_grad_norm",
              "buffer_refreshed", "loss", "grad_norm"):
    assert np.isfinite(rows[-1][f"energy/{key}"]), key
  assert 0 < np.mean([r["energy/buffer_refreshed"] for r in rows]) < 64 / 512


@pytest.mark.slow
def test_sample_from_noise_and_from_the_buffer(trained, tmp_path):
  for extra in ([], ["--from-buffer"]):
    out = scaler("sample", str(trained), "--num", "100", "--out", str(tmp_path / "s.npz"),
                 *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    samples = np.load(tmp_path / "s.npz")["samples"]
    assert samples.shape == (100, 2) and np.all(np.isfinite(samples))
    (tmp_path / "s.npz").unlink()


# --- core hooks the family uses ---------------------------------------------------------


class BufferSampler(HooksFamily):
  """Samples are the first rows of its extra state: `sample` must receive it."""

  def sample(self, nets, rng, num, extra=None, **kw):
    return extra["buffer"][:num] * (2.0 if kw.get("double") else 1.0)

  def check_batch(self, batch_size, shards):
    if shards == 8:
      raise UserError(f"refused on {shards} devices")


def test_sample_receives_the_extra_state_and_the_family_checks_the_batch(monkeypatch):
  monkeypatch.setitem(FAMILIES, "hooks", (HooksConfig, BufferSampler))
  cfg = config_lib.load(TINY_EBM, ["family={name: hooks}", "model={name: mlp_denoiser}"])
  with pytest.raises(UserError, match="refused on 8 devices"):
    experiment_lib.build(cfg)
  exp = experiment_lib.build(cfg, jax.devices()[:4])
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, False, exp.rules, exp.mesh, 0)
  got = draw_samples(exp, state, 8, double=True)
  np.testing.assert_array_equal(got, 2.0 * np.asarray(state.extra["buffer"])[:8])


# --- several processes ------------------------------------------------------------------

MP_RUN = ["train.steps=8", "train.log_every=4", "checkpoint.every=4", "train.num_samples=64"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [
    # fsdp over both processes: parameters and the buffer split across them.
    ["rules=fsdp", "mesh.data=1", "mesh.fsdp=4"],
    # fsdp across the processes, tensor inside each: the tensor rules, the buffer split in 2.
    ["rules=fsdp_tensor", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"],
], ids=["fsdp", "fsdp_tensor"])
def test_two_processes_match_one_with_the_buffer_split_across_them(tmp_path, mesh):
  run_dir = tmp_path / "two"
  argv = ["train", TINY_EBM, *MP_RUN, *mesh, "--run-dir", str(run_dir)]
  for code, out in run_hosts(argv, tmp_path=tmp_path):
    assert code == 0, out[-3000:]
  assert (run_dir / "samples.png").stat().st_size > 1000
  assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 8
  single = tmp_path / "one"
  cfg = config_lib.load(TINY_EBM, MP_RUN + mesh)
  train(cfg, single, devices=jax.devices()[:4])
  np.testing.assert_allclose(_losses(run_dir), _losses(single), rtol=1e-5, atol=1e-6)
  # The saved buffer (written by two processes, each its half) equals the one-process one.
  a, _ = _restore(cfg, run_dir, jax.devices()[:4])
  b, _ = _restore(cfg, single, jax.devices()[:4])
  np.testing.assert_allclose(a.extra["buffer"], b.extra["buffer"], rtol=1e-5, atol=1e-6)
