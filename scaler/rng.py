"""The run's random streams, one per purpose, all derived from `train.seed`.

With `jax_threefry_partitionable` (on in every scaler process, so numbers do not depend
on the mesh), `split(k)[i] == fold_in(k, i)`. Deriving streams by splitting one key, or
by folding in small integers, therefore makes them collide: the loss key of step 0 was
the first parameter-initialisation key, and step 1's the extra state's. Each stream here
is folded in from a distinct 32-bit tag first, so no stream's keys are another's.

    init      parameters (nnx.Rngs)          train   fold_in(step), then update, micro
    extra     a family's extra state         sample  the final samples and `scaler sample`
    data_init the first-batch initialisation eval    held-out evaluation
"""

import zlib

import jax

STREAMS = ("init", "extra", "data_init", "train", "sample", "eval")


def _tag(name: str) -> int:
  # crc32 of the name: stable across processes and versions, far from small integers.
  return zlib.crc32(f"scaler/{name}".encode()) & 0x7FFFFFFF


def stream(seed: int, name: str) -> jax.Array:
  """The root key of stream `name` (make it inside jit when it must live on a mesh)."""
  if name not in STREAMS:
    raise ValueError(f"unknown random stream {name!r}; known: {STREAMS}")
  return jax.random.fold_in(jax.random.key(seed), _tag(name))


def step_key(train_key: jax.Array, step) -> jax.Array:
  """Step `step`'s key: the random state of a run is its seed and its step."""
  return jax.random.fold_in(train_key, step)
