"""Saving and restoring the train state with orbax: asynchronous, sharded, safe to resume.

One directory per committed step. Orbax writes `<step>.orbax-checkpoint-tmp/` and renames
it once every item is written, so a save killed half-way never looks like a step:

    <directory>/<step>/state/      the state pytree (tensorstore OCDBT; each process its shards)
                       data/       the data loader state (JSON)
                       record/     scaler version, mesh, process count, data fingerprint (JSON)
                       checksums/  a checksum of every array, a digest of each JSON item

The data item holds process 0's loader state alone. The loader is keyed on the global
step and the seed, so that one state lets every process rebuild its own position, on any
process count. Restore reads every array straight into the sharding the caller asks for,
so a checkpoint moves between meshes without being gathered on one host. Every restored
array is then checked against its checksum (`scaler/checkpoint_checksums.py`); a mismatch
counts as an unreadable step.

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, record)
    ckpt.save(step, state, loader.get_state())    # every `cfg.every` steps, returns at once
    state, data_state, step = ckpt.restore(abstract_state)   # latest restorable step

SIGTERM is seen only once a distributed runtime runs: see `scaler/checkpoint_preemption.py`.
"""

import logging
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep_lib

from scaler import checkpoint_checks as checks
from scaler import checkpoint_checksums as sums
from scaler import checkpoint_preemption as preemption
from scaler.config import CheckpointConfig
from scaler.errors import UserError

log = logging.getLogger("scaler")

TMP_SUFFIX = ".orbax-checkpoint-tmp"   # how orbax names a step being written

