"""Drawing samples from a train state: every process computes, every process gets them."""

import inspect
import zipfile

import jax
import numpy as np
from jax.experimental import multihost_utils

from scaler import partitioning
from scaler import rng as rng_lib
from scaler import state as state_lib
from scaler.errors import UserError


def sample_params(state: state_lib.TrainState) -> dict:
  """The parameters to sample with: the EMA of the sampled networks where the run keeps
  one, the trained parameters for every other network."""
  return {**state.params, **state.ema}


def draw_samples(exp, state: state_lib.TrainState, num: int, seed: int = 0, chunk: int = 0,
                 **kw) -> np.ndarray:
  """`num` samples in model space, gathered to the host of every process.

  Every process must call this: with parameters sharded across processes (fsdp) the
  sampler's computation needs collectives that all of them join. `chunk` numbers the
  calls of one large draw (each gets its own noise). `kw` goes to the family's `sample`
  (a label, a guidance scale, an EBM's `from_buffer`), with the state's extra state as
  `extra`.
  """

  @jax.jit
  def sample(params, rest, extra):
    # The key is made inside: a host-made key would be local to one process.
    rng = jax.random.fold_in(rng_lib.stream(exp.cfg.train.seed, "sample"), seed)
    rng = jax.random.fold_in(rng, chunk)
    return exp.family.sample(state_lib.merge(exp.networks, params, rest), rng, num,
                             extra=extra, **kw)

  # Traced under the run's rules: activations a sampler pins by role (a KV cache by its
  # heads, see partitioning.constrain) are split as the parameters are.
  with partitioning.activation_rules(exp.mesh, exp.rules):
    out = sample(sample_params(state), state.rest, state.extra)
  return np.asarray(multihost_utils.process_allgather(out, tiled=True))


def check_sample_options(exp, target: state_lib.TrainState, **kw) -> None:
  """Refuses sampling options (`label=K`) the family's `sample` does not name or rejects,
  by tracing it on the abstract state: nothing is computed or written first."""
  named = inspect.signature(exp.family.sample).parameters
  for key, value in kw.items():
    if key not in named:
      flag = "--" + key.replace("_", "-")
      raise UserError(f"{flag} {value}: family {exp.cfg.family.name} does not sample by "
                      f"{key}; sample without {flag}")
  jax.eval_shape(lambda params, rest, extra: exp.family.sample(
      state_lib.merge(exp.networks, params, rest), jax.random.key(0), 1, extra=extra, **kw),
      sample_params(target), target.rest, target.extra)


def draw_reconstructions(exp, state: state_lib.TrainState, batch: dict, seed: int = 0):
  """The family's `reconstruct` of a small host batch (held-out examples), on every
  process. The batch enters as a constant: every process holds the same one."""

  @jax.jit
  def reconstruct(params, rest):
    rng = jax.random.fold_in(rng_lib.stream(exp.cfg.train.seed, "sample"), seed)
    return exp.family.reconstruct(state_lib.merge(exp.networks, params, rest), batch, rng)

  out = reconstruct(sample_params(state), state.rest)
  return np.asarray(multihost_utils.process_allgather(out, tiled=True))


class NpyStream:
  """Writes one array into an .npz chunk by chunk (np.load reads it as usual).

  The .npy header needs the final shape, which is known up front; the chunks follow it
  as raw bytes inside the zip member, so memory holds one chunk at a time.
  """

  def __init__(self, path, name: str, shape: tuple, dtype=np.float32):
    self.path, self.name, self.shape, self.dtype = path, name, tuple(shape), np.dtype(dtype)
    self.written = 0

  def __enter__(self):
    self._zip = zipfile.ZipFile(self.path, "w", allowZip64=True)
    self._file = self._zip.open(f"{self.name}.npy", "w", force_zip64=True)
    header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
              "shape": self.shape}
    np.lib.format.write_array_header_2_0(self._file, header)
    return self

  def write(self, chunk: np.ndarray) -> None:
    chunk = np.ascontiguousarray(chunk, self.dtype)
    if chunk.shape[1:] != self.shape[1:] or self.written + len(chunk) > self.shape[0]:
      raise ValueError(f"chunk {chunk.shape} does not fit {self.shape} after {self.written}")
    self._file.write(chunk.tobytes())
    self.written += len(chunk)

  def __exit__(self, *exc):
    self._file.close()
    self._zip.close()
    if exc[0] is None and self.written != self.shape[0]:
      raise ValueError(f"wrote {self.written} of {self.shape[0]} rows")
