"""Global batches keyed on the step: deterministic, per-process, elastic, prefetched.

The global batch of step s is a pure function of (seed, s): example positions
s*B ... s*B+B-1 of an endless sequence of epochs, each epoch a fresh permutation seeded
by (seed, epoch). No example is skipped or seen twice within an epoch, a batch may
straddle two epochs, and each process gathers only its own contiguous rows with one
fancy-indexing call (no per-example Python). Because nothing but the step is state, a
loader saved on P processes resumes on any other number of them.
"""

import functools

import grain
import numpy as np

from scaler.errors import UserError


class BatchLoader:
  def __init__(self, source, global_batch_size: int, *, seed: int, rows=None,
               prefetch: int = 2):
    """`rows`: the [lo, hi) rows of each global batch this process loads (default all;
    see `scaler.mesh.process_rows`)."""
    if global_batch_size < 1:
      raise UserError(f"train.batch_size={global_batch_size}: needs at least 1")
    self.source, self.seed = source, seed
    self.global_batch = global_batch_size
    self.lo, hi = rows if rows is not None else (0, global_batch_size)
    self.local_batch = hi - self.lo
    self.prefetch = prefetch
    self.step = 0  # the next step whose batch is handed out

  @functools.lru_cache(maxsize=4)
  def _perm(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.source.x))

  def global_indices(self, step: int) -> np.ndarray:
    """Example indices of the global batch of `step`."""
    n = len(self.source.x)
    pos = step * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
    epoch, offset = np.divmod(pos, n)
    out = np.empty_like(pos)
    for e in np.unique(epoch):
      mask = epoch == e
      out[mask] = self._perm(int(e))[offset[mask]]
    return out

  def batch(self, step: int) -> dict:
    """This process's rows of the global batch of `step`."""
    idx = self.global_indices(step)[self.lo:self.lo + self.local_batch]
    out = {"x": self.source.x[idx]}
    if self.source.label is not None:
      out["label"] = self.source.label[idx]
    return out

  def __iter__(self):
    ds = grain.MapDataset.range(self.step, 2**62).map(self.batch).to_iter_dataset()
    if self.prefetch > 0:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=self.prefetch)
    it = iter(ds)
    try:
      while True:
        batch = next(it)
        self.step += 1  # counted when handed out, not when prefetched
        yield batch
    finally:
      close = getattr(it, "close", None)
      if close is not None:
        close()

  def get_state(self) -> dict:
    return {"step": self.step, "seed": self.seed}

  def set_state(self, state: dict) -> None:
    if state.get("seed", self.seed) != self.seed:
      raise UserError(f"the checkpoint's data seed {state['seed']} differs from "
                      f"train.seed={self.seed}; resume with the seed it was trained with")
    self.step = int(state["step"])
