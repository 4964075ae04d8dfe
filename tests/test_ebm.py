"""EBM pieces: energy networks and spectral norm, Langevin dynamics, the replay buffer's
draw and write (the same on any mesh, with no collective), the stop-gradient through the
chain, and bad input. Training through the real loop is in test_ebm_train.py."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from scaler import config as config_lib
from scaler import experiment as experiment_lib
from scaler import mesh as mesh_lib
from scaler import partitioning
from scaler.config import MeshConfig
from scaler.data import DataSpec
from scaler.families import langevin
from scaler.families.ebm import EBMConfig, EBMFamily
from scaler.nn.energy import (EnergyConv, EnergyConvConfig, EnergyMLP, EnergyMLPConfig,
                              PowerIteration, Spectral)
from scaler.nn.layers import FLOAT32
from scaler.nn.registry import NETWORKS
from scaler.train import compile_step
from test_cli import ROOT, expect_user_error

TINY_EBM = str(ROOT / "configs" / "tiny_ebm.yaml")
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


@pytest.fixture(autouse=True)
def partitionable():
  # As in every scaler process (scaler.train.setup): random numbers independent of the mesh.
  with jax.threefry_partitionable(True):
    yield


def _spec(shape):
  return DataSpec(tuple(shape), "image" if len(shape) == 3 else "vector", 0.0, 1.0)


# --- networks ---------------------------------------------------------------------------

NET_CASES = [
    ("energy_mlp", EnergyMLPConfig(hidden=32, depth=3), (2,)),
    ("energy_mlp", EnergyMLPConfig(hidden=32, depth=2, spectral_norm=True), (2,)),
    ("energy_conv", EnergyConvConfig(channels=(8, 16)), (8, 8, 1)),
    ("energy_conv", EnergyConvConfig(channels=(8, 16, 32), spectral_norm=True), (8, 8, 1)),
]


@pytest.mark.parametrize("name, cfg, shape", NET_CASES)
def test_energy_networks_name_roles_and_return_one_energy_per_example(name, cfg, shape):
  # Abstract network, constant parameters, one jitted call: op-by-op init costs seconds.
  net = nnx.eval_shape(lambda: NETWORKS[name][1](cfg, shape, precision=FLOAT32,
                                                 rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
  values = nnx.to_pure_dict(params)
  for (path, spec), value in zip(
      jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P)),
      jax.tree.leaves(values)):
    assert len(spec) == value.ndim, f"{partitioning.path_str(path)}: {spec}"
  mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
  for preset in partitioning.PRESETS:
    partitioning.param_shardings(values, specs, partitioning.resolve_rules(preset), mesh)
  # Spectral norm's vectors are module state, with the role of their kernel's outputs.
  vectors = nnx.to_flat_state(nnx.state(net, PowerIteration))
  assert bool(vectors) == cfg.spectral_norm
  for _, u in vectors:
    assert u.get_metadata()["out_sharding"] in (("embed",), ("mlp",), ("conv_out",), (None,))
  params, rest = jax.tree.map(lambda a: jnp.full(a.shape, 0.05, a.dtype), (params, rest))
  x = jax.random.normal(jax.random.key(0), (5, *shape))
  energy = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x))(params, rest, x)
  assert energy.shape == (5,) and energy.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(energy)))


def test_spectral_norm_divides_by_the_top_singular_value():
  rngs = nnx.Rngs(0)
  inner = nnx.Linear(6, 4, use_bias=False, rngs=rngs)
  graphdef, state = nnx.split(Spectral(inner, 4, None, precision=FLOAT32, rngs=rngs))
  x = jax.random.normal(jax.random.key(1), (3, 6))

  def iterate(_, state):
    layer = nnx.merge(graphdef, state)
    layer.power_iterate()
    return nnx.state(layer)

  @jax.jit
  def run(state):
    layer = nnx.merge(graphdef, state)
    u0 = layer.u[...]
    layer(x)
    called = layer.u[...]
    # 50 iterations in a loop, not unrolled: unrolled, compiling them took seconds.
    layer = nnx.merge(graphdef, jax.lax.fori_loop(0, 50, iterate, nnx.state(layer)))
    return u0, called, layer(x)

  u0, called, y = run(state)
  np.testing.assert_array_equal(called, u0)   # calling never moves the estimate
  w = np.asarray(inner.kernel[...])
  top = np.linalg.svd(w, compute_uv=False)[0]
  np.testing.assert_allclose(y, x @ w / top, rtol=1e-4, atol=1e-6)


def test_conv_energy_refuses_vectors_and_odd_sizes():
  from scaler.errors import UserError
  with pytest.raises(UserError, match="energy_mlp for vectors"):
    EnergyConv(EnergyConvConfig(), (2,), precision=FLOAT32, rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match="divisible by 4; the images are 6x6"):
    EnergyConv(EnergyConvConfig(channels=(4, 4, 4)), (6, 6, 1), precision=FLOAT32,
               rngs=nnx.Rngs(0))


# --- Langevin dynamics ------------------------------------------------------------------


def test_langevin_samples_a_standard_gaussian():
  # E(x) = |x|^2 / 2. The unadjusted chain's stationary variance is 1 / (1 - h/4):
  # 1.0126 at h = 0.05, within the tolerance. 4000 chains x 2 dims: the standard errors
  # are 0.011 (mean) and 0.016 (variance); the tolerance is 0.05 for both.
  x0 = jax.random.uniform(jax.random.key(0), (4000, 2), minval=2.0, maxval=3.0)
  run = jax.jit(lambda x0: langevin.langevin(
      lambda x: 0.5 * jnp.sum(x ** 2, axis=1), x0, jax.random.key(1), steps=600,
      step_size=0.05, noise_scale=1.0, grad_clip=None, bound=None))
  x, grad_norm = run(x0)
  x = np.asarray(x)
  assert np.all(np.abs(x.mean(axis=0)) < 0.05), x.mean(axis=0)
  assert np.all(np.abs(x.var(axis=0) - 1.0) < 0.05), x.var(axis=0)
  # The mean gradient norm over the chain: |x| ~ sqrt(2) at equilibrium, more at the start.
  assert 1.2 < float(grad_norm) < 2.0


def test_langevin_clips_each_example_and_keeps_samples_in_range():
  steep = lambda x: 1e3 * jnp.sum(x, axis=1)        # |grad| = 1e3 * sqrt(2) everywhere
  x0 = jnp.zeros((4, 2)).at[0].set(0.9)
  x, _ = langevin.langevin(steep, x0, jax.random.key(0), steps=1, step_size=0.2,
                           noise_scale=0.0, grad_clip=1.0, bound=None)
  # One step moves each example by (h/2) * 1 along -grad, whatever the raw norm.
  np.testing.assert_allclose(np.linalg.norm(x - x0, axis=1), 0.1, rtol=1e-5)
  x, _ = langevin.langevin(steep, x0, jax.random.key(0), steps=30, step_size=0.2,
                           noise_scale=1.0, grad_clip=None, bound=1.0)
  assert float(jnp.max(jnp.abs(x))) <= 1.0


# --- the replay buffer: draw and write ---------------------------------------------------


def _draw_and_write(buffer, x_new, key, batch_rows):
  start, slots = langevin.draw(buffer, batch_rows, key)
  return start, slots, langevin.write(buffer, slots, x_new)


def test_draw_takes_distinct_rows_of_each_block_and_write_puts_them_back():
  n, b = 48, 32                       # G = gcd = 16 blocks of 3 buffer rows and 2 batch rows
  buffer = jnp.arange(n * 2, dtype=jnp.float32).reshape(n, 2)
  x_new = -1.0 - jnp.arange(b * 2, dtype=jnp.float32).reshape(b, 2)
  start, slots, new = _draw_and_write(buffer, x_new, jax.random.key(0), b)
  g, m, k = 16, 3, 2
  assert slots.shape == (g, k)
  rows = np.asarray(start[:, 0] // 2).astype(int)   # the buffer row each chain starts from
  for i in range(g):
    block = rows[i * k:(i + 1) * k]
    assert set(block) <= set(range(i * m, (i + 1) * m)), (i, block)
    assert len(set(block)) == k
  np.testing.assert_array_equal(np.asarray(new)[rows], x_new)          # ends written back
  untouched = np.setdiff1d(np.arange(n), rows)
  np.testing.assert_array_equal(np.asarray(new)[untouched], np.asarray(buffer)[untouched])


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=8), MeshConfig(data=2, fsdp=4)],
                         ids=["data8", "data2_fsdp4"])
def test_draw_is_the_same_on_any_mesh_and_needs_no_collective(mesh_cfg):
  n, b = 1024, 64
  buffer = jax.random.normal(jax.random.key(0), (n, 2))
  x_new = jax.random.normal(jax.random.key(1), (b, 2))
  results = []
  for mesh in (mesh_lib.make_mesh(MeshConfig(data=1), jax.devices()[:1]),
               mesh_lib.make_mesh(mesh_cfg)):
    rows = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
    fn = jax.jit(_draw_and_write, static_argnums=3, in_shardings=(rows, rows, None),
                 out_shardings=(rows, None, rows))
    args = (jax.device_put(buffer, rows), jax.device_put(x_new, rows), jax.random.key(2), b)
    hlo = fn.lower(*args).compile().as_text()
    found = [c for c in COLLECTIVES if f" {c}(" in hlo or f" {c}-start(" in hlo]
    assert not found, f"the buffer's draw or write communicates on {dict(mesh.shape)}: {found}"
    start, _, new = fn(*args)
    # No device holds more than its slice of the new buffer.
    assert {s.data.shape for s in new.addressable_shards} == {(n // mesh.size, 2)}
    results.append((np.asarray(start), np.asarray(new)))
  np.testing.assert_array_equal(results[0][0], results[1][0])
  np.testing.assert_array_equal(results[0][1], results[1][1])


def test_the_compiled_step_gathers_nothing_under_data_parallel():
  # Data-parallel: parameters are replicated, so any all-gather, all-to-all or permute
  # would move the buffer or the chains. All-reduces remain: gradients and scalars.
  cfg = config_lib.load(TINY_EBM, ["mesh.data=8"])
  exp = experiment_lib.build(cfg)
  _, shardings = experiment_lib.abstract_shardings(exp)
  rows = mesh_lib.batch_sharding(exp.mesh)
  batch = {"x": jax.ShapeDtypeStruct((cfg.train.batch_size, 2), np.float32, sharding=rows)}
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=mesh_lib.replicated(exp.mesh))
  hlo = compile_step(exp, shardings, rows).lower(experiment_lib.abstract_target(exp), batch,
                                                 key).compile().as_text()
  for c in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
    assert f" {c}(" not in hlo and f" {c}-start(" not in hlo, c
  # Every all-reduce sums a gradient (a parameter's shape, maybe transposed) or a scalar,
  # never rows of chains or of the buffer (a gather done as a masked sum looks like that).
  abstract = experiment_lib.abstract_state(exp)
  allowed = {tuple(sorted(p.shape)) for p in jax.tree.leaves(abstract.params)} | {(), (1,)}
  reduced = [m for line in hlo.splitlines() if " all-reduce(" in line
             for m in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", line.split(" all-reduce(")[0])]
  assert reduced
  for dims in reduced:
    shape = tuple(sorted(int(d) for d in dims.split(",") if d))
    assert shape in allowed, f"an all-reduce of shape {dims} in the step"


# --- the loss ----------------------------------------------------------------------------


def _energy(fam):
  """The family's energy net, initialised in one jitted call (op by op costs seconds)."""
  return nnx.jit(lambda: fam.init(nnx.Rngs(0))["energy"])()


