"""The device mesh, from config: axes `data`, `fsdp`, `tensor`, checked before compiling."""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scaler.config import MeshConfig
from scaler.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 and checks that the axes multiply to the device count."""
  sizes = {a: getattr(cfg, a) for a in AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise UserError(f"mesh.{axis}={size}: each axis needs a positive size, or -1 for the rest")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise UserError(f"mesh: only one axis may be -1, got {', '.join(free)}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise UserError(
          f"mesh: {num_devices} devices cannot be split with "
          f"{' x '.join(f'{a}={s}' for a, s in sizes.items() if s != -1)} (product {fixed})")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise UserError(
        f"mesh: data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = "
        f"{math.prod(sizes.values())} devices, but {num_devices} are available")
  return tuple(sizes[a] for a in AXES)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(cfg, len(devices))
  if cfg.dcn:
    return Mesh(hybrid_grid(shape, cfg.dcn, devices), AXES)
  try:
    # Topology-aware order on GPU/TPU; on CPU it is the plain order.
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


def hybrid_grid(shape: tuple[int, ...], dcn: dict, devices) -> np.ndarray:
  """The devices for a mesh of `shape` whose axes span `dcn[axis]` slices each.

  A slice is a TPU slice (its devices' `slice_index`), else a process (GPU nodes, and
  CPU processes in tests). Each axis's size is dcn x ici: the slices' grid times one slice's
  devices, laid out by JAX's hybrid mesh helper so that only the dcn part of an axis
  crosses the slower network.
  """
  outer = tuple(dcn.get(a, 1) for a in AXES)
  for axis, size, n in zip(AXES, shape, outer):
    if size % n:
      raise UserError(f"mesh.dcn.{axis}={n} does not divide mesh.{axis}={size}: an axis's "
                      "size is its slices (dcn) times the devices within one")
  by_slice = devices[0].platform == "tpu" and hasattr(devices[0], "slice_index")
  unit, units = ("slice", "slices") if by_slice else ("process", "processes")
  granules = {}
  for d in devices:
    granules.setdefault(d.slice_index if by_slice else d.process_index, []).append(d)
  if math.prod(outer) != len(granules):
    raise UserError(
        f"mesh.dcn: {' x '.join(f'{a}={n}' for a, n in zip(AXES, outer))} = "
        f"{math.prod(outer)} {units}, but the {len(devices)} devices are in "
        f"{len(granules)} {units if len(granules) > 1 else unit}; the dcn sizes must multiply "
        f"to the {unit} count")
  inner = tuple(size // n for size, n in zip(shape, outer))
  sizes = sorted({len(g) for g in granules.values()})
  if sizes != [math.prod(inner)]:
    raise UserError(
        f"mesh.dcn: each {unit} would hold {' x '.join(map(str, inner))} = "
        f"{math.prod(inner)} devices of the mesh, but they hold "
        f"{', '.join(map(str, sizes))}")
  return mesh_utils.create_hybrid_device_mesh(inner, outer, devices,
                                              process_is_granule=not by_slice)


def batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(mesh: Mesh, batch_size: int, micro_batches: int, repeat: int = 1) -> None:
  """The global batch, each update's slice of it (`repeat`, e.g. a WGAN's n_critic) and
  each micro-batch of a slice must split evenly over data x fsdp."""
  shards = batch_shards(mesh)
  if micro_batches < 1:
    raise UserError(f"train.micro_batches={micro_batches}: must be at least 1")
  parts = micro_batches * repeat
  what = f"train.micro_batches={micro_batches}" + (
      f" x {repeat} updates on slices of the batch" if repeat > 1 else "")
  if batch_size % parts:
    raise UserError(f"train.batch_size={batch_size} is not divisible by {what} = {parts}")
  micro = batch_size // parts
  if micro % shards:
    raise UserError(
        f"train.batch_size={batch_size} (micro-batch {micro}) is not divisible by "
        f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {shards}; "
        f"use a multiple of {shards * parts}")


def process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """The rows [lo, hi) of each global batch that this process's devices hold.

  Computed from the batch sharding, not from the process index: when a non-batch axis
  (tensor) spans processes, several processes hold the same rows and each loads them.
  """
  sharding = batch_sharding(mesh)
  spans = [idx[0].indices(global_batch)[:2]
           for idx in sharding.addressable_devices_indices_map((global_batch,)).values()]
  lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
  covered = set()
  for a, b in spans:
    covered.update(range(a, b))
  if covered != set(range(lo, hi)):
    raise UserError(
        f"mesh {dict(mesh.shape)}: this process's devices hold rows of the batch that are "
        "not one contiguous block; order the devices so that each process holds one block "
        "(put the process-spanning axes first: data, then fsdp)")
  return lo, hi


def check_batch_rows(mesh: Mesh) -> None:
  """Fails at start-up, with the reason, where a batch could not be assembled."""
  process_rows(mesh, batch_shards(mesh) * 8)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
