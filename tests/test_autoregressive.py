"""Autoregressive models: the causal structure of PixelCNN and the transformer, KV-cache
sampling against the full forward pass, temperature and top-k, the transformer's roles
and shardings, and bad sampling options."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from scaler import config as config_lib
from scaler import experiment as experiment_lib
from scaler import partitioning
from scaler.nn.layers import FLOAT32
from scaler.nn.pixelcnn import PixelCNN, PixelCNNConfig, conv_mask
from scaler.nn.tokens import sample_logits
from scaler.nn.transformer import Transformer, TransformerConfig
from test_cli import ROOT, expect_user_error

TINY_AR = str(ROOT / "configs" / "tiny_autoregressive.yaml")
TINY_FLOW = str(ROOT / "configs" / "tiny_flow.yaml")
VOCAB = 17


def _random(build, scale=0.3, seed=0):
  """The module `build` makes, every parameter drawn at random on the host (no layer
  left at a zero init to hide a path). Built abstractly: a real init compiles every
  initializer on its own, a minute on 2 busy cores."""
  graphdef, params = nnx.split(nnx.eval_shape(build))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, scale, a.shape), a.dtype), params)
  return nnx.merge(graphdef, params)


def _jitted(model, method, static=()):
  """model.method under jit (eagerly, every op is a dispatch of its own: slow on 2
  cores); `static`: the indices of the method's arguments that are Python values."""
  graphdef, state = nnx.split(model)

  def call(state, *args):
    return getattr(nnx.merge(graphdef, state), method)(*args)

  fn = jax.jit(call, static_argnums=tuple(i + 1 for i in static))
  return lambda *args: fn(state, *args)


# --- causality -------------------------------------------------------------------------


def test_conv_mask_type_a_hides_the_centre_and_type_b_shows_it():
  a, b = conv_mask(3, (0,), (0,), "A"), conv_mask(3, (0,), (0,), "B")
  assert a[1, 1, 0, 0] == 0 and b[1, 1, 0, 0] == 1
  # Rows above and the pixel to the left are visible; the rest of the centre row and
  # the rows below are not.
  want = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(a[..., 0, 0], want)
  want[1, 1] = 1
  np.testing.assert_array_equal(b[..., 0, 0], want)


