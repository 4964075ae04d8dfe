"""Class-conditional diffusion with classifier-free guidance: label dropout in training,
eps_u + w (eps_c - eps_u) in one batched network call per sampling step, and the
`scaler sample --label K --guidance W` command with its bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaler import config as config_lib
from scaler.data import DataSpec
from scaler.errors import UserError
from scaler.families.diffusion import DiffusionConfig, DiffusionFamily
from scaler.nn.dit import DiT, DiTConfig
from scaler.nn.layers import FLOAT32
from scaler.train import train
from family_runs import QUALITY_TIMEOUT
from test_cli import ROOT, expect_user_error
from launch.cli import main

NULL = 10


def _family(condition="class", **family):
  spec = DataSpec((8, 8, 1), "image", 0.0, 1.0, num_classes=10)
  cfg = config_lib.build(DiffusionConfig, {"condition": condition, "num_timesteps": 100,
                                           "sampler": {"name": "ddim", "steps": 5}, **family},
                         "family")
  return DiffusionFamily(cfg, DiT, DiTConfig(size="tiny", patch=2), spec, FLOAT32)


@pytest.fixture(scope="module")
def denoiser():
  """A tiny DiT off its zero init (whose output would be 0 for every label)."""
  fam = _family()
  model = nnx.jit(lambda: fam.init(nnx.Rngs(0))["denoiser"])()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                        params)
  return graphdef, params, rest


def _sample(fam, denoiser, num=6, **kw):
  graphdef, params, rest = denoiser
  return jax.jit(lambda p: fam.sample({"denoiser": nnx.merge(graphdef, p, rest)},
                                      jax.random.key(3), num, **kw))(params)


def _sample_with(fam, denoiser, labels):
  """The sampler driven by the net at fixed labels, with sample()'s starting noise."""
  graphdef, params, rest = denoiser

  def run(p):
    net = nnx.merge(graphdef, p, rest)
    init_rng, loop_rng = jax.random.split(jax.random.key(3))
    x = jax.random.normal(init_rng, (len(labels), *fam.data_shape))
    return fam._reverse(lambda x, t: net(x, t, jnp.asarray(labels)), x, loop_rng)

  return jax.jit(run)(params)


def test_guidance_0_is_the_unconditional_sampler_and_1_the_conditional(denoiser):
  fam = _family()
  uncond = _sample_with(fam, denoiser, [NULL] * 6)
  cond = _sample_with(fam, denoiser, [4] * 6)
  assert not np.allclose(uncond, cond, atol=1e-3)   # the label does change the samples
  np.testing.assert_allclose(_sample(fam, denoiser, label=4, guidance=0.0), uncond, atol=1e-5)
  np.testing.assert_allclose(_sample(fam, denoiser, label=4, guidance=1.0), cond, atol=1e-5)
  # Without a label the samples cycle through the classes.
  np.testing.assert_allclose(_sample(fam, denoiser, guidance=1.0),
                             _sample_with(fam, denoiser, [0, 1, 2, 3, 4, 5]), atol=1e-5)


def test_one_batched_network_call_per_step(denoiser):
  fam = _family()
  graphdef, params, rest = denoiser
  calls = []

  def counting(x, t_B, y_B):
    calls.append((x.shape[0], y_B))   # under jit: once per call site in the traced program
    return nnx.merge(graphdef, params, rest)(x, t_B, y_B)

  jax.jit(lambda: fam.sample({"denoiser": counting}, jax.random.key(0), 3, label=7,
                             guidance=3.0))()
  # The scan over the 5 DDIM steps traces its body once: one call, of 2 x 3 rows.
  assert [rows for rows, _ in calls] == [6], calls
  # Those rows: the conditional ones, then the null label's (checked eagerly, by value).
  calls.clear()
  fam._sampling_denoiser(counting, 3, 7, 3.0)(jnp.zeros((3, 8, 8, 1)), jnp.full((3,), 50))
  np.testing.assert_array_equal(calls[0][1], [7, 7, 7, NULL, NULL, NULL])


def test_label_dropout_replaces_labels_with_the_null_label_at_its_rate():
  fam = _family(condition={"name": "class", "label_dropout": 0.3})
  y = jnp.arange(20_000, dtype=jnp.int32) % 10
  dropped = np.asarray(fam._labels({"label": y}, jax.random.key(0), 0.3))
  kept = dropped != NULL
  assert abs(1 - kept.mean() - 0.3) < 0.015, kept.mean()
  np.testing.assert_array_equal(dropped[kept], np.asarray(y)[kept])
  np.testing.assert_array_equal(fam._labels({"label": y}, jax.random.key(0), 0.0), y)


