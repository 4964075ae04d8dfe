"""A checksum of every array in a checkpoint, written at save time, checked after restore.

Tensorstore checks its b-tree nodes but not the data chunks: a flipped bit in a chunk
reads back without a word. So every array of the state gets a 32-bit checksum, computed
on the devices over the global array, and the JSON items a digest; both go into the
checkpoint's `checksums` item, committed with the rest:

    pending = stored(state, data_state, record)   # dispatched; returns at once
    ... ChecksumSave(pending) ...                 # orbax's background thread waits for it
    verify(saved, restored_state, data_state, record)   # raises ChecksumMismatch

The checksum is a sum, with uint32 wraparound, of the array's bytes as 32-bit words, each
first mixed with its position in the global array by murmur3's finalizer (a bijection, so
a change in one word always changes the sum; it spreads high bits down, so two flipped
sign bits do not cancel as they would in a weighted sum). A modular sum is exact in any
order, so the value is the same on any mesh, sharding or process count: a checkpoint
saved on 8 devices verifies on 1 device or on 2 hosts. Every process must take part (the
sums over sharded arrays are collectives), as in a save or a restore.
"""

import dataclasses
import functools
import hashlib
import json
import re
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

ALGORITHM = "fmix32-position-sum-v1"   # stored with the sums; other values are not compared
ITEM = "checksums"
_FILE = "metadata"                      # the file name JsonCheckpointHandler reads back
_GOLDEN = 0x9E3779B9                    # position weight: odd, so no two positions alias
MAX_LISTED = 10


class ChecksumMismatch(ValueError):
  """Restored data differ from what was saved: a corrupt checkpoint, never used."""


# --- the checksum itself ---


def _words(x):
  """The array's bytes as uint32 words, keeping x's dimensions (64-bit types add one).

  Bit casts only, never value conversions: -0.0 and 0.0, or two NaN payloads, differ.
  """
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.iscomplexobj(x):
    x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)   # the parts' own bits
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = jax.dtypes.itemsize_bits(x.dtype)
  if bits < 8:                                          # int4 and friends: exact widening
    x, bits = x.astype(jnp.int8), 8
  if bits in (32, 64):
    return lax.bitcast_convert_type(x, jnp.uint32)
  narrow = {8: jnp.uint8, 16: jnp.uint16}[bits]
  return lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


def _position(shape):
  """Each element's row-major index in the global array, as uint32 (wrapping).

  Built from iotas, not by flattening: a reshape of a sharded array would move data.
  """
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    if shape[dim] > 1:
      index = index + lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride)
    stride = (stride * shape[dim]) % (1 << 32)
  return index


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _checksum(x):
  w = _words(x)
  return jnp.sum(_fmix32(w + _position(w.shape) * jnp.uint32(_GOLDEN)), dtype=jnp.uint32)


def _all_checksums(leaves):
  return jnp.stack([_checksum(x) for x in leaves]) if leaves else jnp.zeros(0, jnp.uint32)


@functools.lru_cache(maxsize=16)
def _jitted(mesh):
  if mesh is None:
    return jax.jit(_all_checksums)
  # Replicated over the arrays' own mesh: every process then holds the values.
  return jax.jit(_all_checksums, out_shardings=NamedSharding(mesh, P()))


def _mesh_of(leaves):
  for x in leaves:
    if isinstance(getattr(x, "sharding", None), NamedSharding):
      return x.sharding.mesh
  return None


