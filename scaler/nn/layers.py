"""Layers that name the role of each parameter dimension and honour the precision policy.

Roles are logical axis names (`embed`, `mlp`, `conv_in`, ...). The rule table in the
config maps each role to mesh axes; see `scaler/partitioning.py`. Network code only
ever names roles, so the same network runs data-parallel, FSDP or FSDP + tensor.

Precision: every helper takes the run's `Precision` as a required keyword, so a network
cannot forget it. Parameters (and so the optimizer state) are stored in
`precision.params` (float32: master weights); matmuls and convolutions run in
`precision.compute` (bfloat16 on accelerators). Normalisation statistics are computed in
float32 by flax whatever the compute dtype, and `attention` takes its softmax in float32.
A network casts its inputs with
`precision.cast` on entry and returns `precision.output(y)` (float32), so losses,
softmaxes over outputs and reductions in the families are float32 without any cast there.

Activation checkpointing: a network calls each block through `checkpointed(mode)`, or a
stack of identical blocks through `chain(blocks, mode, x, ...)`, where `mode` is its
config's `remat`: "none" keeps every activation; "block" keeps only each block's inputs
and recomputes the rest in the backward pass; "dots_saveable" keeps the outputs of matmuls
without batch dimensions (recomputing elementwise work only). `chain` runs a rematted
stack as one `lax.scan` over the blocks' stacked variables, so that the compiler cannot
move a block's recomputation away from its backward pass (see `chain`).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from scaler import partitioning

REMAT = ("none", "block", "dots_saveable")
_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Precision:
  params: jnp.dtype = jnp.float32
  compute: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, cfg) -> "Precision":
    return cls(jnp.dtype(cfg.params), jnp.dtype(cfg.compute))

  def cast(self, x):
    """A network's floating inputs, in the compute dtype."""
    return x.astype(self.compute) if jnp.issubdtype(x.dtype, jnp.floating) else x

  def output(self, x):
    """A network's output, in float32 for the family's loss."""
    return x.astype(jnp.float32)


FLOAT32 = Precision()


def roles(*names):
  """Metadata that tags a variable with one role (or None) per dimension."""
  return {"out_sharding": tuple(names)}


def dense(in_features, out_features, in_role, out_role, *, precision: Precision, rngs,
          use_bias=True, **kw):
  """A Linear layer whose kernel is `(in_role, out_role)` and bias `(out_role,)`."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, rngs=rngs,
      dtype=precision.compute, param_dtype=precision.params,
      kernel_metadata=roles(in_role, out_role),
      bias_metadata=roles(out_role), **kw)


def dense_general(in_features, out_features, in_roles, out_roles, *, precision: Precision,
                  rngs, axis=-1, **kw):
  """A LinearGeneral over several dimensions: kernel `(*in_roles, *out_roles)`.

  Attention names heads and head width as separate dimensions, so the rules can split
  heads over `tensor` and leave each head whole: `in_features=E, out_features=(3, A, K)`
  with roles `("embed",)`, `(None, "heads", "kv")` is a fused q/k/v projection.
  """
  return nnx.LinearGeneral(
      in_features, out_features, axis=axis, rngs=rngs,
      dtype=precision.compute, param_dtype=precision.params,
      kernel_metadata=roles(*in_roles, *out_roles),
      bias_metadata=roles(*out_roles), **kw)


def attention(q_BxTxAxK, k_BxSxAxK, v_BxSxAxK):
  """Multi-head attention, (B, T, A, K) -> (B, T, A, K), in the inputs' dtype.

  jax.nn.dot_product_attention takes the logits and the softmax in float32 whatever the
  inputs' dtype (bf16 logits lose the small differences the softmax exponentiates), and
  picks cuDNN's fused kernel on GPUs that have it, XLA's einsums elsewhere.
  """
  return jax.nn.dot_product_attention(q_BxTxAxK, k_BxSxAxK, v_BxSxAxK)


def conv(in_features, out_features, kernel_size, *, precision: Precision, rngs,
         in_role="conv_in", out_role="conv_out", **kw):
  """A Conv layer whose kernel is `(..spatial.., in_role, out_role)`."""
  spatial = (None,) * len(kernel_size)
  return nnx.Conv(
      in_features, out_features, kernel_size, rngs=rngs,
      dtype=precision.compute, param_dtype=precision.params,
      kernel_metadata=roles(*spatial, in_role, out_role),
      bias_metadata=roles(out_role), **kw)


def conv_transpose(in_features, out_features, kernel_size, *, precision: Precision, rngs,
                   in_role="conv_in", out_role="conv_out", **kw):
  """A ConvTranspose layer whose kernel is `(..spatial.., in_role, out_role)`."""
  spatial = (None,) * len(kernel_size)
  return nnx.ConvTranspose(
      in_features, out_features, kernel_size, rngs=rngs,
      dtype=precision.compute, param_dtype=precision.params,
      kernel_metadata=roles(*spatial, in_role, out_role),
      bias_metadata=roles(out_role), **kw)


def embed(num_embeddings, features, num_role, feature_role, *, precision: Precision, rngs,
          **kw):
  """An embedding table `(num_role, feature_role)`: classes, tokens or positions."""
  return nnx.Embed(
      num_embeddings, features, rngs=rngs, dtype=precision.compute,
      param_dtype=precision.params, embedding_metadata=roles(num_role, feature_role), **kw)


def label_embed(num_classes, features, feature_role, *, precision: Precision, rngs):
  """The class embedding of a conditional network: num_classes + 1 rows, the last one the
  null label that classifier-free guidance trains and samples with; None when
  `num_classes` is 0 (an unconditional network has no such parameter)."""
  if not num_classes:
    return None
  return embed(num_classes + 1, features, None, feature_role, precision=precision, rngs=rngs,
               embedding_init=nnx.initializers.normal(0.02))


def add_label(label_embed, emb_BxT, y_B, num_classes):
  """emb + the label's embedding; y_B None is the null label (unconditional)."""
  if label_embed is None:
    return emb_BxT
  if y_B is None:
    y_B = jnp.full(emb_BxT.shape[:1], num_classes, jnp.int32)
  return emb_BxT + label_embed(y_B)


