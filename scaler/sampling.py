"""Drawing samples from a train state: every process computes, every process gets them."""

import jax
import numpy as np
from jax.experimental import multihost_utils

from scaler import rng as rng_lib
from scaler import state as state_lib


def sample_params(state: state_lib.TrainState) -> dict:
  """The parameters to sample with: the EMA of the sampled networks where the run keeps
  one, the trained parameters for every other network."""
  return {**state.params, **state.ema}


def draw_samples(exp, state: state_lib.TrainState, num: int, seed: int = 0, **kw) -> np.ndarray:
  """`num` samples in model space, gathered to the host of every process.

  Every process must call this: with parameters sharded across processes (fsdp) the
  sampler's computation needs collectives that all of them join. `kw` goes to the
  family's `sample` (a label, a guidance scale).
  """

  @jax.jit
  def sample(params, rest):
    # The key is made inside: a host-made key would be local to one process.
    rng = jax.random.fold_in(rng_lib.stream(exp.cfg.train.seed, "sample"), seed)
    return exp.family.sample(state_lib.merge(exp.networks, params, rest), rng, num, **kw)

  out = sample(sample_params(state), state.rest)
  return np.asarray(multihost_utils.process_allgather(out, tiled=True))


def draw_reconstructions(exp, state: state_lib.TrainState, batch: dict, seed: int = 0):
  """The family's `reconstruct` of a small host batch (held-out examples), on every
  process. The batch enters as a constant: every process holds the same one."""

  @jax.jit
  def reconstruct(params, rest):
    rng = jax.random.fold_in(rng_lib.stream(exp.cfg.train.seed, "sample"), seed)
    return exp.family.reconstruct(state_lib.merge(exp.networks, params, rest), batch, rng)

  out = reconstruct(sample_params(state), state.rest)
  return np.asarray(multihost_utils.process_allgather(out, tiled=True))
