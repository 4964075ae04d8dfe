"""The train state: named networks, each with its own optimizer, plus EMA and extra state.

    state = {"step": int32[],
             "params":    {net: {...arrays}},   # trained parameters
             "opt_state": {net: optax state},   # one optimizer per network
             "ema":       {net: {...arrays}},   # empty when EMA is off
             "rest":      {net: {...arrays}},   # non-parameter NNX state (e.g. norms' stats)
             "extra":     family extra state or None (an EBM replay buffer)}

Graph definitions stay outside the pytree: they are static and split once, so no NNX
graph traversal happens inside the step. The state is created already sharded: abstract
shapes first, then one jitted init with output shardings (nanodo `_init_train_state`).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scaler import partitioning


@dataclasses.dataclass(frozen=True)
class Networks:
  """Static facts about a family's networks, known before anything is allocated."""
  graphdefs: dict          # net -> nnx.GraphDef
  logical_specs: dict      # net -> pure dict of PartitionSpecs over roles


def split(modules: dict):
  graphdefs, params, rest = {}, {}, {}
  for name, module in modules.items():
    graphdef, p, r = nnx.split(module, nnx.Param, ...)
    graphdefs[name] = graphdef
    params[name] = nnx.to_pure_dict(p)
    rest[name] = nnx.to_pure_dict(r)
  return graphdefs, params, rest


def describe(family) -> Networks:
  """Graph definitions and roles of every parameter, without allocating anything."""
  modules = nnx.eval_shape(lambda: family.init(nnx.Rngs(0)))
  graphdefs, specs = {}, {}
  for name, module in modules.items():
    graphdef, p, _ = nnx.split(module, nnx.Param, ...)
    graphdefs[name] = graphdef
    # A parameter created without roles reads as P(), which the rank check refuses.
    specs[name] = nnx.to_pure_dict(nnx.get_partition_spec(p))
  return Networks(graphdefs, specs)


def merge(networks: Networks, params: dict, rest: dict) -> dict:
  """Live NNX modules from pure state (inside jit: traced once, not per step)."""
  return {n: nnx.merge(g, params[n], rest[n]) for n, g in networks.graphdefs.items()}


def init_fn(family, txs: dict, use_ema: bool):
  """A pure function rng -> state, to be abstractly evaluated then jitted with shardings."""

  def init(rng):
    init_rng, extra_rng = jax.random.split(rng)
    _, params, rest = split(family.init(nnx.Rngs(init_rng)))
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": {n: txs[n].init(params[n]) for n in params},
        "ema": jax.tree.map(jnp.copy, params) if use_ema else {},
        "rest": rest,
        "extra": family.init_extra(extra_rng),
    }

  return init


def state_shardings(abstract_state, networks: Networks, txs: dict, rules: dict, mesh: Mesh):
  """Shardings for every leaf of the state, from the networks' roles and the rules."""
  replicated = NamedSharding(mesh, P())
  params = {
      n: partitioning.param_shardings(abstract_state["params"][n], networks.logical_specs[n],
                                      rules, mesh, prefix=f"{n}/")
      for n in abstract_state["params"]}
  return {
      "step": replicated,
      "params": params,
      "opt_state": {
          n: partitioning.opt_state_shardings(txs[n], abstract_state["opt_state"][n],
                                              params[n], mesh)
          for n in params},
      "ema": {n: params[n] for n in abstract_state["ema"]},
      "rest": jax.tree.map(lambda _: replicated, abstract_state["rest"]),
      "extra": jax.tree.map(lambda _: replicated, abstract_state["extra"]),
  }


def create(family, txs: dict, use_ema: bool, networks: Networks, rules: dict, mesh: Mesh,
           seed: int):
  """The sharded initial state and its shardings; nothing is ever whole on one device."""
  init = init_fn(family, txs, use_ema)
  abstract = jax.eval_shape(init, jax.random.key(seed))
  shardings = state_shardings(abstract, networks, txs, rules, mesh)
  # The key is made inside the jitted init, so no host value crosses into a mesh that
  # may span other processes.
  state = jax.jit(lambda: init(jax.random.key(seed)), out_shardings=shardings)()
  return state, shardings