def group_norm(num_features, num_groups, *, precision: Precision, rngs, role="conv_out",
               **kw):
  """GroupNorm whose scale and bias are `(role,)`."""
  return nnx.GroupNorm(
      num_features, num_groups=num_groups, rngs=rngs,
      dtype=precision.compute, param_dtype=precision.params,
      scale_metadata=roles(role), bias_metadata=roles(role), **kw)


def layer_norm(num_features, *, precision: Precision, rngs, role="embed", **kw):
  """LayerNorm whose scale and bias are `(role,)`."""
  return nnx.LayerNorm(
      num_features, rngs=rngs, dtype=precision.compute, param_dtype=precision.params,
      scale_metadata=roles(role), bias_metadata=roles(role), **kw)


def batch_norm(num_features, *, precision: Precision, rngs, role="conv_out", **kw):
  """BatchNorm whose scale, bias and running statistics are `(role,)`.

  The running mean and variance are non-parameter state: the train step writes them
  back after every update and shards them by `role` like the scale they normalise.
  """
  bn = nnx.BatchNorm(
      num_features, rngs=rngs, dtype=precision.compute, param_dtype=precision.params,
      scale_metadata=roles(role), bias_metadata=roles(role), **kw)
  bn.mean.set_metadata(**roles(role))
  bn.var.set_metadata(**roles(role))
  return bn


def checkpointed(mode: str):
  """`call(block, *args)`: calls `block(*args)` under the activation-checkpoint `mode`."""
  if mode not in REMAT:
    raise ValueError(f"remat mode {mode!r}; known: {REMAT}")
  if mode == "none":
    return lambda block, *args: block(*args)
  return nnx.remat(lambda block, *args: block(*args), policy=_POLICIES[mode])


def chain(blocks, mode: str, x, *args):
  """`x` through `blocks` in order, `x = block(x, *args)`, under the remat `mode`.

  With remat on, blocks that are the same module with only different variables (a
  transformer's or an MLP's stack) run as one `lax.scan` whose body is the rematted block,
  over their variables stacked on a new leading axis (a copy of the blocks' parameters,
  sliced one block per iteration: under FSDP each iteration gathers one block's). The
  scan is what makes the recomputation happen where it should: unrolled, each block
  under its own `jax.checkpoint`, XLA is free to schedule a block's recomputation as soon
  as its input exists, and XLA:CPU's schedulers do, placing it beside the forward pass
  (and the weight gradients after the whole backward pass), so the rematerialised
  activations of every block are live at once and the compiled step is no smaller than
  without remat. In a scan's backward loop each iteration recomputes one block and
  finishes its gradients. Blocks that differ in structure, or hold non-parameter state
  (which the scan would have to write back), go one by one through `checkpointed`.
  """
  call = checkpointed(mode)
  blocks = list(blocks)
  if mode == "none" or len(blocks) < 2:
    for block in blocks:
      x = call(block, x, *args)
    return x
  splits = [nnx.split(block, nnx.Param, ...) for block in blocks]
  graphdef, params, rest = splits[0]
  if any(g != graphdef for g, _, _ in splits) or jax.tree.leaves(rest):
    for block in blocks:
      x = call(block, x, *args)
    return x
  treedef = jax.tree.structure(params)
  stacked = [jnp.stack(leaves)
             for leaves in zip(*(jax.tree.leaves(p) for _, p, _ in splits))]

  # The carry's examples stay split like the batch (under `partitioning.activation_rules`,
  # which the train step, evaluation and sampling trace under): left to itself, sharding
  # propagation into the loop follows the FSDP-split parameters instead, gathers the
  # batch and runs every device's loop on all of it.
  pin = lambda x: partitioning.constrain(x, ("batch",) + (None,) * (x.ndim - 1))

  def body(x, leaves):
    block = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)
    return pin(block(pin(x), *args)), None

  # prevent_cse guards an unrolled recomputation against CSE with the forward pass; a
  # scan's body cannot be merged with anything, so it is off (as jax.checkpoint advises).
  body = jax.checkpoint(body, policy=_POLICIES[mode], prevent_cse=False)
  x, _ = jax.lax.scan(body, x, stacked)
  return x
