"""Normalizing flows: invertibility, log-determinants against jax.jacfwd, ActNorm's
data-dependent init, the units of the likelihood, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaler import config as config_lib
from scaler import experiment as experiment_lib
from scaler.data import DataSpec
from scaler.errors import UserError
from scaler.families import discrete
from scaler.families.flow import FlowConfig, FlowFamily
from scaler.nn import flows
from scaler.nn.flow_nets import MAF, Glow, GlowConfig, MAFConfig, RealNVP, RealNVPConfig
from scaler.nn.layers import FLOAT32
from test_cli import ROOT, expect_user_error

TINY_FLOW = str(ROOT / "configs" / "tiny_flow.yaml")

CASES = [
    ("realnvp_vectors", RealNVP, RealNVPConfig(couplings=4, hidden=16), (3,)),
    ("realnvp_images", RealNVP, RealNVPConfig(couplings=2, scales=2, hidden=8), (4, 4, 2)),
    ("glow", Glow, GlowConfig(scales=2, steps=2, hidden=8), (4, 4, 1)),
    ("glow_rgb", Glow, GlowConfig(scales=1, steps=2, hidden=8), (2, 2, 3)),
    ("maf_vectors", MAF, MAFConfig(blocks=3, hidden=16), (3,)),
    ("maf_random_order", MAF, MAFConfig(blocks=3, hidden=16, order="random"), (2, 2, 1)),
]


def _built(cls, cfg, shape, x):
  """A flow whose zero-initialised last layers are perturbed (else the couplings are the
  identity and any log-determinant code would pass), ActNorm initialised on x."""
  net = cls(cfg, shape, precision=FLOAT32, rngs=nnx.Rngs(0))
  if cls.needs_data_init:
    net.forward(x, init=True)
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = jax.jit(lambda leaves, keys: [p + 0.05 * jax.random.normal(keys[i], p.shape)
                                         for i, p in enumerate(leaves)])(leaves, keys)
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


def _compiled(net, method):
  """`net.method` as one compiled function of its inputs (the module's state constant)."""
  graphdef, state = nnx.split(net)
  return jax.jit(lambda *args: getattr(nnx.merge(graphdef, state), method)(*args))


@pytest.mark.parametrize("name, cls, cfg, shape", CASES, ids=[c[0] for c in CASES])
def test_inverse_of_forward_is_the_identity(name, cls, cfg, shape):
  x = jax.random.normal(jax.random.key(1), (5, *shape))
  net = _built(cls, cfg, shape, x)
  eps, _ = _compiled(net, "forward")(x)
  assert eps.shape == (5, math.prod(shape))
  assert float(jnp.max(jnp.abs(eps - x.reshape(5, -1)))) > 1e-2   # not the identity
  np.testing.assert_allclose(_compiled(net, "inverse")(eps), x, atol=1e-4)


@pytest.mark.parametrize("name, cls, cfg, shape", CASES, ids=[c[0] for c in CASES])
def test_log_determinant_matches_the_jacobian(name, cls, cfg, shape):
  x = jax.random.normal(jax.random.key(2), (4, *shape))
  net = _built(cls, cfg, shape, x)
  x1 = x[:1]
  forward = _compiled(net, "forward")
  jac = jax.jit(jax.jacfwd(lambda v: forward(v.reshape(1, *shape))[0][0]))(x1.reshape(-1))
  _, want = jnp.linalg.slogdet(jac)
  _, got = forward(x1)
  np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)


def test_made_output_depends_only_on_earlier_dimensions():
  order = (2, 0, 3, 1)   # dimension i is at place order[i]
  made = flows.MADE(4, 16, 2, order, precision=FLOAT32, rngs=nnx.Rngs(0))
  made.out.kernel[...] = jax.random.normal(jax.random.key(0), made.out.kernel.shape)
  jac = jax.jacfwd(lambda x: made(x[None])[0][0])(jnp.ones(4))   # d mu_i / d x_j
  place = np.asarray(order)
  allowed = place[None, :] < place[:, None]     # j before i in the order
  assert np.all(np.abs(np.asarray(jac))[~allowed] == 0)
  assert np.all(np.abs(np.asarray(jac))[allowed] > 0)


