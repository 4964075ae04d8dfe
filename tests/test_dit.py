"""DiT: the paper's sizes, patches and positions, adaLN-Zero, roles and their shardings,
bad input, and the same losses on 1 device and on 8 under every preset."""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from launch import commands
from scaler import config as config_lib
from scaler import experiment as experiment_lib
from scaler import partitioning
from scaler import state as state_lib
from scaler.metrics import read_jsonl
from scaler.nn.dit import (PRESETS, DiT, DiTConfig, flops_per_example, patchify, sincos_2d,
                           unpatchify)
from scaler.nn.layers import FLOAT32
from scaler.train import train
from test_cli import ROOT, expect_user_error

TINY_DIT = str(ROOT / "configs" / "tiny_dit.yaml")
TINY = DiTConfig(size="tiny", patch=2)


def _count(cfg, shape, num_classes=1000):
  model = nnx.eval_shape(lambda: DiT(cfg, shape, num_classes=num_classes, precision=FLOAT32,
                                     rngs=nnx.Rngs(0)))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("size, params_m, gflops", [
    ("S", 33, 6.06), ("B", 130, 23.01), ("L", 458, 80.71), ("XL", 675, 118.64)])
def test_presets_have_the_papers_sizes(size, params_m, gflops):
  # Peebles & Xie, Table 4: /2 models on 32x32x4 latents with 1000 classes. The paper's
  # Gflops count multiply-adds; its nets also output a variance (2C channels), ours not.
  cfg = DiTConfig(size=size, patch=2)
  assert _count(cfg, (32, 32, 4)) / 1e6 == pytest.approx(params_m, rel=0.01)
  assert flops_per_example(cfg, (32, 32, 4)) / 2e9 == pytest.approx(gflops, rel=0.01)


def test_explicit_sizes_override_the_preset():
  assert DiTConfig(size="B", depth=3).shape == (3, 768, 12)
  assert DiTConfig(size="tiny", width=32, heads=2).shape == (2, 32, 2)
  assert set(PRESETS) == {"tiny", "S", "B", "L", "XL"}


def test_patchify_takes_square_patches_and_unpatchify_inverts_it():
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  p_BxNxD = patchify(x, 4)
  assert p_BxNxD.shape == (2, 6, 48)
  # Token 4 is patch row 1, column 1 (three patches per row), in row-major pixel order.
  np.testing.assert_array_equal(p_BxNxD[1, 4], x[1, 4:8, 4:8, :].reshape(-1))
  np.testing.assert_array_equal(unpatchify(p_BxNxD, 4, 8, 12), x)


def test_2d_positions_split_rows_and_columns():
  pos = sincos_2d(3, 4, 16)
  assert pos.shape == (12, 16) and pos.dtype == np.float32
  rows, cols = pos[:, :8].reshape(3, 4, 8), pos[:, 8:].reshape(3, 4, 8)
  # The first half encodes the row only, the second the column only; all tokens differ.
  np.testing.assert_array_equal(rows, np.repeat(rows[:, :1], 4, axis=1))
  np.testing.assert_array_equal(cols, np.repeat(cols[:1], 3, axis=0))
  assert len({tuple(r) for r in pos.round(6)}) == 12


