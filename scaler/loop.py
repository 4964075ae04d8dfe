"""The train loop: dispatch steps ahead, check, log, save, stop on preemption.

Steps are dispatched asynchronously, at most `train.max_in_flight` unawaited (XLA:CPU
can hang with more than ~32 that hold collectives). Each step that will be saved is
checked finite first, so a checkpoint never holds NaN or Inf and the retention policy
can never delete the last finite one in favour of a broken one.
"""

import collections
import logging
import time

import jax
import jax.numpy as jnp

from scaler import perf
from scaler import progress
from scaler.data import to_global
from scaler.errors import UserError
from scaler.metrics import MetricsWriter

log = logging.getLogger("scaler")


class NonFiniteError(UserError):
  """Training produced NaN or Inf; the message names the step and the first bad array.

  A UserError: the cause is in the config (a learning rate, a schedule, the data) and a
  restart would repeat it, so the CLI prints one line and the launcher does not retry.
  """


class Preempted(Exception):
  """Stopped on a preemption signal after a committed save; the run is resumable."""

  def __init__(self, step):
    super().__init__(f"preempted at step {step}; checkpoint committed, resume to continue")
    self.step = step


def first_non_finite(tree) -> str | None:
  """The path of the first array in `tree` holding NaN or Inf (host-side, for the error)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf))):
      return jax.tree_util.keystr(path)
  return None


class Loop:
  """Runs steps [start, end) of one run; see `run`."""

  def __init__(self, run, ckpt, compiled, loader, train_key, check_every: int = 0):
    cfg = run.exp.cfg
    self.run_dir, self.ckpt, self.compiled = run.run_dir, ckpt, compiled
    self.loader, self.train_key, self.sharding = loader, train_key, run.batch_sharding
    self.tcfg, self.every = cfg.train, cfg.checkpoint.every
    # 0: finiteness is checked at log and save steps only; --debug checks every step.
    self.check_every = check_every or cfg.train.log_every
    self.flops = perf.per_device_flops(compiled)
    self.compute_dtype = cfg.precision.compute

  def _save_due(self, done: int, end: int) -> bool:
    return done == end or (self.every > 0 and done % self.every == 0)

  def _check(self, done: int, state, metrics) -> dict:
    """The step's metrics on the host; a NonFiniteError if the state went NaN or Inf."""
    values = jax.device_get(metrics)
    if not values.pop("finite"):
      bad = first_non_finite(state) or "a loss or gradient"
      raise NonFiniteError(f"non-finite values at step {done}: first in state{bad}; "
                           "lower optimizer.lr or set optimizer.clip_norm")
    return values

  def run(self, state, batch, batches, start: int, end: int):
    """Trains from `start` to `end` with `batch` as the first batch; returns the final
    state and the last logged metrics."""
    tcfg = self.tcfg
    writer = MetricsWriter(self.run_dir, tcfg.steps, start)
    in_flight = collections.deque()
    last = {}
    t0, t0_step = time.perf_counter(), start
    try:
      for step in range(start, end):
        if step > start:
          batch = to_global(next(batches), self.sharding, tcfg.batch_size)
        state, metrics = self.compiled(state, batch, self.train_key)
        in_flight.append(metrics)
        if len(in_flight) > tcfg.max_in_flight:
          jax.block_until_ready(in_flight.popleft())
        done = step + 1
        # Asked at every step, in order, on every process: JAX's sync point needs that.
        preempted = self.ckpt.reached_preemption(done)
        save = preempted or self._save_due(done, end)
        logged = done % tcfg.log_every == 0 or done == end
        if save or logged or done % self.check_every == 0:
          values = self._check(done, state, metrics)
          if logged:
            elapsed = time.perf_counter() - t0
            rate = (done - t0_step) / max(elapsed, 1e-9)
            values.update(perf.throughput(rate, self.flops, tcfg.batch_size, self.compute_dtype))
            if getattr(self.loader, "bad_records", 0):   # skipped by data.skip_bad_records
              values["data/bad_records"] = self.loader.bad_records
            writer.write(done, values)
            last = {"step": done, **{k: float(v) for k, v in values.items()}}
            t0, t0_step = time.perf_counter(), done
        writer.advance(1)
        progress.beat(done)
        if save:
          self.ckpt.save(done, state, {**self.loader.get_state(), "step": done}, force=True)
        if preempted:
          self.ckpt.wait()
          raise Preempted(done)
      self.ckpt.wait()
    finally:
      writer.close()
    return state, last