def _family(**cfg):
  cfg = {"buffer_size": 64, "langevin_steps": 5, "step_size": 0.1, "noise_scale": 0.1,
         "grad_clip": "none", "alpha": 0.1, **cfg}
  return EBMFamily(EBMConfig(**cfg), EnergyMLP, EnergyMLPConfig(hidden=16, depth=2),
                   _spec((2,)), FLOAT32)


def test_negatives_get_no_gradient_through_the_chain():
  fam = _family()
  graphdef, params, rest = nnx.split(_energy(fam), nnx.Param, ...)
  extra = jax.jit(fam.init_extra)(jax.random.key(1))
  batch = {"x": jax.random.normal(jax.random.key(2), (32, 2))}
  rng = jax.random.key(3)

  def loss(params):
    out = fam.loss({"energy": nnx.merge(graphdef, params, rest)}, extra, batch, rng, 0)
    return out.loss, out

  def fixed(params, x_neg):
    e = nnx.merge(graphdef, params, rest)
    e_pos, e_neg = e(batch["x"]), e(x_neg)
    return (jnp.mean(e_pos) - jnp.mean(e_neg)
            + 0.1 * (jnp.mean(e_pos ** 2) + jnp.mean(e_neg ** 2)))

  @jax.jit
  def both(params):
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    # The negatives, read back from the buffer rows the chains were written to.
    _, slots = langevin.draw(extra["buffer"], 32, jax.random.split(rng, 4)[0])
    g = slots.shape[0]
    x_neg = out.extra["buffer"][(jnp.arange(g)[:, None] * (64 // g) + slots).reshape(-1)]
    return out.loss, grads, fixed(params, x_neg), jax.grad(fixed)(params, x_neg)

  got, grads, expected, expected_grads = both(params)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sample_starts_from_noise_or_from_the_buffer():
  fam = _family(sample_steps=3, sample_step_size=0.01)
  graphdef, state = nnx.split(_energy(fam))
  extra = {"buffer": jnp.full((64, 2), 2.5)}

  @jax.jit
  def both(state):
    nets = {"energy": nnx.merge(graphdef, state)}
    return (fam.sample(nets, jax.random.key(0), 100, extra=extra),
            fam.sample(nets, jax.random.key(0), 100, extra=extra, from_buffer=True))

  from_noise, from_buffer = both(state)
  assert from_noise.shape == from_buffer.shape == (100, 2)        # more than the buffer holds
  assert float(jnp.abs(from_noise).max()) <= 3.0                  # the vectors' bound
  assert float(jnp.abs(from_buffer - 2.5).max()) < 0.5            # 3 short steps from 2.5
  assert float(jnp.abs(from_noise - 2.5).mean()) > 1.0


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, words", [
    (["family.buffer_size=100"], ["family.buffer_size=100", "8 data-parallel devices",
                                  "96 or 104"]),
    (["family.buffer_size=1001", "mesh.data=2", "mesh.fsdp=4", "rules=fsdp"],
     ["buffer_size=1001", "8 data-parallel", "1000 or 1008"]),
    (["family.buffer_size=32"], ["family.buffer_size=32", "train.batch_size=64", "at least 64"]),
    (["family.langevin_steps=0"], ["family.langevin_steps", "at least 1"]),
    (["family.step_size=0"], ["family.step_size", "positive"]),
    (["family.step_size=-0.5"], ["family.step_size", "positive"]),
    (["family.reinit=1.5"], ["family.reinit", "[0, 1]"]),
    (["family.reinit=-0.1"], ["family.reinit", "[0, 1]"]),
    (["family.grad_clip=0"], ["family.grad_clip", "none or a positive number"]),
    (["model={name: energy_conv}"], ["energy_conv", "energy_mlp for vectors"]),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, overrides, words):
  expect_user_error(capsys, ["train", TINY_EBM, *overrides, "--run-dir", str(tmp_path / "r")],
                    *words)
  assert not (tmp_path / "r").exists()


def test_from_buffer_on_a_family_without_one_is_refused(capsys, tmp_path):
  # The check comes before any checkpoint is read: a run directory's config is enough.
  run_dir = tmp_path / "diffusion_run"
  run_dir.mkdir()
  config_lib.dump(config_lib.load(ROOT / "configs" / "tiny_diffusion.yaml"),
                  run_dir / "config.yaml")
  expect_user_error(capsys, ["sample", str(run_dir), "--out", str(tmp_path / "s.npz"),
                             "--from-buffer"], "--from-buffer", "'diffusion'", "no replay buffer")
