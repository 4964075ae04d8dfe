"""All partitioning in one table: the role of a dimension -> mesh axes.

Networks tag each parameter dimension with a role (`embed`, `mlp`, ...). A rule table
maps roles to mesh axes; a preset gives the common ones. Every parameter is checked at
start-up, before anything compiles: an unknown role, a mesh axis used twice, or a
dimension its mesh axes do not divide is a `UserError` naming the parameter.
"""

import contextlib
import contextvars
import math

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scaler.errors import UserError
from scaler.mesh import AXES, BATCH_AXES

ROLES = ("embed", "mlp", "heads", "kv", "conv_in", "conv_out", "vocab", "time", "norm",
         "batch")

_NONE = {r: None for r in ROLES}
# `batch` names a dimension of examples (a replay buffer's rows): split like the batch.
_BATCH = {"batch": BATCH_AXES}
PRESETS = {
    # Every parameter replicated; the batch is split over data (and fsdp).
    "data_parallel": {**_NONE, **_BATCH},
    # ZeRO-3 style: one dimension of every large parameter split over fsdp.
    "fsdp": {**_NONE, **_BATCH, "embed": "fsdp", "conv_out": "fsdp", "vocab": "fsdp"},
    # FSDP plus Megatron-style tensor parallelism on the hidden dimensions.
    "fsdp_tensor": {**_NONE, **_BATCH, "embed": "fsdp", "mlp": "tensor", "heads": "tensor",
                    "conv_in": "fsdp", "conv_out": "tensor", "vocab": "tensor"},
}


def resolve_rules(rules) -> dict:
  """A preset name, or a mapping {preset: NAME (optional), role: axes, ...} -> the table.

  A mapping starts from its preset and overrides single roles, so `rules.embed=null` on
  the command line changes one rule of a preset. Without a preset the mapping must name
  every role the model uses (the parameter check says which one is missing).
  """
  if isinstance(rules, str):
    rules = {"preset": rules}
  rules = dict(rules)
  preset = rules.pop("preset", None)
  if preset is not None and preset not in PRESETS:
    raise UserError(f"unknown rules preset '{preset}'; accepted: {', '.join(PRESETS)}")
  table = dict(PRESETS[preset]) if preset else dict(_BATCH)
  for role, axes in rules.items():
    if role not in ROLES:
      raise UserError(f"rules.{role}: unknown role '{role}'; roles: {', '.join(ROLES)} "
                      "(and 'preset')")
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


def param_shardings(abstract_params, logical_specs, rules: dict, mesh: Mesh, prefix="",
                    replicate_unnamed=False):
  """NamedShardings for a tree of arrays, from their logical specs.

  A parameter must name a role (or None) for every dimension. Non-parameter state
  (`replicate_unnamed`) may name none: an empty spec replicates it.
  """
  def one(path, x, spec):
    if replicate_unnamed and len(spec) == 0:
      return P()
    return mesh_spec(prefix + path_str(path), x.shape, spec, rules, mesh)

  specs = jax.tree_util.tree_map_with_path(one, abstract_params, logical_specs)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def opt_state_shardings(tx, abstract_opt_state, params_shardings, mesh: Mesh):
  """Optimizer moments follow their parameter's sharding; scalars are replicated."""
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()))


def path_str(path) -> str:
  """`('denoiser', 'blocks', 0, 'kernel')` -> `denoiser/blocks/0/kernel`."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


# --- activations ---------------------------------------------------------------------

_ACTIVATION_RULES = contextvars.ContextVar("scaler_activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: dict):
  """While tracing under this, `constrain` pins activations by role on `mesh`, with the
  same rule table as the parameters (the driver traces sampling under it)."""
  token = _ACTIVATION_RULES.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVATION_RULES.reset(token)


def constrain(x, roles: tuple):
  """`x` with its sharding pinned by the roles of its dimensions (a KV cache's heads
  split like the attention's heads); unchanged outside `activation_rules`. A dimension
  its mesh axes do not divide, or whose axes an earlier dimension took, stays whole:
  unlike a parameter's, an activation's size is the user's (the number of samples)."""
  active = _ACTIVATION_RULES.get()
  if active is None:
    return x
  mesh, rules = active
  used, spec = set(), []
  for size, role in zip(x.shape, roles):
    axes = tuple(a for a in _axes_of(rules.get(role)) if a not in used) if role else ()
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
