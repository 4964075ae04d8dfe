"""Layers that name the role of each parameter dimension.

Roles are logical axis names (`embed`, `mlp`, `conv_in`, ...). The rule table in the
config maps each role to mesh axes; see `scaler/partitioning.py`. Network code only
ever names roles, so the same network runs data-parallel, FSDP or FSDP + tensor.
"""

from flax import nnx


def roles(*names):
  """Metadata that tags a parameter with one role (or None) per dimension."""
  return {"out_sharding": tuple(names)}


def dense(in_features, out_features, in_role, out_role, *, rngs, use_bias=True, **kw):
  """A Linear layer whose kernel is `(in_role, out_role)` and bias `(out_role,)`."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, rngs=rngs,
      kernel_metadata=roles(in_role, out_role),
      bias_metadata=roles(out_role), **kw)


def conv(in_features, out_features, kernel_size, *, rngs, in_role="conv_in",
         out_role="conv_out", **kw):
  """A Conv layer whose kernel is `(..spatial.., in_role, out_role)`."""
  spatial = (None,) * len(kernel_size)
  return nnx.Conv(
      in_features, out_features, kernel_size, rngs=rngs,
      kernel_metadata=roles(*spatial, in_role, out_role),
      bias_metadata=roles(out_role), **kw)


def group_norm(num_features, num_groups, *, rngs, role="conv_out"):
  """GroupNorm whose scale and bias are `(role,)`."""
  return nnx.GroupNorm(
      num_features, num_groups=num_groups, rngs=rngs,
      scale_metadata=roles(role), bias_metadata=roles(role))


def layer_norm(num_features, *, rngs, role="embed"):
  """LayerNorm whose scale and bias are `(role,)`."""
  return nnx.LayerNorm(
      num_features, rngs=rngs, scale_metadata=roles(role), bias_metadata=roles(role))