# orbax splits each replicated array among its replicas so that they write in parallel;
# below 1 MiB a slice saves nothing and costs one compiled slice per device and shape
# (56 compiles, about 2 s, at a tiny model's first save on 8 devices).
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
  default = ocp.type_handlers.get_type_handler(jax.Array)
  handler = ocp.type_handlers.ArrayHandler(
      array_metadata_store=getattr(default, "_array_metadata_store", None),
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
  absl_log = logging.getLogger("absl")   # quiet orbax's warning about the override we mean
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_log.setLevel(level)


_register_array_handler()


def _check_config(cfg: CheckpointConfig) -> None:
  if cfg.every < 0:
    raise UserError(f"checkpoint.every={cfg.every}: must be positive, or 0 to save only "
                    "at the end and on preemption")
  if cfg.keep_last < 1:
    raise UserError(f"checkpoint.keep_last={cfg.keep_last}: must be at least 1")
  if cfg.preemption_signal is not None:
    preemption._signal_number(cfg.preemption_signal)  # a bad name fails before training
  if cfg.keep_every < 0:
    raise UserError(f"checkpoint.keep_every={cfg.keep_every}: must be positive, or 0 for off")
  if cfg.keep_every and cfg.every and cfg.keep_every % cfg.every:
    log.warning("checkpoint.keep_every=%d is not a multiple of checkpoint.every=%d: only "
                "steps divisible by both are kept for good", cfg.keep_every, cfg.every)


def _keep_policy(cfg: CheckpointConfig):
  policies = [keep_lib.LatestN(cfg.keep_last)]
  if cfg.keep_every:
    policies.append(keep_lib.EveryNSteps(cfg.keep_every))
  return keep_lib.AnyPreservationPolicy(policies)


def _everyone(ok: bool) -> bool:
  """True when `ok` holds on every process, so all of them restore the same step."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _cut(text: str, limit: int) -> str:
  return text if len(text) <= limit else text[:limit] + " ..."


def _reason(error: Exception) -> tuple[str, str]:
  """(the reason in one line, the details) of a failed restore.

  Orbax wraps tensorstore's error ("OUT_OF_RANGE: Error reading "w/0.0" ...") in one that
  opens with a dump of the tensorstore spec; the innermost cause says what is wrong.
  """
  chain = [error]
  while (cause := chain[-1].__cause__ or chain[-1].__context__) and len(chain) < 10:
    chain.append(cause)
  root = chain[-1]
  lines = str(root).strip().splitlines() or [""]
  reason = _cut(f"{type(root).__name__}: {lines[0]}", 400)
  details = "\n".join(f"{type(e).__name__}: {e}" for e in chain if e is not root or lines[1:])
  return reason, _cut(details, 1500)


class _Manager(ocp.CheckpointManager):
  """orbax's manager, kept away from JAX's preemption sync point.

  orbax asks `reached_preemption(step)` from its finalize thread too, with the step it is
  finalizing: an older one. JAX's sync manager takes every call's step as the current
  one, so such a call can put the agreed stop step behind the loop, which then never
  reaches it (seen under load: SIGTERM caught, no stop). Only the train loop asks JAX,
  once per step, in order; orbax gets the loop's answer.
  """

  preempted_step = None

  def reached_preemption(self, step: int) -> bool:
    return step == self.preempted_step


class Checkpointer:
  """A run's checkpoints: every `cfg.every` steps, the last `cfg.keep_last` kept, plus
  every `cfg.keep_every`-th step for good."""

  def __init__(self, directory: str, cfg: CheckpointConfig, record: dict):
    _check_config(cfg)
    checks.check_root(str(directory))
    # The default run directory, runs/NAME, is relative.
    self.directory = epath.Path(checks.absolute(directory))
    self._cfg = cfg
    self._record = dict(record)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_keep_policy(cfg),
        enable_async_checkpointing=cfg.async_save,
        # Not orbax's clean-up at start: a reader (`scaler sample`) would delete the
        # temporary directory of a run saving beside it. See `_clear_leftovers`.
        cleanup_tmp_directories=False,
        create=True)
    # Handlers named up front: a fresh process (a resume, `scaler sample`) must be able to
    # read item metadata before it has saved or restored anything itself.
    handlers = {"state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "record": ocp.JsonCheckpointHandler(),
                sums.ITEM: sums.ChecksumHandler()}
    self._mngr = _Manager(self.directory, item_handlers=handlers, options=options)
    self._saved = set()       # steps written by this process
    self._cleared = False
    self._committed = set()   # steps seen with orbax's commit file (never uncommitted again)
    self._uncommitted = set()  # step directories without it, each reported once
    self._unrestorable = {}    # step -> why it could not be restored, for `_set_aside_newer`
    if not preemption.runtime_started():
      log.debug("no distributed runtime: SIGTERM will not be detected "
               "(scaler.checkpoint_preemption.start_runtime starts one)")

  # --- saving ---

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Saves when `step` is a multiple of `cfg.every` or `force`; True if it saved.

    Asynchronous when `cfg.async_save`: returns once the arrays are copied off the
    devices. A failure of an earlier background save is raised here.
    """
    self._raise_background_error()
    due = force or (self._cfg.every > 0 and step % self._cfg.every == 0)
    if not due or step in self._saved:
      return False
    if not self._cleared:
      self._clear_leftovers()
    self._set_aside_newer(step)
    checksums = sums.Pending()
    if not self._cfg.async_save:   # orbax's save returns only once the item is written
      checksums.set(sums.stored(state, data_state, self._record))
    # `force=True` bypasses orbax's own save-interval policy: the decision is made above.
    self._mngr.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        record=ocp.args.JsonSave(self._record),
        **{sums.ITEM: sums.ChecksumSave(checksums)}))
    if self._cfg.async_save:
      # Dispatched once orbax has copied the arrays off the devices, so that the two do
      # not compete; still before the loop's next step can donate the state's buffers.
      checksums.set(sums.stored(state, data_state, self._record))
    self._saved.add(step)
    return True

  def _raise_background_error(self) -> None:
    # Only once the finalize thread is done: asking the async checkpointer earlier could
    # take its error away from orbax's finalize thread, which would then go on to delete
    # older steps as if the save had succeeded.
    if not self._mngr.is_saving_in_progress():
      self.wait()

  def _clear_leftovers(self) -> None:
    """Deletes what killed saves left behind, at this writer's first save."""
    if jax.process_index() == 0:
      for path in self.directory.glob(f"*{TMP_SUFFIX}*"):
        log.info("removing %s, left by a save that did not finish", path)
        path.rmtree()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("scaler_checkpoint_clear_leftovers")
    self._cleared = True

  def _set_aside_newer(self, step: int) -> None:
    """Moves steps >= `step` left by an abandoned run aside before saving over them.

    They exist after resuming from an older step (explicitly, or past a corrupt one).
    Left in place, orbax would refuse to save their step numbers and the next restart
    would take them for the latest. Renamed, not deleted: nothing is lost.
    """
    newer = [s for s in self._mngr.all_steps() if s >= step and s not in self._saved]
    if not newer:
      return
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for s in newer:
        target = self.directory / f"{s}.abandoned-{stamp}"
        log.warning("checkpoint step %d in %s %s; moving it to %s before saving step %d",
                    s, self.directory, self._why_set_aside(s), target, step)
        (self.directory / str(s)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("scaler_checkpoint_set_aside")
    self._mngr.reload()

  def _why_set_aside(self, step: int) -> str:
    if step in self._unrestorable:
      return f"could not be restored ({self._unrestorable[step]})"
    if step in self._uncommitted:
      return f"has no commit marker ({checks.COMMIT_FILE}): its save never finished"
    return ("is newer than the step this run resumed from (a later run from an earlier "
            "step, e.g. --resume-from, abandons it)")

  def wait(self) -> None:
    """Blocks until the last save is committed; raises the error of a failed one."""
    try:
      self._mngr.wait_until_finished()
      self._mngr.check_for_errors()
    except BaseException:
      # Orbax dropped the steps this save would have retired from its list, but a failed
      # save deletes nothing on disk: read the list again so it tells the truth.
      self._mngr.reload()
      raise

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._mngr.close()

  def reached_preemption(self, step: int) -> bool:
    """True when every process agrees to stop at `step` after a SIGTERM (call each step)."""
    if not preemption.reached(step):
      return False
    self._mngr.preempted_step = step
    return True

  # --- listing ---

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first; a step directory without orbax's commit file (a
    save in flight, or one killed mid-rename on an object store) is left out."""
    steps = []
    for s in sorted(self._mngr.all_steps()):
      if s not in self._committed and checks.is_committed(self.directory / str(s)):
        self._committed.add(s)
      if s in self._committed:
        steps.append(s)
      elif s not in self._uncommitted:
        self._uncommitted.add(s)
        if jax.process_index() == 0:
          log.warning("checkpoint step %d in %s has no commit marker (%s): its save did not "
                      "finish (killed, or the directory was copied without the marker), or "
                      "another process is still writing it; skipping it", s, self.directory,
                      checks.COMMIT_FILE)
    return steps

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  # --- restoring ---

  def restore(self, abstract_state, step: int | None = None):
    """Restores `(state, data_state, step)` into the shardings of `abstract_state`.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set; the mesh
        may differ from the one saved.
      step: a committed step, or None for the latest one that restores. A latest step
        that fails to read is reported in a warning and the previous one is tried.

    Raises:
      UserError: no such step (the message lists those available), arrays whose paths
        or shapes differ from the checkpoint (listed), or nothing restorable.
    """
    self.wait()
    self._mngr.reload()
    steps = self.all_steps()
    if step is not None and step not in steps:
      raise UserError(f"no checkpoint at step {step} in {self.directory}; available steps: "
                      f"{', '.join(map(str, steps)) or 'none'}")
    if not steps:
      raise UserError(f"no checkpoint to restore in {self.directory}")
    problems = []
    for s in [step] if step is not None else reversed(steps):
      error, result = None, None
      try:
        result = self._restore_step(abstract_state, s)
      except UserError:
        raise
      except Exception as e:  # a truncated, missing or corrupt file surfaces as many types
        error = e
      if _everyone(error is None):
        # Verified once every process has its arrays: the checksums are collectives, and
        # their values global, so every process reaches the same verdict.
        error = self._verify(s, *result)
        if error is None:
          self._saved = {x for x in self._saved if x <= s}   # later ones are abandoned
          return result[0], result[1], s
      reason, details = _reason(error) if error else ("failed on another process", "")
      self._unrestorable[s] = reason
      problems.append(f"  step {s}: {reason}")
      if step is not None:
        raise UserError(f"checkpoint step {step} in {self.directory} cannot be restored: "
                        f"{reason}") from error
      log.warning("\n%s\nCHECKPOINT STEP %d IN %s CANNOT BE RESTORED: %s\nTrying the "
                  "previous step.%s\n%s", "!" * 78, s, self.directory, reason,
                  f" Details:\n{details}" if details else "", "!" * 78)
    raise UserError(f"no checkpoint in {self.directory} can be restored:\n" + "\n".join(problems))

  def _restore_step(self, abstract_state, step: int):
    checks.check_step_dir(self.directory, self.directory / str(step))
    saved = self._mngr.item_metadata(step)["state"]
    saved_tree = getattr(saved, "tree", saved)
    if not jax.tree.leaves(saved_tree):
      raise ValueError("the state's array metadata is missing or empty")
    mismatches = checks.shape_mismatches(saved_tree, abstract_state)
    if mismatches:
      raise UserError(f"checkpoint step {step} in {self.directory} does not fit the model "
                      "(a different architecture or optimizer?); arrays that differ:\n"
                      + "\n".join(mismatches))
    items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore(),
             "record": ocp.args.JsonRestore()}
    if (self.directory / str(step) / sums.ITEM).exists():
      items[sums.ITEM] = sums.ChecksumRestore()
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    self._compare_record(step, restored["record"], restored["data"])
    return restored["state"], restored["data"], restored["record"], restored.get(sums.ITEM)

  def _verify(self, step: int, state, data_state, record, saved) -> Exception | None:
    """The ChecksumMismatch of a restored step, or None when it is intact."""
    if saved is None:
      log.warning("checkpoint step %d in %s has no checksums (saved by an older scaler): "
                  "restored without verifying its arrays", step, self.directory)
      return None
    try:
      sums.verify(saved, state, data_state, record)
    except sums.ChecksumMismatch as e:
      return e
    return None

  def _compare_record(self, step: int, saved: dict, data_state) -> None:
    """Warns where the checkpoint was written against other data than this run's."""
    key = "data_fingerprint"
    if key in saved and key in self._record and saved[key] != self._record[key]:
      log.warning("checkpoint step %d was saved with %s=%s, this run has %s", step, key,
                  saved[key], self._record[key])
    if isinstance(data_state, dict) and data_state.get("step", step) != step:
      log.warning("checkpoint step %d holds a data loader state for step %s", step,
                  data_state["step"])
