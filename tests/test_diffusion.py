"""Diffusion: schedules, the forward process, both networks, training and both samplers.

Sampling is checked against an exact denoiser: for Gaussian data x_0 ~ N(mu, s^2) the
noisy x_t = sqrt(a) x_0 + sqrt(1 - a) eps (a = abar_t) is Gaussian too, with mean
sqrt(a) mu and variance a s^2 + 1 - a, and the best noise prediction is the regression
    E[eps | x_t] = Cov(eps, x_t) / Var(x_t) (x_t - sqrt(a) mu)
                 = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a).
A correct sampler driven by it must return N(mu, s^2).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from scaler import config as config_lib
from scaler import mesh as mesh_lib
from scaler import partitioning
from scaler.errors import UserError
from scaler.families import FAMILIES, schedules
from scaler.config import Named
from scaler.data import DataSpec
from scaler.families.diffusion import (AncestralConfig, DDIMConfig, DiffusionConfig,
                                       DiffusionFamily, ddim_timesteps, q_sample)
from scaler.nn.layers import FLOAT32
from scaler.nn.mlp import MLPDenoiser, MLPDenoiserConfig
from scaler.nn.registry import NETWORKS
from scaler.nn.unet import UNet, UNetConfig

ALLOWED_ROLES = {"embed", "mlp", "heads", "conv_in", "conv_out", "vocab", "time", None}
TINY_MLP = MLPDenoiserConfig(hidden=64, depth=2, time_dim=32)
TINY_UNET = UNetConfig(base=16, mults=(1, 2), groups=8, time_dim=32)


def gaussian_oracle(schedule, mu, sigma):
  """The exact eps-prediction for data N(mu, sigma^2) (see the module docstring)."""
  def eps(x, t_B):
    a = schedule.alphas_cumprod[t_B].reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * sigma ** 2 + 1 - a)
  return eps


def spec(data_shape):
  return DataSpec(tuple(data_shape), "image" if len(data_shape) == 3 else "vector", 0.0, 1.0)


def family(data_shape=(2,), net=(MLPDenoiserConfig, MLPDenoiser), net_cfg=TINY_MLP,
           sampler="ddim", sample_steps=100, eta=0.0, **cfg):
  sampler = (Named("ddim", DDIMConfig(steps=sample_steps, eta=eta)) if sampler == "ddim"
             else Named("ancestral", AncestralConfig()))
  return DiffusionFamily(DiffusionConfig(sampler=sampler, **cfg), net[1], net_cfg,
                         spec(data_shape), FLOAT32)


# --- schedules -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1000, 100])
def test_schedule_is_monotone_from_data_to_noise(name, steps):
  s = schedules.make(name, steps)
  abar = np.asarray(s.alphas_cumprod, np.float64)
  assert abar.shape == (steps,) and s.betas.dtype == jnp.float32
  assert np.all(np.diff(abar) < 0), "abar_t must fall strictly: every step adds noise"
  assert abar[0] > 0.98 and 0 < abar[-1] < 1e-4, (abar[0], abar[-1])
  assert np.all(np.asarray(s.betas) > 0) and np.all(np.asarray(s.betas) <= 0.999)
  np.testing.assert_allclose(np.asarray(s.sqrt_alphas_cumprod) ** 2 +
                             np.asarray(s.sqrt_one_minus_alphas_cumprod) ** 2, 1.0, rtol=1e-6)


def test_cosine_follows_its_formula_and_clips_the_last_beta():
  s = schedules.make("cosine", 1000)
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  for t in (0, 10, 500, 990):
    np.testing.assert_allclose(float(s.alphas_cumprod[t]), f((t + 1) / 1000) / f(0), rtol=1e-4)
  assert float(s.betas[-1]) == pytest.approx(0.999)  # 1 - abar_T / abar_{T-1} = 1, clipped
  assert float(s.alphas_cumprod[0]) > 0.9999


def test_linear_betas_run_from_1e4_to_002_at_1000_steps():
  s = schedules.make("linear", 1000)
  np.testing.assert_allclose([float(s.betas[0]), float(s.betas[-1])], [1e-4, 0.02], rtol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_matches_the_ddpm_formulas(name):
  s = schedules.make(name, 200)
  betas = np.asarray(s.betas, np.float64)
  abar = np.cumprod(1 - betas)
  for t in (1, 2, 57, 199):
    var = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
    np.testing.assert_allclose(float(s.posterior_variance[t]), var, rtol=1e-4)
    np.testing.assert_allclose(float(s.posterior_mean_coef1[t]),
                               betas[t] * math.sqrt(abar[t - 1]) / (1 - abar[t]), rtol=1e-4)
    np.testing.assert_allclose(float(s.posterior_mean_coef2[t]),
                               (1 - abar[t - 1]) * math.sqrt(1 - betas[t]) / (1 - abar[t]),
                               rtol=1e-4)
  assert float(s.posterior_variance[0]) == 0.0  # x_0 is known given x_1 and x_0
  np.testing.assert_allclose(float(s.posterior_log_variance_clipped[0]),
                             math.log(float(s.posterior_variance[1])), rtol=1e-5)
  # beta~_t lies between 0 and beta_t: the posterior is narrower than the forward step.
  assert np.all(np.asarray(s.posterior_variance) <= betas + 1e-7)


def test_q_sample_has_the_forward_marginal():
  s = schedules.make("cosine", 1000)
  n, x0 = 20_000, 0.7
  for t in (0, 300, 700, 999):
    t_B = jnp.full((n,), t)
    x_t = q_sample(s, jnp.full((n, 1), x0), t_B, jax.random.normal(jax.random.key(t), (n, 1)))
    a = float(s.alphas_cumprod[t])
    np.testing.assert_allclose(float(x_t.mean()), math.sqrt(a) * x0, atol=0.03)
    np.testing.assert_allclose(float(x_t.std()), math.sqrt(1 - a), rtol=0.03, atol=1e-4)


# --- networks --------------------------------------------------------------------------


NET_CASES = [
    ("mlp_denoiser", MLPDenoiserConfig(), (2,)),
    ("mlp_denoiser", TINY_MLP, (8, 8, 1)),
    ("unet", UNetConfig(), (8, 8, 1)),
    ("unet", UNetConfig(base=16, mults=(1, 2, 2), num_res_blocks=2), (16, 16, 3)),
]


@pytest.mark.parametrize("name, cfg, shape", NET_CASES)
def test_every_parameter_names_a_role_per_dimension(name, cfg, shape):
  model = nnx.eval_shape(lambda: NETWORKS[name][1](cfg, shape, precision=FLOAT32, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
  values = nnx.to_pure_dict(params)
  flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  flat_values = jax.tree.leaves(values)
  assert len(flat_specs) == len(flat_values) > 0
  for (path, spec), value in zip(flat_specs, flat_values):
    where = partitioning.path_str(path)
    assert len(spec) == value.ndim, f"{where} {value.shape} has roles {spec}"
    assert set(spec) <= ALLOWED_ROLES, f"{where}: {spec}"
    if value.ndim >= 2:
      assert any(r is not None for r in spec), f"{where}: a kernel with no role"
  # Every preset fits a 2 x 4 (fsdp x tensor) mesh: the roles divide where they shard.
  mesh = mesh_lib.make_mesh(config_lib.MeshConfig(data=1, fsdp=2, tensor=4))
  for preset in partitioning.PRESETS:
    partitioning.param_shardings(values, specs, partitioning.resolve_rules(preset), mesh)


@pytest.mark.parametrize("name, cfg, shape", NET_CASES)
def test_networks_predict_noise_of_the_input_shape(name, cfg, shape):
  # Constant parameters on the abstract network: compiling the random init of every
  # shape costs seconds, and the shapes do not depend on it.
  abstract = nnx.eval_shape(lambda: NETWORKS[name][1](cfg, shape, precision=FLOAT32, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  state = jax.tree.map(lambda a: jnp.full(a.shape, 0.02, a.dtype), state)
  x = jax.random.normal(jax.random.key(0), (3, *shape))
  eps = jax.jit(lambda s, x, t: nnx.merge(graphdef, s)(x, t))(state, x, jnp.array([0, 10, 999]))
  assert eps.shape == x.shape and eps.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(eps))) and float(jnp.abs(eps).max()) > 0


def test_default_parameter_counts():
  def count(make):
    params = nnx.state(nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0))), nnx.Param)
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  mlp = count(lambda rngs: MLPDenoiser(MLPDenoiserConfig(), (2,), precision=FLOAT32, rngs=rngs))
  unet = count(lambda rngs: UNet(UNetConfig(), (8, 8, 1), precision=FLOAT32, rngs=rngs))
  assert (mlp, unet) == (452_162, 377_761), (
      f"default sizes changed: mlp_denoiser {mlp:,}, unet {unet:,}; update the golden numbers "
      "if the architecture change is intended")


@pytest.mark.parametrize("cfg, shape, words", [
    (UNetConfig(mults=(1, 2, 2, 2)), (28, 28, 1), ["model.mults", "divisible by 8", "28x28"]),
    (UNetConfig(base=12), (8, 8, 1), ["model.groups=8", "12"]),
    (UNetConfig(), (2,), ["(H, W, C)", "(2,)"]),
])
def test_unet_refuses_shapes_it_cannot_take(cfg, shape, words):
  with pytest.raises(UserError) as e:
    UNet(cfg, shape, precision=FLOAT32, rngs=nnx.Rngs(0))
  for w in words:
    assert w in str(e.value)


# --- the family ------------------------------------------------------------------------


def test_registries_build_the_family():
  cfg_cls, fam_cls = FAMILIES["diffusion"]
  fam = fam_cls(cfg_cls(), NETWORKS["unet"][1], UNetConfig(), spec((8, 8, 1)), FLOAT32)
  nets = nnx.eval_shape(lambda: fam.init(nnx.Rngs(0)))
  assert list(nets) == ["denoiser"] and isinstance(nets["denoiser"], UNet)
  assert fam.init_extra(jax.random.key(0)) is None
  (update,) = fam.updates
  assert update.name == "denoiser" and update.networks == ("denoiser",)
  assert fam.clip == 1.0 and family((2,)).clip is None  # images are clipped, vectors not
  assert family((8, 8, 1), clip="none").clip is None
  assert family((2,), clip=3.0).clip == 3.0


def two_moons(n, seed=0):
  rng = np.random.default_rng(seed)
  theta = rng.uniform(0, math.pi, n)
  upper = rng.random(n) < 0.5
  x = np.where(upper[:, None], np.stack([np.cos(theta), np.sin(theta)], 1),
               np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], 1))
  x = x + 0.05 * rng.normal(size=x.shape)
  return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


def test_loss_falls_when_a_tiny_mlp_trains_on_two_moons():
  fam = family(num_timesteps=100, schedule="linear")
  graphdef, params, rest = nnx.split(fam.init(nnx.Rngs(0))["denoiser"], nnx.Param, ...)
  data = jnp.asarray(two_moons(2048))
  tx = optax.adam(3e-3)

  def loss_fn(params, batch, rng):
    out = fam.loss({"denoiser": nnx.merge(graphdef, params, rest)}, None, batch, rng, 0)
    return out.loss, out.metrics

  @jax.jit
  def step(params, opt_state, rng):
    batch_rng, loss_rng = jax.random.split(rng)
    batch = {"x": data[jax.random.randint(batch_rng, (256,), 0, len(data))]}
    grads = jax.grad(lambda p: loss_fn(p, batch, loss_rng)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  evaluate = jax.jit(lambda p: loss_fn(p, {"x": data}, jax.random.key(123)))
  before, metrics = evaluate(params)
  assert set(metrics) >= {"mse", "mse_low_noise", "mse_high_noise"}
  opt_state = tx.init(params)
  for i in range(200):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  after, _ = evaluate(params)
  assert 0.9 < float(before) < 1.1, float(before)  # zero-initialised output: E|eps|^2
  print(f"eps-MSE before {float(before):.3f}, after 200 steps {float(after):.3f}")
  assert float(after) < 0.5 * float(before), (float(before), float(after))


def test_loss_noise_does_not_depend_on_the_batch_sharding():
  fam = family()
  model = fam.init(nnx.Rngs(0))["denoiser"]
  x = jnp.asarray(two_moons(64))
  mesh = mesh_lib.make_mesh(config_lib.MeshConfig(data=-1))
  graphdef, state = nnx.split(model)
  loss = jax.jit(lambda s, x: fam.loss({"denoiser": nnx.merge(graphdef, s)}, None, {"x": x},
                                       jax.random.key(7), 0).loss)
  whole = loss(state, x)
  sharded = loss(state, jax.device_put(x, NamedSharding(mesh, P(mesh_lib.BATCH_AXES))))
  np.testing.assert_allclose(float(whole), float(sharded), rtol=1e-6)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_sampling_with_the_exact_denoiser_recovers_gaussian_data(sampler):
  # T = 1000: the discretisation bias of the std (beta~_t is the lower bound of the true
  # reverse variance) is below 1% there, against about 3% at T = 200.
  mu, sigma = jnp.array([1.0, -2.0]), 0.5
  fam = family(num_timesteps=1000, sampler=sampler, sample_steps=100)
  oracle = gaussian_oracle(fam.schedule, mu, sigma)
  x = jax.jit(lambda rng: fam.sample({"denoiser": oracle}, rng, 4000))(jax.random.key(0))
  assert x.shape == (4000, 2)
  # Standard errors with 4000 draws: 0.008 for the mean, 1.1% for the std.
  np.testing.assert_allclose(np.asarray(x.mean(0)), np.asarray(mu), atol=0.03)
  np.testing.assert_allclose(np.asarray(x.std(0)), sigma, rtol=0.04)


def test_ddim_with_eta_0_is_a_function_of_the_starting_noise():
  fam = family(num_timesteps=100, sample_steps=10)
  oracle = gaussian_oracle(fam.schedule, 0.3, 0.8)
  x_T = jax.random.normal(jax.random.key(0), (16, 2))
  ddim = jax.jit(lambda x, rng: fam.ddim(oracle, x, rng))
  np.testing.assert_array_equal(ddim(x_T, jax.random.key(1)), ddim(x_T, jax.random.key(2)))
  noisy = family(num_timesteps=100, sample_steps=10, eta=1.0)
  ddim = jax.jit(lambda x, rng: noisy.ddim(oracle, x, rng))
  assert not np.allclose(ddim(x_T, jax.random.key(1)), ddim(x_T, jax.random.key(2)))
  sample = jax.jit(lambda rng: fam.sample({"denoiser": oracle}, rng, 8))
  np.testing.assert_array_equal(sample(jax.random.key(5)), sample(jax.random.key(5)))
  assert not np.allclose(sample(jax.random.key(5)), sample(jax.random.key(6)))


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_over_all_steps_with_eta_1_is_ancestral_sampling(clip):
  # DDIM's sigma_t at eta=1 over consecutive steps is beta~_t, and its update equals the
  # DDPM posterior mean; both samplers key step t's noise by t, so the paths coincide.
  # mu = 0.9 puts many predicted x_0 outside [-1, 1]: with clip, eps is re-derived.
  fam = family(num_timesteps=100, schedule="linear", sample_steps=100, eta=1.0,
               clip=1.0 if clip else "none")
  oracle = gaussian_oracle(fam.schedule, 0.9, 0.5)
  x_T = jax.random.normal(jax.random.key(0), (256, 2))
  rng = jax.random.key(3)
  ddim, ancestral = jax.jit(lambda x, rng: (fam.ddim(oracle, x, rng),
                                             fam.ancestral(oracle, x, rng)))(x_T, rng)
  np.testing.assert_allclose(ddim, ancestral, atol=2e-4)
  assert np.all(np.abs(np.asarray(ancestral)) <= 1.0) == clip


def test_image_samples_have_the_data_shape_and_range():
  fam = family((8, 8, 1), net=NETWORKS["unet"], net_cfg=TINY_UNET, sample_steps=3)
  x = jax.jit(lambda rng: fam.sample(fam.init(nnx.Rngs(0)), rng, 2))(jax.random.key(0))
  assert x.shape == (2, 8, 8, 1)
  # The last step lands on the predicted x_0, which is clipped for images.
  assert float(jnp.abs(x).max()) <= 1.0


@pytest.mark.parametrize("cfg, words", [
    ({"schedule": "sigmoid"}, ["family.schedule", "'sigmoid'", "cosine", "linear"]),
    ({"sampler": "euler"}, ["family.sampler", "'euler'", "ancestral", "ddim"]),
    ({"num_timesteps": 50}, ["family.sampler.steps", "100", "50"]),
    ({"sampler": {"name": "ddim", "steps": 0}}, ["family.sampler.steps", "0"]),
    ({"num_timesteps": 0, "sampler": "ancestral"}, ["family.num_timesteps", "0"]),
    ({"sampler": {"name": "ddim", "eta": 1.5}}, ["family.sampler.eta", "1.5", "[0, 1]"]),
    # Keys a choice would ignore are unknown keys, not silent no-ops.
    ({"sampler": {"name": "ancestral", "steps": 10}}, ["family.sampler.steps", "accepts"]),
    ({"sampler": {"name": "ancestral", "eta": 1.0}}, ["family.sampler.eta"]),
    ({"clip": -1.0}, ["family.clip", "-1.0", "auto"]),
    ({"clip_range": 3.0}, ["family.clip_range", "clip"]),
])
def test_bad_config_values_name_the_field(cfg, words):
  with pytest.raises(UserError) as e:
    config_lib.build(DiffusionConfig, cfg, "family")
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_ancestral_takes_no_step_count():
  # The step count belongs to DDIM: a short ancestral run is not blocked by its default.
  cfg = config_lib.build(DiffusionConfig, {"num_timesteps": 50, "sampler": "ancestral"}, "family")
  assert cfg.sampler.name == "ancestral"


@pytest.mark.parametrize("steps", [1, 3, 10, 100, 333, 501, 999, 1000])
def test_ddim_starts_within_one_stride_of_the_last_timestep(steps):
  ts = ddim_timesteps(1000, steps)
  assert len(ts) == steps and ts[0] == 0 and np.all(np.diff(ts) > 0)
  # Sampling starts from pure noise, so its first timestep must be near T-1: with an
  # integer stride, 501 steps started at t=500 (abar 0.49).
  assert ts[-1] >= 1000 - math.ceil(1000 / steps), ts[-1]
