"""The VAE family and the VQ-VAE: the same losses on 1 and 8 devices under every preset,
the KL warm-up from the step the loss sees, the EMA codebook (its update, restarts,
sharding by role, exact resume), held-out reconstructions, `--label`, bad input, two
processes, and quality on two moons and the digits (the long runs marked slow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaler import experiment as experiment_lib
from scaler import state as state_lib
from scaler.nn.quantizer import VectorQuantizer
from scaler.train import train
from family_runs import (PRESETS, QUALITY_TIMEOUT, against_a_mixture, assert_bitwise,
                         digits_classifier, final_state, load, mesh_overrides, metric,
                         recognised, tiny, train_and_sample)
from test_cli import expect_user_error


def _cfg(name, mesh, rules, *overrides):
  return load(name, *mesh_overrides(mesh, rules), "train.log_every=1", "checkpoint.every=1000",
              *overrides)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  runs = {}
  for name in ("vae", "vqvae"):
    runs[name] = tmp_path_factory.mktemp(f"{name}_one")
    train(_cfg(name, {"data": 1, "fsdp": 1, "tensor": 1}, "data_parallel"), runs[name],
          devices=jax.devices()[:1])
  return runs


KEYS = {"vae": ("vae/loss", "vae/kl"), "vqvae": ("vqvae/loss", "vqvae/perplexity")}


@pytest.mark.parametrize("name", ["vae", "vqvae"])
@pytest.mark.parametrize("mesh, rules", PRESETS, ids=[p[1] for p in PRESETS])
def test_same_losses_on_one_and_eight_devices(one_device, tmp_path, name, mesh, rules):
  train(_cfg(name, mesh, rules), tmp_path)
  for key in KEYS[name]:
    got, expected = metric(tmp_path, key), metric(one_device[name], key)
    assert len(got) == 20
    np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=key)


def test_kl_warms_up_linearly_from_the_step_the_loss_sees(one_device):
  # tiny_vae: beta 1 over 10 steps; the loss of step s (0-based) sees s, logged as s + 1.
  beta = metric(one_device["vae"], "vae/beta")
  np.testing.assert_allclose(beta, np.minimum(np.arange(20) / 10, 1.0), rtol=1e-6)
  loss, recon, kl = (metric(one_device["vae"], k) for k in ("vae/loss", "vae/recon", "vae/kl"))
  np.testing.assert_allclose(loss, recon + beta * kl, rtol=1e-5)


# --- the codebook ---

def test_codebook_follows_the_moving_averages_and_restarts_dead_codes():
  vq = VectorQuantizer(4, 2, 1, decay=0.5, dead_below=0.3, rngs=nnx.Rngs(0))
  codes = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
  vq.codes[...], vq.sum[...], vq.count[...] = codes, codes, jnp.ones((4,))
  z = jnp.array([[0.1, 0.0], [0.9, 0.1], [1.1, -0.1], [0.0, 0.8]])[:, None, :]  # (B=4, P=1, D=2)
  zq, idx, commit, perplexity, restarted = vq(z, jax.random.key(0), update=True)
  np.testing.assert_array_equal(idx[:, 0], [0, 1, 1, 2])
  np.testing.assert_allclose(zq, codes[idx], atol=1e-6)            # straight-through value
  np.testing.assert_allclose(commit, jnp.sum((z - codes[idx]) ** 2, axis=(1, 2)), rtol=1e-6)
  usage = np.array([1, 2, 1, 0]) / 4
  assert float(perplexity) == pytest.approx(np.exp(-np.sum(usage[:3] * np.log(usage[:3]))))
  # N <- 0.5 N + 0.5 n; m <- 0.5 m + 0.5 sum z. Code 3, never used, keeps N = 0.5 >= 0.3
  # this step; the next step drops it to 0.25 < 0.3 and restarts it.
  count = 0.5 * 1 + 0.5 * np.array([1, 2, 1, 0])
  np.testing.assert_allclose(vq.count[...], count, rtol=1e-6)
  sums = 0.5 * np.asarray(codes) + 0.5 * np.array(
      [[0.1, 0.0], [2.0, 0.0], [0.0, 0.8], [0.0, 0.0]])
  np.testing.assert_allclose(vq.sum[...], sums, rtol=1e-6)
  total, eps = count.sum(), 1e-5
  np.testing.assert_allclose(vq.codes[...], sums / ((count + eps) / (total + 4 * eps) * total)[:, None],
                             rtol=1e-5)
  assert int(restarted) == 0
  _, _, _, _, restarted = vq(z, jax.random.key(1), update=True)
  assert int(restarted) == 1
  z_rows = np.asarray(z[:, 0])
  assert any(np.allclose(vq.codes[...][3], r) for r in z_rows)      # at an encoder output
  assert float(vq.count[...][3]) == 1.0
  # The prior counts each position's codes: code 3 was never used.
  assert float(vq.prior[...][0, 3]) < 0.25 * 0.25 + 1e-6


def test_codebook_is_module_state_sharded_by_its_role():
  cfg = load("vqvae", *mesh_overrides({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"))
  exp = experiment_lib.build(cfg)
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, False, exp.rules, exp.mesh, 0)
  q = state.rest["encoder"]["quantizer"]
  assert "quantizer" not in state.params["encoder"]          # no gradient, no optimizer
  for name, spec in (("codes", ("fsdp", None)), ("sum", ("fsdp", None)), ("count", ("fsdp",)),
                     ("prior", (None, "fsdp"))):
    assert tuple(q[name].sharding.spec) == spec, name
  assert q["codes"].addressable_shards[0].data.shape == (16 // 8, 8)


def test_vqvae_resume_is_bitwise_exact_and_writes_reconstructions(tmp_path):
  cfg = load("vqvae", "train.steps=8", "train.log_every=4", "checkpoint.every=4")
  train(cfg, tmp_path / "straight")
  train(cfg, tmp_path / "split", stop_at=4)
  train(cfg, tmp_path / "split")
  a, data_a, step_a = final_state(cfg, tmp_path / "straight")
  b, data_b, step_b = final_state(cfg, tmp_path / "split")
  assert step_a == step_b == 8 and data_a == data_b
  assert_bitwise(a, b)        # the codebook, its moving counts and sums, the prior
  init = jax.device_get(state_lib.create(*_create_args(cfg))[0])
  assert not np.allclose(a.rest["encoder"]["quantizer"]["codes"],
                         init.rest["encoder"]["quantizer"]["codes"])
  assert (tmp_path / "straight" / "reconstructions.png").stat().st_size > 500


def _create_args(cfg):
  exp = experiment_lib.build(cfg)
  return exp.family, exp.networks, exp.txs, False, exp.rules, exp.mesh, cfg.train.seed


# --- sampling with labels, bad input ---

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  runs = {}
  for name in ("vae", "vqvae"):
    runs[name] = tmp_path_factory.mktemp(name) / "run"
    train(load(name, "train.steps=2", "checkpoint.every=2"), runs[name])
  return runs


def test_sample_a_label(trained, tmp_path, capsys):
  from launch.cli import main
  out = tmp_path / "three.npz"
  with pytest.raises(SystemExit) as e:
    main(["sample", str(trained["vae"]), "--num", "8", "--out", str(out), "--label", "3"])
  assert e.value.code == 0
  assert np.load(out)["samples"].shape == (8, 8, 8, 1)


@pytest.mark.parametrize("run, label, words", [
    ("vae", "10", ["--label 10", "0 to 9"]),
    ("vae", "-1", ["--label -1", "0 to 9"]),
    ("vqvae", "3", ["--label 3", "unconditional"]),
])
def test_bad_label_exits_2_with_one_line(trained, tmp_path, capsys, run, label, words):
  expect_user_error(capsys, ["sample", str(trained[run]), "--num", "4", "--out",
                             str(tmp_path / "s.npz"), "--label", label], *words)
  assert not (tmp_path / "s.npz").exists()   # refused before anything is written


def test_a_label_for_a_family_that_takes_none_is_refused():
  from scaler import config as config_lib
  from scaler.errors import UserError
  from scaler.sampling import check_sample_options
  exp = experiment_lib.build(config_lib.load(tiny("flow")))
  with pytest.raises(UserError, match="--label 3: family flow does not sample by label"):
    check_sample_options(exp, experiment_lib.abstract_target(exp), label=3)
  # Diffusion samples by label when class-conditional; an unconditional run says so.
  exp = experiment_lib.build(config_lib.load(tiny("diffusion")))
  with pytest.raises(UserError, match="--label and --guidance need a class-conditional run"):
    check_sample_options(exp, experiment_lib.abstract_target(exp), label=3)


@pytest.mark.parametrize("name, overrides, words", [
    ("vae", ["family.beta=-0.5"], ["'family.beta'=-0.5", "at least 0"]),
    ("vqvae", ["family.codebook_size=1"], ["'family.codebook_size'=1", "at least 2"]),
    ("vae", ["family.likelihood=bernoulli", "data={source: two_moons}",
             "model={name: mlp_vae}", "family.conditional=false"], ["bernoulli", "vectors"]),
    ("vae", ["model={name: dcgan}"], ["family vae", "mlp_vae or conv_vae"]),
    ("vae", ["family.likelihood={name: gaussian, sigma: 0}"], ["sigma", "learned or positive"]),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, name, overrides, words):
  expect_user_error(capsys, ["train", tiny(name), *overrides, "--run-dir",
                             str(tmp_path / "r")], *words)
  assert not (tmp_path / "r").exists()


def test_a_conditional_vae_needs_labelled_data(capsys, tmp_path):
  points = tmp_path / "points.npy"
  np.save(points, np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32))
  expect_user_error(capsys, ["train", tiny("vae"), f"data={{source: npy, path: {points}}}",
                             "model={name: mlp_vae}", "family.likelihood=gaussian",
                             "--run-dir", str(tmp_path / "r")],
                    "family.conditional=true", "no labels")


# --- two processes ---

@pytest.mark.slow
@pytest.mark.parametrize("name", ["vae", "vqvae"])
def test_two_processes_under_fsdp_and_tensor_rules(tmp_path, name):
  from multiprocess import run_hosts
  run = ["train.steps=6", "train.log_every=2", "checkpoint.every=3", "train.num_samples=16",
         *mesh_overrides({"data": 1, "fsdp": 2, "tensor": 2}, "fsdp_tensor")]
  outs = run_hosts(["train", tiny(name), *run, "--run-dir", str(tmp_path / "two")],
                   tmp_path=tmp_path, timeout=600)
  for code, out in outs:
    assert code == 0, out[-3000:]
  for picture in ("samples.png", "reconstructions.png"):
    assert (tmp_path / "two" / picture).stat().st_size > 500
  train(load(name, *run), tmp_path / "one", devices=jax.devices()[:4])
  for key in KEYS[name]:
    np.testing.assert_allclose(metric(tmp_path / "two", key), metric(tmp_path / "one", key),
                               rtol=1e-5, err_msg=key)


# --- quality: short checks on the tiny runs, the shipped configs marked slow ---

def test_tiny_runs_learn(one_device):
  elbo = metric(one_device["vae"], "vae/elbo")
  assert elbo[-5:].mean() > elbo[:5].mean() + 5, elbo       # nats per digit
  mse = metric(one_device["vqvae"], "vqvae/mse")
  assert mse[-5:].mean() < 0.7 * mse[:5].mean(), mse
  assert metric(one_device["vqvae"], "vqvae/perplexity")[-1] > 16 / 4


@pytest.mark.slow
@pytest.mark.timeout(QUALITY_TIMEOUT)
def test_vae_on_moons_beats_a_mixture(tmp_path):
  samples, final = train_and_sample("vae_moons.yaml", tmp_path / "m")
  ours, baseline = against_a_mixture(samples, "two_moons")
  print(f"sliced W1 to held-out: VAE {ours:.4f}, GMM(8) {baseline:.4f}; final {final}")
  assert ours < baseline, (ours, baseline)


@pytest.mark.slow
@pytest.mark.timeout(QUALITY_TIMEOUT)
def test_vae_digits_are_recognised(tmp_path):
  samples, final = train_and_sample("vae_digits.yaml", tmp_path / "d", 1000)
  confidence, entropy = recognised(digits_classifier(), samples)
  print(f"VAE digits: confidence {confidence:.3f}, class entropy {entropy:.3f} of log 10; "
        f"final {final}")
  assert confidence >= 0.85 and entropy >= 0.9, (confidence, entropy)


VQ_MSE_BOUND = 0.05   # per pixel, model space [-1, 1]; the digits' own variance is ~0.5


@pytest.mark.slow
@pytest.mark.timeout(QUALITY_TIMEOUT)
def test_vqvae_reconstructs_held_out_digits(tmp_path):
  from scaler.data import load_source
  from scaler.evaluate import evaluate
  from scaler import config as config_lib
  _, final = train_and_sample("vqvae_digits.yaml", tmp_path / "q", 64)
  cfg = config_lib.load(tmp_path / "q" / "config.yaml")
  state, _, _ = final_state(cfg, tmp_path / "q")
  exp = experiment_lib.build(cfg)
  test = load_source(cfg.data, "test", spec=exp.spec)
  mse = evaluate(exp, state, test)["mse"]
  test_x = test.rows(np.arange(len(test)))["x"]
  codes = jax.jit(lambda p, r: exp.family.encode(state_lib.merge(exp.networks, p, r), test_x))(
      state.params, state.rest)
  usage = np.bincount(np.asarray(codes).ravel(), minlength=64) / codes.size
  perplexity = float(np.exp(-np.sum(usage[usage > 0] * np.log(usage[usage > 0]))))
  print(f"VQ-VAE held-out: mse {mse:.4f} (bound {VQ_MSE_BOUND}), code perplexity "
        f"{perplexity:.1f} of 64; final {final}")
  assert mse < VQ_MSE_BOUND, mse
  assert perplexity > 64 / 2, perplexity
  assert (tmp_path / "q" / "reconstructions.png").stat().st_size > 1000
