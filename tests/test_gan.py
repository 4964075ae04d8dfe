"""The GAN family: the gradient penalty in closed form, the same losses on 1 and 8
devices under every preset, exact resume (both optimizers, the EMA, the critic's update
count), resume on another topology, the critic's own schedule, bad input, two processes,
and sample quality on eight gaussians and the digits (the long runs marked slow)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaler.errors import UserError
from scaler.families.gan import gradient_penalty
from scaler import experiment as experiment_lib
from scaler import partitioning
from scaler.mesh import batch_sharding
from scaler.train import compile_step, train
from family_runs import (PRESETS, QUALITY_TIMEOUT, against_a_mixture, assert_bitwise,
                         digits_classifier, final_state, load, mesh_overrides, metric,
                         recognised, tiny, train_and_sample)
from test_cli import expect_user_error


# --- the gradient penalty ---

def test_gradient_penalty_of_a_linear_critic_is_closed_form():
  # D(x) = w.x + b has input gradient w everywhere: the penalty is (|w| - 1)^2 whatever
  # the interpolates, and its gradient in w is 2 (|w| - 1) w / |w| (a gradient of a
  # gradient, as the step takes it).
  w = jnp.array([0.6, -1.2, 2.0])
  real, fake = jax.random.normal(jax.random.key(0), (2, 16, 3))

  def penalty(w):
    return gradient_penalty(lambda x: x @ w + 0.3, real, fake, jax.random.key(1))

  norm = float(jnp.linalg.norm(w))
  assert float(penalty(w)) == pytest.approx((norm - 1) ** 2, rel=1e-5)
  np.testing.assert_allclose(jax.grad(penalty)(w), 2 * (norm - 1) * w / norm, rtol=1e-5)


def test_gradient_penalty_is_taken_at_the_interpolates():
  # D(x) = |x|^2 / 2 has gradient x: the penalty is the mean of (|x^| - 1)^2 at
  # x^ = e x + (1 - e) G(z), one e ~ U[0, 1] per example (images: per image).
  real, fake = jax.random.normal(jax.random.key(0), (2, 8, 4, 4, 1))
  rng = jax.random.key(3)
  got = gradient_penalty(lambda x: 0.5 * jnp.sum(x ** 2, axis=(1, 2, 3)), real, fake, rng)
  eps = jax.random.uniform(rng, (8, 1, 1, 1))
  x_hat = (eps * real + (1 - eps) * fake).reshape(8, -1)
  expected = jnp.mean((jnp.linalg.norm(x_hat, axis=1) - 1) ** 2)
  assert float(got) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("loss", ["non_saturating", "hinge", "wgan_gp"])
def test_each_loss_is_its_formula(loss):
  # Stand-in networks with known outputs: G(z) = 0.5 z[:, :1] (a constant-free map), D(x)
  # the mean of x. Each loss must be the formula in scaler/families/gan.py's docstring.
  exp = experiment_lib.build(load("gan", f"family.loss={loss}", "model={name: mlp_gan}",
                                  "data={source: eight_gaussians}",
                                  "family.conditional=false"))
  fam = exp.family
  nets = {"generator": lambda z, label: 0.5 * z[:, :2],
          "discriminator": lambda x, label: jnp.mean(x.reshape(x.shape[0], -1), axis=1)}
  x = jax.random.normal(jax.random.key(0), (16, 2)) + 1.0
  rng = jax.random.key(1)
  d = fam.d_loss(nets, None, {"x": x}, rng, jnp.int32(0))
  g = fam.g_loss(nets, None, {"x": x}, rng, jnp.int32(0))
  z = jax.random.normal(jax.random.split(rng)[0], (16, fam.cfg.latent_dim))
  d_real, d_fake = jnp.mean(x, axis=1), jnp.mean(0.5 * z[:, :2], axis=1)
  d_fake_g = jnp.mean(0.5 * jax.random.normal(rng, (16, fam.cfg.latent_dim))[:, :2], axis=1)
  expected_d, expected_g = {
      "non_saturating": (jax.nn.softplus(-d_real) + jax.nn.softplus(d_fake),
                         jax.nn.softplus(-d_fake_g)),
      "hinge": (jax.nn.relu(1 - d_real) + jax.nn.relu(1 + d_fake), -d_fake_g),
      # D is linear with input gradient 1/2 everywhere: |grad| = sqrt(2)/2.
      "wgan_gp": (d_fake - d_real + 10.0 * (np.sqrt(2) / 2 - 1) ** 2, -d_fake_g),
  }[loss]
  assert float(d.loss) == pytest.approx(float(jnp.mean(expected_d)), rel=1e-5)
  assert float(g.loss) == pytest.approx(float(jnp.mean(expected_g)), rel=1e-5)
  assert float(d.metrics["real"]) == pytest.approx(float(jnp.mean(d_real)), rel=1e-5)
  if loss == "wgan_gp":
    assert float(d.metrics["wasserstein"]) == pytest.approx(
        float(jnp.mean(d_real) - jnp.mean(d_fake)), rel=1e-5)


# --- sharding, resume, schedules ---

def _cfg(mesh, rules, *overrides):
  return load("gan", *mesh_overrides(mesh, rules), "train.log_every=1",
              "checkpoint.every=1000", *overrides)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("gan_one")
  train(_cfg({"data": 1, "fsdp": 1, "tensor": 1}, "data_parallel"), run_dir,
        devices=jax.devices()[:1])
  return run_dir


@pytest.mark.parametrize("mesh, rules", PRESETS, ids=[p[1] for p in PRESETS])
def test_same_losses_on_one_and_eight_devices(one_device, tmp_path, mesh, rules):
  train(_cfg(mesh, rules), tmp_path)
  for key in ("discriminator/loss", "generator/loss", "discriminator/gp"):
    got, expected = metric(tmp_path, key), metric(one_device, key)
    assert len(got) == 20
    np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=key)


def test_stop_and_resume_is_bitwise_exact(tmp_path):
  cfg = load("gan", "train.steps=8", "train.log_every=4", "checkpoint.every=4")
  train(cfg, tmp_path / "straight")
  train(cfg, tmp_path / "split", stop_at=4)
  train(cfg, tmp_path / "split")
  a, data_a, step_a = final_state(cfg, tmp_path / "straight")
  b, data_b, step_b = final_state(cfg, tmp_path / "split")
  assert step_a == step_b == 8 and data_a == data_b
  assert_bitwise(a, b)   # both optimizers, the EMA, BatchNorm statistics, the counts
  assert set(a.ema) == {"generator"}
  # The critic's schedule counts its own updates: n_critic = 2 per step.
  assert int(a.counts["discriminator"]) == 16 and int(a.counts["generator"]) == 8


def test_resume_on_another_topology(tmp_path):
  # 8 devices data-parallel, stop, resume on 4 devices fsdp=2 x tensor=2: the same losses
  # as 8 devices straight through (each array is read into the new mesh's sharding).
  # This mesh once drifted without any resume: XLA split the generator's convs over their
  # windows and miscounted a reduction (tests/test_pairs.py, the generated batch).
  eight = ["train.steps=8", "train.log_every=1", "checkpoint.every=4"]
  cfg8 = load("gan", *eight)
  train(cfg8, tmp_path / "straight")
  train(cfg8, tmp_path / "moved", stop_at=4)
  cfg4 = load("gan", *eight, *mesh_overrides({"data": 1, "fsdp": 2, "tensor": 2},
                                             "fsdp_tensor"))
  train(cfg4, tmp_path / "moved", devices=jax.devices()[:4])
  for key in ("discriminator/loss", "generator/loss"):
    np.testing.assert_allclose(metric(tmp_path / "moved", key),
                               metric(tmp_path / "straight", key), rtol=1e-5, err_msg=key)
  moved, _, _ = final_state(cfg4, tmp_path / "moved", jax.devices()[:4])
  assert int(moved.counts["discriminator"]) == 16


def test_the_step_is_traced_under_the_rules():
  # The conv networks pin their feature maps by role (tests/test_pairs.py); that needs
  # the step traced under the run's mesh and rules, or every pin is a no-op and XLA's
  # propagation picks the split that miscounted on fsdp=2 x tensor=2. Traced, not run.
  cfg = load("gan", *mesh_overrides({"data": 1, "fsdp": 2, "tensor": 2}, "fsdp_tensor"))
  exp = experiment_lib.build(cfg, jax.devices()[:4])
  seen = []
  for name in ("d_loss", "g_loss"):
    def spy(*args, _loss=getattr(exp.family, name), **kw):
      seen.append(partitioning._ACTIVATION_RULES.get())
      return _loss(*args, **kw)
    setattr(exp.family, name, spy)
  abstract, shardings = experiment_lib.abstract_shardings(exp)
  batch = {"x": jax.ShapeDtypeStruct((64, *exp.spec.shape), jnp.float32),
           "label": jax.ShapeDtypeStruct((64,), jnp.int32)}
  key = jax.eval_shape(lambda: jax.random.key(0))
  compile_step(exp, shardings, batch_sharding(exp.mesh)).trace(abstract, batch, key)
  assert len(seen) == 2 and all(s == (exp.mesh, exp.rules) for s in seen)


def test_the_critic_schedule_spans_its_own_updates():
  # 20 steps x n_critic 2 = 40 critic updates: its linear decay (4 warm-up updates, then
  # 36 down to 0) is not over after 20 of them. Before, every schedule spanned train.steps,
  # so the critic's rate was 0 for the second half of the run.
  exp = experiment_lib.build(load("gan"))
  sched = exp.schedules["discriminator"]
  assert float(sched(4)) == pytest.approx(2e-3)
  assert float(sched(20)) == pytest.approx(2e-3 * 20 / 36, rel=1e-5)
  assert float(sched(39)) == pytest.approx(2e-3 / 36, rel=1e-4)


# --- bad input ---

@pytest.mark.parametrize("overrides, words", [
    (["family.n_critic=0"], ["'family.n_critic'=0", "at least 1"]),
    (["optimizer={critic: {lr: 1.0e-4}}"], ["no network 'critic'", "discriminator, generator"]),
    (["model.discriminator_norm=batch"], ["discriminator_norm=batch", "wgan_gp"]),
    (["model={name: conv_vae}"], ["family gan", "mlp_gan or dcgan"]),
    (["family.loss.gp_weight=-1"], ["'family.loss.gp_weight'=-1.0", "at least 0"]),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, overrides, words):
  expect_user_error(capsys, ["train", tiny("gan"), *overrides, "--run-dir", str(tmp_path / "r")],
                    *words)
  assert not (tmp_path / "r").exists()


def test_a_conditional_gan_needs_labelled_data(capsys, tmp_path):
  points = tmp_path / "points.npy"
  np.save(points, np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32))
  expect_user_error(capsys, ["train", tiny("gan"), f"data={{source: npy, path: {points}}}",
                             "model={name: mlp_gan}", "--run-dir", str(tmp_path / "r")],
                    "family.conditional=true", "no labels")


def test_the_generator_is_what_samples_and_labels_pick_classes(tmp_path):
  cfg = load("gan", "train.steps=2", "checkpoint.every=2")
  train(cfg, tmp_path)
  state, _, _ = final_state(cfg, tmp_path)
  exp = experiment_lib.build(cfg)
  with pytest.raises(UserError, match="--label 10: out of range"):
    _draw(exp, state, label=10)
  x = _draw(exp, state, label=3)
  assert x.shape == (8, 8, 8, 1) and np.all(np.abs(x) <= 1)   # tanh: model space [-1, 1]


def _draw(exp, state, **kw):
  from scaler.sampling import draw_samples
  return draw_samples(exp, state, 8, **kw)


# --- two processes ---

@pytest.mark.slow
def test_two_processes_under_fsdp_and_tensor_rules(tmp_path):
  from multiprocess import run_hosts
  run = ["train.steps=6", "train.log_every=2", "checkpoint.every=3", "train.num_samples=16",
         *mesh_overrides({"data": 1, "fsdp": 2, "tensor": 2}, "fsdp_tensor")]
  outs = run_hosts(["train", tiny("gan"), *run, "--run-dir", str(tmp_path / "two")],
                   tmp_path=tmp_path)
  for code, out in outs:
    assert code == 0, out[-3000:]
  assert (tmp_path / "two" / "samples.png").stat().st_size > 500
  train(load("gan", *run), tmp_path / "one", devices=jax.devices()[:4])
  for key in ("discriminator/loss", "generator/loss"):
    np.testing.assert_allclose(metric(tmp_path / "two", key), metric(tmp_path / "one", key),
                               rtol=1e-5, err_msg=key)


# --- quality, trained as shipped ---

CENTRES = 2.0 * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1)


@pytest.mark.slow
@pytest.mark.timeout(QUALITY_TIMEOUT)
def test_gan_covers_all_eight_gaussians_and_beats_a_mixture(tmp_path):
  samples, final = train_and_sample("gan_eight_gaussians.yaml", tmp_path / "g")
  dist = np.linalg.norm(samples[:, None] - CENTRES[None], axis=-1)
  shares = np.bincount(dist.argmin(axis=1), minlength=8) / len(samples)
  far = float(np.mean(dist.min(axis=1) > 0.5))   # 5 sigma of a mode (noise 0.1)
  ours, baseline = against_a_mixture(samples, "eight_gaussians")
  print(f"mode shares {np.round(shares, 3)}, far {far:.3f}; sliced W1 to held-out: "
        f"GAN {ours:.4f}, GMM(8) {baseline:.4f}; final {final}")
  assert shares.min() >= 0.05, shares
  assert far < 0.10, far
  assert ours < baseline, (ours, baseline)


@pytest.mark.slow
@pytest.mark.timeout(QUALITY_TIMEOUT)
def test_wgan_gp_digits_are_recognised(tmp_path):
  samples, final = train_and_sample("wgan_gp_digits.yaml", tmp_path / "w", 1000)
  confidence, entropy = recognised(digits_classifier(), samples)
  print(f"WGAN-GP digits: confidence {confidence:.3f}, class entropy {entropy:.3f} of log 10; "
        f"final {final}")
  assert confidence >= 0.85 and entropy >= 0.9, (confidence, entropy)