def test_bad_sampling_arguments_are_user_errors(denoiser):
  with pytest.raises(UserError, match=r"--label 10: the data's classes are 0 to 9"):
    _sample(_family(), denoiser, label=10)
  with pytest.raises(UserError, match=r"--guidance -1.0"):
    _sample(_family(), denoiser, guidance=-1.0)
  with pytest.raises(UserError, match="unconditional"):
    _sample(_family("none"), denoiser, guidance=2.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two-step runs: a class-conditional tiny DiT and the unconditional tiny MLP."""
  root = tmp_path_factory.mktemp("guidance")
  fast = ["train.steps=2", "train.num_samples=4", "checkpoint.every=0"]
  train(config_lib.load(ROOT / "configs" / "tiny_dit.yaml", fast), root / "dit")
  train(config_lib.load(ROOT / "configs" / "tiny_diffusion.yaml", fast), root / "mlp")
  return root


def test_sample_label_and_guidance_from_the_command_line(runs, tmp_path, capsys):
  out = tmp_path / "sevens.npz"
  with pytest.raises(SystemExit) as e:
    main(["sample", str(runs / "dit"), "--num", "5", "--label", "7", "--guidance", "3",
          "--out", str(out)])
  assert e.value.code == 0
  samples = np.load(out)["samples"]
  assert samples.shape == (5, 8, 8, 1) and np.all(np.isfinite(samples))
  expect_user_error(capsys, ["sample", str(runs / "dit"), "--label", "10", "--out",
                             str(tmp_path / "a.npz")], "--label 10", "0 to 9")
  expect_user_error(capsys, ["sample", str(runs / "mlp"), "--guidance", "2", "--out",
                             str(tmp_path / "b.npz")], "--guidance", "unconditional")
  assert not (tmp_path / "a.npz").exists() and not (tmp_path / "b.npz").exists()


@pytest.mark.slow
@pytest.mark.timeout(QUALITY_TIMEOUT)
def test_dit_digits_draws_the_asked_class_and_beats_a_mixture(tmp_path):
  """`dit_digits.yaml` trained as shipped: `--label K` at the shipped guidance scale gives
  digits a classifier trained on the training digits reads as K (>= 80%), and the guided
  samples beat a GaussianMixture fitted to the training digits in the Frechet distance of
  scaler's digits classifier's features to the held-out digits."""
  from sklearn.mixture import GaussianMixture

  from family_runs import _scaler, digits_classifier, split_data
  from scaler.quality import digits_scores, frechet_distance, digits_classifier as features
  run_dir = tmp_path / "dit_digits"
  out = _scaler("train", str(ROOT / "configs" / "dit_digits.yaml"), "--debug",
                "--run-dir", str(run_dir))
  assert out.returncode == 0, out.stderr[-3000:]
  # Without --label a class-conditional run draws classes 0, 1, ..., 9, 0, ... in turn.
  out = _scaler("sample", str(run_dir), "--num", "500", "--out", str(tmp_path / "all.npz"))
  assert out.returncode == 0, out.stderr[-3000:]
  out = _scaler("sample", str(run_dir), "--num", "100", "--label", "7",
                "--out", str(tmp_path / "sevens.npz"))
  assert out.returncode == 0, out.stderr[-3000:]
  cycle = np.load(tmp_path / "all.npz")["samples"]
  sevens = np.load(tmp_path / "sevens.npz")["samples"]
  clf = digits_classifier()
  read = lambda x: clf.predict(x.reshape(len(x), -1))
  per_class = [float(np.mean(read(cycle[k::10]) == k)) for k in range(10)]
  share_7 = float(np.mean(read(sevens) == 7))
  train_x, _ = split_data("digits", "train")
  test_x, _ = split_data("digits", "test")
  gmm = GaussianMixture(10, random_state=0).fit(train_x.reshape(len(train_x), -1))
  mixture = np.clip(gmm.sample(len(cycle))[0], 0, 16).reshape(cycle.shape)
  ours, theirs = digits_scores(cycle, test_x), digits_scores(mixture, test_x)
  half = len(test_x) // 2
  f = features().features
  floor = frechet_distance(f(test_x[:half]), f(test_x[half:]))
  print(f"dit_digits: read as the asked class {np.mean(per_class):.3f} (per class "
        f"{np.round(per_class, 2).tolist()}), --label 7: {share_7:.2f}; Frechet "
        f"{ours['frechet']:.2f} vs GaussianMixture(10) {theirs['frechet']:.2f} "
        f"(held-out floor {floor:.2f})")
  assert share_7 >= 0.8 and np.mean(per_class) >= 0.8, (share_7, per_class)
  assert ours["frechet"] < theirs["frechet"], (ours, theirs)