def _jitted(model):
  """model's __call__ under jit: eager DiT calls dispatch op by op (seconds each)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args)), state


def _perturbed(state, scale=0.05, seed=1):
  """Every parameter moved off its init (the zero-initialised ones included)."""
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [p + scale * jax.random.normal(k, p.shape) if jnp.issubdtype(p.dtype, jnp.floating)
            else p for p, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("pos", ["sincos", "learned"])
def test_adaln_zero_starts_every_block_as_the_identity(pos):
  # Initialised under jit: eagerly, each initializer is a dispatch of its own.
  model = nnx.jit(lambda: DiT(DiTConfig(size="tiny", patch=2, pos=pos), (8, 8, 1),
                              num_classes=10, precision=FLOAT32, rngs=nnx.Rngs(0)))()
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  t, y = jnp.array([0, 5, 50, 99]), jnp.array([0, 3, 9, 10])
  h = jax.random.normal(jax.random.key(1), (4, 16, 64))
  c = jax.random.normal(jax.random.key(2), (4, 64))
  block, block_state = _jitted(model.blocks[0])
  np.testing.assert_array_equal(block(block_state, h, c), h)
  net, state = _jitted(model)
  assert float(jnp.abs(net(state, x, t, y)).max()) == 0.0   # eps = 0: the first loss is 1
  # Off its init, the output depends on the image, the time and the label.
  state = _perturbed(state)
  eps = net(state, x, t, y)
  assert eps.shape == x.shape and eps.dtype == jnp.float32
  for other in (net(state, x * 0.5, t, y), net(state, x, t + 1, y),
                net(state, x, t, (y + 1) % 11)):
    assert not np.allclose(eps, other, atol=1e-6)


def _roles(model):
  params = nnx.state(model, nnx.Param)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
  flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  return {partitioning.path_str(p): tuple(s) for p, s in flat}


def test_attention_and_mlp_name_embed_heads_kv_mlp():
  model = nnx.eval_shape(lambda: DiT(TINY, (8, 8, 1), num_classes=10, precision=FLOAT32,
                                     rngs=nnx.Rngs(0)))
  roles = _roles(model)
  assert roles["blocks/0/attn/qkv/kernel"] == ("embed", None, "heads", "kv")
  assert roles["blocks/0/attn/out/kernel"] == ("heads", "kv", "embed")
  assert roles["blocks/0/fc1/kernel"] == ("embed", "mlp")
  assert roles["blocks/0/fc2/kernel"] == ("mlp", "embed")
  values = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for (path, value) in jax.tree_util.tree_leaves_with_path(values):
    where = partitioning.path_str(path)
    assert len(roles[where]) == value.ndim, where
    if value.ndim >= 2 and not where.endswith("bias"):   # every matrix is split under fsdp
      assert "embed" in roles[where], (where, roles[where])


def _layout(overrides):
  cfg = config_lib.load(TINY_DIT, overrides)
  exp = experiment_lib.build(cfg)
  return exp, experiment_lib.abstract_shardings(exp)[1]


def test_fsdp_tensor_splits_heads_and_mlp_over_tensor_and_embed_over_fsdp():
  _, shardings = _layout(["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "rules=fsdp_tensor"])
  block = shardings.params["denoiser"]["blocks"][0]
  assert block["attn"]["qkv"]["kernel"].spec == P("fsdp", None, "tensor", None)
  assert block["attn"]["out"]["kernel"].spec == P("tensor", None, "fsdp")
  assert block["fc1"]["kernel"].spec == P("fsdp", "tensor")
  assert block["fc2"]["kernel"].spec == P("tensor", "fsdp")
  # The optimizer's moments follow their parameter.
  mu = shardings.opt_state["denoiser"][0].mu["blocks"][0]["attn"]["qkv"]["kernel"]
  assert mu.spec == P("fsdp", None, "tensor", None)
  _, shardings = _layout(["mesh.data=1", "mesh.fsdp=8", "rules=fsdp"])
  block = shardings.params["denoiser"]["blocks"][0]
  assert block["attn"]["qkv"]["kernel"].spec == P("fsdp", None, None, None)
  assert block["fc2"]["kernel"].spec == P(None, "fsdp")


@pytest.mark.parametrize("overrides, words", [
    (["model.patch=3"], ["model.patch=3", "8x8"]),
    (["model.heads=5"], ["model.heads=5", "model.width=64"]),
    (["model.size=XXL"], ["model.size", "'XXL'", "tiny, S, B, L, XL"]),
    (["model.width=0"], ["model.width", "positive"]),
    (["precision.compute=float64"], ["precision.compute", "float64", "float32, bfloat16"]),
    (["precision.compute=float16"], ["precision.compute=float16", "loss scale", "bfloat16"]),
    (["family.condition.label_dropout=1.0"], ["family.condition.label_dropout", "[0, 1)"]),
    (["family.condition.label_dropout=-0.1"], ["family.condition.label_dropout", "[0, 1)"]),
    (["family.condition.guidance_scale=-1"], ["family.condition.guidance_scale", "at least 0"]),
    (["--config", "tiny_diffusion.yaml", "data.source=swiss_roll", "family.condition=class"],
     ["family.condition=class", "classes", "none"]),
    (["model.remat=everything"], ["model.remat", "none, block, dots_saveable"]),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, overrides, words):
  config = TINY_DIT
  if overrides[0] == "--config":   # the swiss roll has no classes to condition on
    config, overrides = str(ROOT / "configs" / overrides[1]), overrides[2:]
  expect_user_error(capsys, ["train", config, *overrides, "--run-dir", str(tmp_path / "r")],
                    *words)
  assert not (tmp_path / "r").exists()


# --- 1 device against 8 ------------------------------------------------------------------

PRESET_MESHES = [
    ({"data": -1, "fsdp": 1, "tensor": 1}, "data_parallel"),
    ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    ({"data": 1, "fsdp": 4, "tensor": 2}, "fsdp_tensor"),
]


def _cfg(mesh, rules, *extra):
  overrides = [f"mesh.{k}={v}" for k, v in mesh.items()] + [
      f"rules={rules}", "train.steps=20", "train.log_every=1", "checkpoint.every=1000",
      "train.num_samples=8", *extra]
  return config_lib.load(TINY_DIT, overrides)


def _losses(run_dir):
  return np.array([r["denoiser/loss"] for r in read_jsonl(run_dir / "metrics.jsonl")])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("one")
  train(_cfg({"data": 1, "fsdp": 1, "tensor": 1}, "data_parallel"), run_dir,
        devices=jax.devices()[:1])
  return _losses(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("mesh, rules", PRESET_MESHES)
def test_same_losses_on_one_and_eight_devices(one_device, tmp_path, mesh, rules):
  train(_cfg(mesh, rules), tmp_path)
  losses = _losses(tmp_path)
  assert len(losses) == 20 and losses[-1] < 0.8 * losses[0], losses
  np.testing.assert_allclose(losses, one_device, rtol=1e-5)


@pytest.mark.slow
def test_layout_shows_the_tensor_axis_and_the_arrays_carry_it(capsys):
  overrides = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "rules=fsdp_tensor"]
  commands.layout(argparse.Namespace(config=TINY_DIT, overrides=overrides, devices=8))
  table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
  assert "('fsdp', None, 'tensor', None)" in table["denoiser/blocks/0/attn/qkv/kernel"]
  assert "('tensor', None, 'fsdp')" in table["denoiser/blocks/0/attn/out/kernel"]
  assert "('fsdp', 'tensor')" in table["denoiser/blocks/1/fc1/kernel"]
  assert "('tensor', 'fsdp')" in table["denoiser/blocks/1/fc2/kernel"]
  exp, shardings = _layout(overrides)
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, exp.use_ema, exp.rules,
                              exp.mesh, 0)
  for planned, actual in zip(jax.tree.leaves(shardings.params), jax.tree.leaves(state.params)):
    assert actual.sharding.is_equivalent_to(planned, actual.ndim)
    assert actual.addressable_shards[0].data.shape == planned.shard_shape(actual.shape)
