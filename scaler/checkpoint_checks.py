"""Checks made before a checkpoint on disk is trusted: where it lives, whether it was
committed, and whether its arrays fit the model that asks for them."""

import os

import jax
import numpy as np
from etils import epath

from scaler.errors import UserError

# Orbax writes this file into the temporary directory just before the rename that
# commits a step (and as the commit itself on object stores), so its presence is the
# one sign that a step directory was finished.
COMMIT_FILE = "commit_success.txt"
MAX_LISTED = 20


def is_local(path) -> bool:
  return "://" not in str(path)


def absolute(path) -> str:
  """A local path made absolute (orbax refuses relative ones); URLs as they are.

  abspath, not realpath: symbolic links are refused by the checks, not followed here.
  """
  return os.path.abspath(path) if is_local(path) else str(path)


def check_root(directory: str) -> None:
  """Refuses a checkpoint root that is a symbolic link (object stores have none)."""
  if is_local(directory) and os.path.islink(directory):
    raise UserError(
        f"checkpoint directory {directory} is a symbolic link (to "
        f"{os.path.realpath(directory)}); point checkpoint.directory at the real directory")


def check_step_dir(root: epath.Path, step_dir: epath.Path) -> None:
  """Refuses a step directory with anything under it, at any depth, that resolves
  outside the root (tensorstore would follow a symbolic link wherever it points)."""
  if not is_local(root):
    return
  real_root = os.path.realpath(root)

  def check(path) -> str:
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
      raise UserError(f"checkpoint path {path} resolves to {real}, outside the checkpoint "
                      f"directory {real_root}; refusing to read it")
    return real

  # Every path as a reader would open it, links followed (one that stays inside the root
  # may lead to another that does not); each real directory is walked once, so a link
  # back to an ancestor ends the walk instead of looping.
  seen = {check(step_dir)}
  for parent, dirs, files in os.walk(step_dir, followlinks=True):
    for name in files:
      check(os.path.join(parent, name))
    fresh = []
    for name in dirs:
      real = check(os.path.join(parent, name))
      if real not in seen:
        seen.add(real)
        fresh.append(name)
    dirs[:] = fresh


def is_committed(step_dir: epath.Path) -> bool:
  return (step_dir / COMMIT_FILE).exists()


def committed_steps(root: epath.Path) -> list[int]:
  """Committed steps in a directory laid out by `Checkpointer` (plain step numbers)."""
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and is_committed(p))


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flat_shapes(tree) -> dict:
  """`{"params/net/w": shape}` for arrays or saved metadata alike.

  Orbax's metadata holds a NamedTuple (an optax state) as a dict of its fields and a
  tuple as a list, so keys are compared by name or index alone.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {"/".join(_key_name(k) for k in path): _stored_shape(leaf) for path, leaf in leaves}


def _stored_shape(leaf) -> tuple:
  """The shape as orbax stores it: a typed PRNG key array as its key data (one more dim)."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data,
                                jax.ShapeDtypeStruct(leaf.shape, dtype)).shape)
  return tuple(getattr(leaf, "shape", np.shape(leaf)))


def shape_mismatches(saved_metadata, abstract_state) -> list[str]:
  """One line per array whose path or shape differs between the checkpoint and the model."""
  saved, expected = flat_shapes(saved_metadata), flat_shapes(abstract_state)
  lines = []
  for path in sorted(saved.keys() | expected.keys()):
    if path not in saved:
      lines.append(f"  {path}: missing from the checkpoint, expected {expected[path]}")
    elif path not in expected:
      lines.append(f"  {path}: saved {saved[path]}, not in the model")
    elif saved[path] != expected[path]:
      lines.append(f"  {path}: saved {saved[path]}, expected {expected[path]}")
  if len(lines) > MAX_LISTED:
    lines = lines[:MAX_LISTED] + [f"  ... and {len(lines) - MAX_LISTED} more"]
  return lines