@pytest.mark.parametrize("shape", [(4, 4, 1), (3, 3, 2)], ids=["grey", "two_channels"])
def test_pixelcnn_output_at_i_ignores_inputs_at_i_and_after(shape):
  # 8 features per channel: with fewer, all of a group's ReLUs can be off at once.
  cfg = PixelCNNConfig(features=8 * shape[-1], blocks=2, kernel=3, first_kernel=3)
  net = _random(lambda: PixelCNN(cfg, shape, VOCAB, precision=FLOAT32, rngs=nnx.Rngs(0)))
  s = int(np.prod(shape))
  # d logits[i, v] / d x[j] in raster order (row, column, channel), at a few random
  # inputs: at any one, a path can be cut by ReLUs that happen to be off.
  x = jax.random.uniform(jax.random.key(0), (4, s), minval=-1, maxval=1)
  jac = jax.jit(jax.vmap(jax.jacfwd(lambda v: net.logits(v.reshape(1, *shape))[0])))(x)
  dep = np.abs(np.asarray(jac)).max(axis=(0, 2))       # (S outputs, S inputs)
  later = np.triu(np.ones((s, s), bool))                # j >= i: the pixel itself and after
  assert np.all(dep[later] == 0), np.argwhere(dep * later)
  # Type A excludes the pixel itself, but not what comes just before it: the previous
  # channel of the same pixel, or the same channel of the pixel to the left.
  c, w = shape[-1], shape[1]
  for i in range(1, s):
    j = i - 1 if i % c else i - c if (i // c) % w else None
    if j is not None:
      assert dep[i, j] > 0, (i, j)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_transformer_output_at_i_ignores_tokens_at_i_and_after(positions):
  shape = (12,)
  cfg = TransformerConfig(width=16, depth=2, heads=2, positions=positions)
  net = _random(lambda: Transformer(cfg, shape, VOCAB, precision=FLOAT32, rngs=nnx.Rngs(0)))
  s = shape[0]
  base = jax.random.randint(jax.random.key(0), (s,), 0, VOCAB)
  # Row i: tokens >= i changed (each to another value), tokens before i kept.
  shift = jax.random.randint(jax.random.key(1), (s, s), 1, VOCAB)
  changed = (base[None] + shift) % VOCAB
  rows = jnp.where(jnp.arange(s)[None] >= jnp.arange(s)[:, None], changed, base[None])
  forward = _jitted(net, "__call__")
  want, got = forward(base[None])[0], forward(rows)
  for i in range(s):
    np.testing.assert_array_equal(got[i, :i + 1], want[:i + 1], err_msg=f"row {i}")
    if i + 1 < s:   # output i + 1 sees token i
      assert not np.allclose(got[i, i + 1, :VOCAB], want[i + 1, :VOCAB]), i


# --- sampling ----------------------------------------------------------------------------


def _transformer(positions):
  cfg = TransformerConfig(width=16, depth=2, heads=2, positions=positions)
  net = _random(lambda: Transformer(cfg, (4, 4, 1), VOCAB, precision=FLOAT32,
                                    rngs=nnx.Rngs(0)))
  return net, _jitted(net, "__call__"), _jitted(net, "sample", (1, 2, 3))


@pytest.fixture(scope="module", params=["learned", "rotary"])
def transformer(request):
  """A random transformer with its forward pass and sampler compiled once for the module."""
  return _transformer(request.param)


def _cached_logits(net, tokens_BxS):
  """The logits `sample` computes, step by step through the KV cache, for given tokens."""
  b = tokens_BxS.shape[0]
  inputs = jnp.concatenate([jnp.full((b, 1), net.bos, jnp.int32), tokens_BxS[:, :-1]], 1)

  def step(cache, pos):
    logits, cache = net.decode(inputs[:, pos], pos, cache)
    return cache, logits

  return jax.lax.scan(step, net.init_cache(b), jnp.arange(net.seq))[1].transpose(1, 0, 2)


def test_kv_cache_sampling_matches_the_full_forward_pass(transformer):
  net, forward, sample = transformer
  rng = jax.random.key(3)
  sampled = sample(rng, 6, 1.0, 0)
  assert sampled.shape == (6, 16) and sampled.dtype == jnp.int32
  assert len(np.unique(np.asarray(sampled))) > 3       # a draw, not a constant
  # The same tokens as re-running the whole sequence at every step, for the same key.
  np.testing.assert_array_equal(sampled, _jitted(net, "sample_uncached", (1, 2, 3))(rng, 6, 1.0, 0))
  # And the cache's logits are the full pass's on the sampled sequence.
  cached = jax.jit(lambda t: _cached_logits(net, t))(sampled)
  np.testing.assert_allclose(cached, forward(sampled), atol=1e-5)


def test_top_k_one_is_greedy_decoding(transformer):
  net, forward, sample = transformer
  tokens = sample(jax.random.key(4), 4, 1.0, 1)
  # Every token is the argmax of its logits given the (greedy) tokens before it.
  np.testing.assert_array_equal(tokens, jnp.argmax(forward(tokens)[..., :VOCAB], axis=-1))
  # And the same whatever the key.
  np.testing.assert_array_equal(tokens, sample(jax.random.key(5), 4, 1.0, 1))


def test_temperature_and_top_k_shape_the_distribution():
  logits = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.1]))
  n = 40_000
  draw = jax.jit(lambda key, t, k: sample_logits(key, jnp.tile(logits, (n, 1)), t, k),
                 static_argnums=2)   # a traced temperature: one compile per top-k

  def freq(t, k, seed=0):
    return np.bincount(np.asarray(draw(jax.random.key(seed), t, k)), minlength=4) / n

  np.testing.assert_allclose(freq(1.0, 0), [0.5, 0.25, 0.15, 0.1], atol=0.01)
  # T = 2 flattens: p ~ sqrt(p); T = 0.25 sharpens: p ~ p^4.
  for t in (2.0, 0.25):
    p = np.array([0.5, 0.25, 0.15, 0.1]) ** (1 / t)
    np.testing.assert_allclose(freq(t, 0), p / p.sum(), atol=0.01)
  # top-k 2 keeps the two most likely, renormalised; top-k 1 is the argmax.
  np.testing.assert_allclose(freq(1.0, 2), [2 / 3, 1 / 3, 0, 0], atol=0.01)
  np.testing.assert_array_equal(freq(1.0, 1, seed=1), [1, 0, 0, 0])


