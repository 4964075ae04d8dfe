"""The train state: one typed pytree of named networks, their optimizers, EMA and extras.

Graph definitions stay outside the pytree: they are static and split once, so no NNX
graph traversal happens inside the step. The state is created already sharded: abstract
shapes first, then one jitted init with output shardings (nanodo `_init_train_state`).
Every part is sharded by the roles its dimensions name, through the one rule table.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scaler import partitioning
from scaler import rng as rng_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array        # int32[]: steps taken; the random state is the seed and this
  params: dict           # {net: {...arrays}}: trained parameters
  opt_state: dict        # {net: optax state}: one optimizer per network
  counts: dict           # {net: int32[]}: optimizer updates applied (schedules count these)
  ema: dict              # {net: {...arrays}}: EMA of the sampled networks; {} when off
  rest: dict             # {net: {...arrays}}: non-parameter NNX state (BatchNorm statistics,
                         # RNG counts, a VQ codebook), written back by every update
  extra: Any             # the family's extra state (an EBM replay buffer), or None

  def replace(self, **kw) -> "TrainState":
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class Networks:
  """Static facts about a family's networks, known before anything is allocated."""
  graphdefs: dict          # net -> nnx.GraphDef
  logical_specs: dict      # net -> pure dict of PartitionSpecs over roles (parameters)
  rest_specs: dict         # net -> the same for non-parameter state (empty spec: replicated)
  sampled: tuple           # the networks that sampling uses (and the EMA covers)


def split(modules: dict):
  graphdefs, params, rest = {}, {}, {}
  for name, module in modules.items():
    graphdef, p, r = nnx.split(module, nnx.Param, ...)
    graphdefs[name] = graphdef
    params[name] = nnx.to_pure_dict(p)
    rest[name] = nnx.to_pure_dict(r)
  return graphdefs, params, rest


def split_rest(modules: dict) -> dict:
  """The non-parameter state of live modules (after a call that may have updated it)."""
  return {n: nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param))) for n, m in modules.items()}


def describe(family) -> Networks:
  """Graph definitions and roles of every parameter, without allocating anything."""
  modules = nnx.eval_shape(lambda: family.init(nnx.Rngs(0)))
  graphdefs, specs, rest_specs = {}, {}, {}
  for name, module in modules.items():
    graphdef, p, r = nnx.split(module, nnx.Param, ...)
    graphdefs[name] = graphdef
    # A parameter created without roles reads as P(), which the rank check refuses.
    specs[name] = nnx.to_pure_dict(nnx.get_partition_spec(p))
    rest_specs[name] = nnx.to_pure_dict(nnx.get_partition_spec(r))
  sampled = family.sampled_networks or tuple(sorted(graphdefs))
  unknown = sorted(set(sampled) - set(graphdefs))
  if unknown:
    raise ValueError(f"sampled_networks names {unknown}, not networks of the family")
  return Networks(graphdefs, specs, rest_specs, tuple(sampled))


def merge(networks: Networks, params: dict, rest: dict) -> dict:
  """Live NNX modules from pure state (inside jit: traced once, not per step)."""
  return {n: nnx.merge(g, params[n], rest[n]) for n, g in networks.graphdefs.items()}


def init_fn(family, networks: Networks, txs: dict, use_ema: bool, seed: int):
  """A pure function () -> state, to be abstractly evaluated then jitted with shardings.

  The keys are made inside, so no host value crosses into a mesh that may span other
  processes; parameters and extra state draw from streams of their own.
  """

  def init():
    _, params, rest = split(family.init(nnx.Rngs(rng_lib.stream(seed, "init"))))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state={n: txs[n].init(params[n]) for n in params},
        counts={n: jnp.zeros((), jnp.int32) for n in params},
        ema={n: jax.tree.map(jnp.copy, params[n]) for n in networks.sampled} if use_ema else {},
        rest=rest,
        extra=family.init_extra(rng_lib.stream(seed, "extra")),
    )

  return init


def extra_specs(family, abstract_extra):
  """The extra state's logical specs: the family's roles, or replicated."""
  roles = family.extra_roles()
  if roles is None:
    return jax.tree.map(lambda _: P(), abstract_extra)
  return roles


def state_shardings(abstract: TrainState, family, networks: Networks, txs: dict, rules: dict,
                    mesh: Mesh) -> TrainState:
  """Shardings for every leaf of the state, from the roles and the rules."""
  replicated = NamedSharding(mesh, P())
  params = {
      n: partitioning.param_shardings(abstract.params[n], networks.logical_specs[n],
                                      rules, mesh, prefix=f"{n}/")
      for n in abstract.params}
  rest = {
      n: partitioning.param_shardings(abstract.rest[n], networks.rest_specs[n], rules, mesh,
                                      prefix=f"{n}/", replicate_unnamed=True)
      for n in abstract.rest}
  extra = None
  if abstract.extra is not None:
    extra = partitioning.param_shardings(abstract.extra, extra_specs(family, abstract.extra),
                                         rules, mesh, prefix="extra/", replicate_unnamed=True)
  return TrainState(
      step=replicated,
      params=params,
      opt_state={
          n: partitioning.opt_state_shardings(txs[n], abstract.opt_state[n], params[n], mesh)
          for n in params},
      counts={n: replicated for n in params},
      ema={n: params[n] for n in abstract.ema},
      rest=rest,
      extra=extra,
  )


def create(family, networks: Networks, txs: dict, use_ema: bool, rules: dict, mesh: Mesh,
           seed: int):
  """The sharded initial state and its shardings; nothing is ever whole on one device."""
  init = init_fn(family, networks, txs, use_ema, seed)
  abstract = jax.eval_shape(init)
  shardings = state_shardings(abstract, family, networks, txs, rules, mesh)
  return jax.jit(init, out_shardings=shardings)(), shardings
