"""The run's random streams never share keys (issue: split(k)[i] == fold_in(k, i))."""

import jax
import numpy as np
from flax import nnx

from scaler import rng as rng_lib


def _data(key):
  return tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())


def test_streams_and_their_first_keys_are_pairwise_distinct():
  seed = 0
  keys = {}
  init = nnx.Rngs(rng_lib.stream(seed, "init"))
  for i in range(8):
    keys[f"init {i}"] = init()            # the keys parameter initialisers draw
  keys["extra"] = rng_lib.stream(seed, "extra")
  train = rng_lib.stream(seed, "train")
  for step in range(8):
    step_key = rng_lib.step_key(train, step)
    for update in range(3):              # the step folds in the update's index
      keys[f"train {step}/{update}"] = jax.random.fold_in(step_key, update)
  for name in ("sample", "data_init", "eval"):
    keys[name] = rng_lib.stream(seed, name)
  seen = {}
  for name, key in keys.items():
    assert _data(key) not in seen, f"{name} collides with {seen.get(_data(key))}"
    seen[_data(key)] = name


def test_the_old_derivation_collided():
  # What the streams replace: one key split for init and extra, fold_in(step) for training.
  root = jax.random.key(0)
  init_rng, extra_rng = jax.random.split(root)
  assert _data(jax.random.fold_in(root, 0)) == _data(init_rng)
  assert _data(jax.random.fold_in(root, 1)) == _data(extra_rng)
  assert _data(rng_lib.step_key(rng_lib.stream(0, "train"), 0)) != _data(init_rng)


def test_streams_depend_on_the_seed():
  assert _data(rng_lib.stream(0, "init")) != _data(rng_lib.stream(1, "init"))
