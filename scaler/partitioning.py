"""All partitioning in one table: the role of a dimension -> mesh axes.

Networks tag each parameter dimension with a role (`embed`, `mlp`, ...). A rule table
maps roles to mesh axes; a preset gives the common ones. Every parameter is checked at
start-up, before anything compiles: an unknown role, a mesh axis used twice, or a
dimension its mesh axes do not divide is a `UserError` naming the parameter.
"""

import math

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scaler.errors import UserError
from scaler.mesh import AXES

ROLES = ("embed", "mlp", "heads", "kv", "conv_in", "conv_out", "vocab", "time", "norm")

_NONE = {r: None for r in ROLES}
PRESETS = {
    # Every parameter replicated; the batch is split over data (and fsdp).
    "data_parallel": dict(_NONE),
    # ZeRO-3 style: one dimension of every large parameter split over fsdp.
    "fsdp": {**_NONE, "embed": "fsdp", "conv_out": "fsdp", "vocab": "fsdp"},
    # FSDP plus Megatron-style tensor parallelism on the hidden dimensions.
    "fsdp_tensor": {**_NONE, "embed": "fsdp", "mlp": "tensor", "heads": "tensor",
                    "conv_in": "fsdp", "conv_out": "tensor", "vocab": "tensor"},
}


def resolve_rules(rules) -> dict:
  """A preset name or a mapping -> {role: mesh axis, tuple of axes, or None}."""
  if isinstance(rules, str):
    if rules not in PRESETS:
      raise UserError(f"unknown rules preset '{rules}'; accepted: {', '.join(PRESETS)}")
    return dict(PRESETS[rules])
  table = {}
  for role, axes in rules.items():
    if isinstance(axes, list):
      axes = tuple(axes)
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in AXES:
        raise UserError(
            f"rules.{role}: unknown mesh axis {axis!r}; accepted: {', '.join(AXES)} or null")
    table[role] = axes
  return table


def _axes_of(entry):
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def mesh_spec(path: str, shape, logical: P, rules: dict, mesh: Mesh) -> P:
  """Maps one parameter's logical spec to a mesh spec, checking it fits."""
  if len(logical) != len(shape):
    raise UserError(
        f"parameter {path} with shape {tuple(shape)} names {len(logical)} roles "
        f"{tuple(logical)}; it needs one per dimension")
  used, out = set(), []
  for dim, (size, role) in enumerate(zip(shape, logical)):
    if role is None:
      out.append(None)
      continue
    if role not in rules:
      raise UserError(
          f"parameter {path} {tuple(shape)}: role '{role}' of dimension {dim} has no rule; "
          f"the rule table knows: {', '.join(sorted(rules))}")
    axes = _axes_of(rules[role])
    for axis in axes:
      if axis in used:
        raise UserError(
            f"parameter {path} {tuple(shape)} roles {tuple(logical)}: mesh axis '{axis}' "
            f"is used by two dimensions under rule {role} -> {rules[role]}")
      used.add(axis)
    split = math.prod(mesh.shape[a] for a in axes)
    if size % split:
      raise UserError(
          f"parameter {path} {tuple(shape)}: dimension {dim} (role '{role}', size {size}) "
          f"is not divisible by rule {role} -> {rules[role]} = {split} devices")
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def param_shardings(abstract_params, logical_specs, rules: dict, mesh: Mesh, prefix=""):
  """NamedShardings for a tree of parameters, from their logical specs."""
  specs = jax.tree_util.tree_map_with_path(
      lambda path, x, spec: mesh_spec(prefix + path_str(path), x.shape, spec, rules, mesh),
      abstract_params, logical_specs)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def opt_state_shardings(tx, abstract_opt_state, params_shardings, mesh: Mesh):
  """Optimizer moments follow their parameter's sharding; scalars are replicated."""
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()))


def path_str(path) -> str:
  """`('denoiser', 'blocks', 0, 'kernel')` -> `denoiser/blocks/0/kernel`."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
