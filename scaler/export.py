"""Exports a run's weights as a plain orbax checkpoint that needs no scaler to read.

The EMA weights are exported where the run keeps an EMA, else the trained parameters,
as `{net: {...}}` of numpy arrays. To read them back with orbax alone:

    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore("/abs/path/to/export")   # {net: {...: np.ndarray}}

The arrays are read to host memory on one process (an offline step, not for a pod).
"""

import json
import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from scaler import checkpoint_checks as checks
from scaler import checkpoint_checksums as sums
from scaler.errors import UserError

log = logging.getLogger("scaler")


def _verify(step_dir: epath.Path, key: str, weights) -> None:
  """Refuses weights that differ from the checksums the step was saved with."""
  stored = step_dir / sums.ITEM / "metadata"
  if not stored.exists():
    log.warning("checkpoint %s has no checksums (saved by an older scaler): exporting "
                "without verifying its arrays", step_dir)
    return
  try:
    sums.verify_part(json.loads(stored.read_text()), key, weights)
  except sums.ChecksumMismatch as e:
    raise UserError(f"checkpoint {step_dir} is corrupt ({e}); export another step with "
                    "--step") from None


def export(checkpoint_dir: str, step: int | None, out_dir: str) -> str:
  """Writes the weights of `step` (None: the latest committed one) to `out_dir`.

  Returns `out_dir`. Raises UserError for a non-empty `out_dir`, a missing
  step, an unsafe checkpoint directory or arrays that fail their checksums.
  """
  out = epath.Path(checks.absolute(out_dir))
  if out.exists() and not out.is_dir():
    raise UserError(f"export directory {out_dir} exists and is a file; choose a new directory")
  if out.exists() and any(out.iterdir()):
    raise UserError(f"export directory {out_dir} exists and is not empty; choose another")
  checks.check_root(str(checkpoint_dir))
  root = epath.Path(checks.absolute(checkpoint_dir))
  steps = checks.committed_steps(root)
  if step is None and not steps:
    raise UserError(f"no committed checkpoint in {checkpoint_dir}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise UserError(f"no checkpoint at step {step} in {checkpoint_dir}; available steps: "
                    f"{', '.join(map(str, steps)) or 'none'}")
  state_dir = root / str(step) / "state"
  checks.check_step_dir(root, root / str(step))

  with ocp.PyTreeCheckpointer() as reader:
    saved = reader.metadata(state_dir).item_metadata.tree
    key = "ema" if saved.get("ema") else "params"
    # Only the chosen subtree is read, straight into host numpy arrays.
    item = {key: saved[key]}
    restore_args = {key: jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      saved[key])}
    weights = reader.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))[key]
  _verify(root / str(step), key, weights)

  with ocp.StandardCheckpointer() as writer:
    # `force` replaces an existing, empty, directory; non-empty ones were refused above.
    writer.save(out, weights, force=out.exists())
  log.info("exported the %s of step %d from %s to %s", key, step, checkpoint_dir, out_dir)
  return str(out_dir)
