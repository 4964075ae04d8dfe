"""Global batches keyed on the step: deterministic, per-process, elastic, streamed.

The global batch of step s is a pure function of (seed, s): example positions
s*B ... s*B+B-1 of an endless sequence of epochs, each epoch a fresh permutation seeded
by (seed, epoch). No example is skipped or seen twice within an epoch, a batch may
straddle two epochs, and each process reads only its own contiguous rows of it, from
the source's files (no per-process copy of the dataset). Because nothing but the step
is state, a loader saved on P processes resumes on any other number of them.

Batches are built by grain: `threads` batches at once in this process, or in
`workers` grain worker processes (each builds whole batches: decoding, conversion to
float32, normalisation), `prefetch` ahead. Grain hands them back in step order, so
the sequence does not depend on either setting.
"""

import itertools

import numpy as np

from scaler.errors import UserError


class StepBatches:
  """step -> (this process's rows of the global batch of `step`, records replaced).

  A plain picklable object: grain sends it to its worker processes, which rebuild the
  source's readers from file names and offsets (never from the data itself).
  """

  def __init__(self, source, global_batch: int, seed: int, lo: int, hi: int):
    self.source, self.global_batch, self.seed, self.lo, self.hi = source, global_batch, seed, lo, hi
    self._perms = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 2:  # a batch spans at most two epochs unless B > N
        self._perms.pop(next(iter(self._perms)))
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
    return self._perms[epoch]

  def global_indices(self, step: int) -> np.ndarray:
    """Positions in the split of the examples of the global batch of `step`."""
    n = len(self.source)
    pos = step * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
    epoch, offset = np.divmod(pos, n)
    out = np.empty_like(pos)
    for e in np.unique(epoch):
      mask = epoch == e
      out[mask] = self._perm(int(e))[offset[mask]]
    return out

  def __call__(self, step: int):
    rows = self.source.read(self.global_indices(step)[self.lo:self.hi])
    return self.source.batch(rows), rows.bad

  def __getstate__(self):
    return {**self.__dict__, "_perms": {}}


class BatchLoader:
  def __init__(self, source, global_batch_size: int, *, seed: int, rows=None,
               prefetch: int | None = None, threads: int | None = None,
               workers: int | None = None):
    """`rows`: the [lo, hi) rows of each global batch this process loads (default all;
    see `scaler.mesh.process_rows`). `prefetch`, `threads`, `workers`: default the
    source's (`data.prefetch`, `data.threads`, `data.workers`)."""
    if global_batch_size < 1:
      raise UserError(f"train.batch_size={global_batch_size}: needs at least 1")
    self.source, self.seed = source, seed
    self.global_batch = global_batch_size
    lo, hi = rows if rows is not None else (0, global_batch_size)
    self.lo, self.local_batch = lo, hi - lo
    opts = source.options
    self.prefetch = opts.prefetch if prefetch is None else prefetch
    self.threads = opts.threads if threads is None else threads
    self.workers = opts.workers if workers is None else workers
    self.fn = StepBatches(source, global_batch_size, seed, lo, hi)
    self.step = 0          # the next step whose batch is handed out
    self.bad_records = 0   # records replaced so far in this process (skip_bad_records)

  def global_indices(self, step: int) -> np.ndarray:
    return self.fn.global_indices(step)

  def batch(self, step: int) -> dict:
    """This process's rows of the global batch of `step`."""
    batch, bad = self.fn(step)
    self.bad_records += bad
    return batch

  def _pipeline(self):
    import grain  # imported here: the worker processes need not import it twice
    if self.prefetch == 0 and self.workers == 0:
      return map(self.fn, itertools.count(self.step))
    ds = grain.MapDataset.range(self.step, 2**62).map(self.fn)
    threads = max(1, self.threads)
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=max(self.prefetch, threads)))
    if self.workers:
      from absl import flags
      if not flags.FLAGS.is_parsed():
        # grain reads its absl flags when it starts workers; outside an absl app
        # nothing has parsed them, so take their defaults.
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.workers,
          per_worker_buffer_size=max(1, -(-self.prefetch // self.workers))))
    return iter(ds)

  def __iter__(self):
    it = self._pipeline()
    try:
      while True:
        batch, bad = next(it)
        if self.workers:
          # Out of the workers' shared memory at once: its blocks are freed when the
          # copy is made, not whenever the step's arrays let go of them.
          batch = {k: np.array(v) for k, v in batch.items()}
        self.bad_records += bad
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