# --- roles and shardings -----------------------------------------------------------------


def test_transformer_params_name_embed_mlp_heads_kv_vocab():
  model = nnx.eval_shape(lambda: Transformer(TransformerConfig(width=32, depth=2, heads=4),
                                             (8, 8, 1), VOCAB, precision=FLOAT32,
                                             rngs=nnx.Rngs(0)))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  roles = {partitioning.path_str(p): tuple(s) for p, s in
           jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))}
  assert roles["blocks/0/attn/qkv/kernel"] == ("embed", None, "heads", "kv")
  assert roles["blocks/0/attn/out/kernel"] == ("heads", "kv", "embed")
  assert roles["blocks/1/fc1/kernel"] == ("embed", "mlp")
  assert roles["blocks/1/fc2/kernel"] == ("mlp", "embed")
  assert roles["tokens/embedding"] == ("vocab", None)
  assert roles["head/kernel"] == (None, "vocab")
  assert roles["pos"] == (None, "embed")


def test_fsdp_tensor_splits_heads_and_mlp_over_tensor():
  cfg = config_lib.load(TINY_AR, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                  "rules=fsdp_tensor"])
  exp = experiment_lib.build(cfg)
  shardings = experiment_lib.abstract_shardings(exp)[1]
  net = shardings.params["net"]
  block = net["blocks"][0]
  assert block["attn"]["qkv"]["kernel"].spec == P("fsdp", None, "tensor", None)
  assert block["attn"]["out"]["kernel"].spec == P("tensor", None, "fsdp")
  assert block["fc1"]["kernel"].spec == P("fsdp", "tensor")
  assert block["fc2"]["kernel"].spec == P("tensor", "fsdp")
  assert net["tokens"]["embedding"].spec == P("tensor", None)
  assert net["head"]["kernel"].spec == P(None, "tensor")
  # The KV cache is split like the heads, and the samples' rows like the batch.
  model = nnx.eval_shape(lambda: exp.family.init(nnx.Rngs(0)))["net"]
  with partitioning.activation_rules(exp.mesh, exp.rules):
    cache = jax.jit(lambda: model.init_cache(8)[0][0])()
  want = NamedSharding(exp.mesh, P(("data", "fsdp"), None, "tensor", None))
  assert cache.sharding.is_equivalent_to(want, cache.ndim), cache.sharding


# --- bad input ---------------------------------------------------------------------------


def _run_dir(tmp_path, config):
  """A run directory with only its config: the sampling options are refused before
  any checkpoint is opened."""
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  shutil.copy(config, run_dir / "config.yaml")
  return run_dir


@pytest.mark.parametrize("config, flags, words", [
    (TINY_AR, ["--temperature", "0"], ["--temperature 0", "positive"]),
    (TINY_AR, ["--temperature", "-1"], ["--temperature -1", "positive"]),
    # 0 is documented as "every token" (to override a config's top_k); below 0 is not.
    (TINY_AR, ["--top-k", "-1"], ["--top-k -1", "at least 0"]),
    (TINY_FLOW, ["--top-k", "5"], ["--top-k", "family flow"]),
], ids=["temperature_0", "temperature_negative", "top_k_negative", "top_k_on_flow"])
def test_bad_sampling_options_exit_2_with_one_line(capsys, tmp_path, config, flags, words):
  run_dir = _run_dir(tmp_path, config)
  out = tmp_path / "s.npz"
  expect_user_error(capsys, ["sample", str(run_dir), "--num", "4", "--out", str(out), *flags],
                    *words)
  assert not out.exists()
  assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]