def test_actnorm_init_whitens_the_batch_per_channel():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (16, 4, 4, 3))
  norm = flows.ActNorm(3, precision=FLOAT32)
  y, logdet = norm.forward(x, init=True)
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(y, axis=(0, 1, 2)), 1.0, atol=1e-4)
  np.testing.assert_allclose(logdet, 16 * jnp.sum(norm.log_scale[...]), rtol=1e-6)
  y2, _ = norm.forward(x + 1.0)        # later calls use the stored values
  np.testing.assert_allclose(jnp.mean(y2, axis=(0, 1, 2)), 1.0 / jnp.std(x, axis=(0, 1, 2)),
                             rtol=1e-4)


def _digits_spec():
  return DataSpec((8, 8, 1), "image", np.float32(8.0), np.float32(8.0), 10)


def test_levels_units_uniform_density_is_log2_levels_bits():
  # A density uniform over the dequantised range [-1 - step/2, 1 + step/2]^D in model
  # space is uniform over the 17 levels: exactly log2(17) bits per dimension.
  levels = discrete.Levels(_digits_spec(), None)
  assert levels.num == 17 and levels.step == pytest.approx(1 / 8)
  d = 64
  nll_model = d * math.log(levels.num * levels.step)
  bpd = levels.density_units.bits_per_dim(levels.density_units.nats(nll_model))
  assert bpd == pytest.approx(math.log2(17))
  x = levels.values(jnp.arange(17))
  np.testing.assert_array_equal(levels.tokens(x), np.arange(17))
  noisy = levels.dequantize(jnp.tile(x, 100), jax.random.key(0))
  np.testing.assert_array_equal(levels.tokens(noisy), np.tile(np.arange(17), 100))


def test_vector_units_are_data_space_nats():
  # N(0, 1) in model space, data x = 3 + 2 y: the data density is N(3, 4).
  spec = DataSpec((1,), "vector", np.float32([3.0]), np.float32([2.0]))
  y = 0.7
  nll_model = 0.5 * y * y + 0.5 * math.log(2 * math.pi)
  x = 3.0 + 2.0 * y
  want = 0.5 * ((x - 3) / 2) ** 2 + math.log(2.0) + 0.5 * math.log(2 * math.pi)
  assert discrete.data_space_units(spec).nats(nll_model) == pytest.approx(want)


def test_flow_family_refuses_other_models_and_vector_levels():
  spec = DataSpec((2,), "vector", np.zeros(2, np.float32), np.ones(2, np.float32))
  from scaler.nn.mlp import MLPDenoiser, MLPDenoiserConfig
  with pytest.raises(UserError, match="realnvp or glow or maf"):
    FlowFamily(FlowConfig(), MLPDenoiser, MLPDenoiserConfig(), spec, FLOAT32)
  with pytest.raises(UserError, match="family.levels=17 is for images"):
    FlowFamily(FlowConfig(levels=17), RealNVP, RealNVPConfig(), spec, FLOAT32)
  with pytest.raises(UserError, match="model glow needs images"):
    experiment_lib.build_family(config_lib.load(TINY_FLOW, ["data.source=two_moons"]), spec)


@pytest.mark.parametrize("overrides, words", [
    # 8 -> 4 -> 2 -> 1, then a fourth squeeze of a 1x1 image.
    (["model.scales=4"], ["model.scales=4", "scale 4", "1x1", "squeeze factor 2"]),
    (["model.name=realnvp", "model.scales=4", "model.steps=null"], ["unknown config key"]),
    (["model={name: realnvp, scales: 4}"], ["scale 4", "1x1"]),
    (["family.levels=1"], ["family.levels", "at least 2"]),
    (["model=maf", "model.blocks=0"], ["model.blocks", "positive"]),
])
def test_bad_flow_input_exits_2_with_one_line(capsys, tmp_path, overrides, words):
  expect_user_error(capsys, ["train", TINY_FLOW, *overrides, "--run-dir", str(tmp_path / "r")],
                    *words)
  assert not (tmp_path / "r").exists()