def checksums(tree):
  """`(names, sums)`: every array's path (`jax.tree_util.keystr`) and one uint32 vector
  of their checksums on the devices. Dispatched, not awaited: `to_host` waits."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  names = [jax.tree_util.keystr(path) for path, _ in flat]
  leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
  return names, _jitted(_mesh_of(leaves))(leaves)


def to_host(names, sums) -> dict:
  """`{path: int}` from what `checksums` returned (blocks until the devices are done)."""
  return {n: int(v) for n, v in zip(names, np.asarray(sums.addressable_data(0)))}


def _digest(value) -> str:
  # json.dumps of what json.loads read back gives the same text: stable across a round trip.
  return hashlib.sha256(json.dumps(value).encode()).hexdigest()


# --- stored with the checkpoint ---


def stored(state, data_state, record) -> Callable[[], dict]:
  """What the `checksums` item holds, as a function that waits for the devices.

  The sums are dispatched now, before the train loop can donate the state's buffers;
  the function is called from orbax's background thread, so an asynchronous save does
  not wait for them.
  """
  names, sums = checksums(state)
  json_items = {"data": _digest(data_state), "record": _digest(record)}
  return lambda: {"algorithm": ALGORITHM, "arrays": to_host(names, sums), "json": json_items}


def verify(saved: dict, state, data_state, record) -> None:
  """Raises ChecksumMismatch naming every array or JSON item that differs from `saved`."""
  if saved.get("algorithm") != ALGORITHM:
    raise ChecksumMismatch(f"checksums of an unknown kind ({saved.get('algorithm')!r}); "
                           f"this scaler writes {ALGORITHM!r}")
  got = to_host(*checksums(state))
  want = saved.get("arrays", {})
  bad = [f"state{name}" for name, value in got.items() if want.get(name) != value]
  json_items = saved.get("json", {})
  bad += [f"the {name} item" for name, value in (("data", data_state), ("record", record))
          if name in json_items and json_items[name] != _digest(value)]
  _raise_if_any(bad, len(got) + len(json_items))


def verify_part(saved: dict, key: str, tree) -> None:
  """`verify` for the `key` subtree of the state alone (`scaler export` reads the EMA or
  the parameters only), whether the state is a dict or a dataclass."""
  # A tree read back by orbax keys a list index as the string '0' where the state had
  # the integer 0: compare paths with every index written as a string.
  want = {_plain_path(k): v for k, v in saved.get("arrays", {}).items()}
  got = to_host(*checksums(tree))
  bad = [f"state['{key}']{name}" for name, value in got.items()
         if want.get(_plain_path(f"['{key}']{name}"),
                     want.get(_plain_path(f".{key}{name}"))) != value]
  _raise_if_any(bad, len(got))


def _plain_path(path: str) -> str:
  return re.sub(r"\[(\d+)\]", r"['\1']", path)


def _raise_if_any(bad: list[str], total: int) -> None:
  if bad:
    listed = ", ".join(bad[:MAX_LISTED]) + (f" and {len(bad) - MAX_LISTED} more"
                                            if len(bad) > MAX_LISTED else "")
    raise ChecksumMismatch(f"{len(bad)} of {total} restored items differ from the "
                           f"checksums written at save time: {listed}")


class Pending:
  """What `stored` returned, handed over to orbax's background thread once it exists.

  An asynchronous save dispatches the checksums after orbax has copied the arrays, so
  the item's arguments are given before the values can be.
  """

  TIMEOUT_S = 600

  def __init__(self):
    self._ready = threading.Event()
    self._content = None

  def set(self, content: Callable[[], dict]) -> None:
    self._content = content
    self._ready.set()

  def __call__(self) -> dict:
    if not self._ready.wait(self.TIMEOUT_S):
      raise TimeoutError("the checkpoint's checksums were never dispatched")
    return self._content()


class ChecksumHandler(ocp.JsonCheckpointHandler):
  """The `checksums` item: JSON, written once the devices have computed the sums."""

  def __init__(self):
    super().__init__(_FILE)

  async def async_save(self, directory, item=None, args=None):
    async def write():
      content = args.pending()          # waits for the devices, off the train loop
      if ocp.multihost.is_primary_host(0):
        (directory / _FILE).write_text(json.dumps(content))
    return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="scaler_checksums")]


@ocp.args.register_with_handler(ChecksumHandler, for_save=True)
@dataclasses.dataclass
class ChecksumSave(ocp.args.CheckpointArgs):
  pending: Callable[[], dict]


@ocp.args.register_with_handler(ChecksumHandler, for_restore=True)
@dataclasses.dataclass
class ChecksumRestore(ocp.args.CheckpointArgs):
  pass
