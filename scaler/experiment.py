"""The pieces of an experiment, built from a config: mesh, data, family, optimizers.

`scaler train`, `scaler layout`, `scaler sample` and `scaler eval` all start here, so a
config that trains is a config that lays out and samples, with the same checks in the
same order, all before anything compiles.
"""

import dataclasses

import jax
from jax.sharding import Mesh

from scaler import mesh as mesh_lib
from scaler import optim
from scaler import partitioning
from scaler import state as state_lib
from scaler.config import Config
from scaler.errors import UserError
from scaler.families import FAMILIES
from scaler.nn.layers import Precision
from scaler.nn.registry import NETWORKS


@dataclasses.dataclass
class Experiment:
  cfg: Config
  mesh: Mesh
  rules: dict
  spec: object             # scaler.data.DataSpec of the training split
  family: object
  networks: state_lib.Networks
  txs: dict                # network -> optax.GradientTransformation
  schedules: dict          # network -> learning-rate schedule

  @property
  def use_ema(self) -> bool:
    return self.cfg.train.ema_decay > 0


def build_family(cfg: Config, spec):
  """The family object; it gets the data's spec (shape, kind, classes) and the precision."""
  family_cls = FAMILIES[cfg.family.name][1]
  net_cls = NETWORKS[cfg.model.name][1]
  return family_cls(cfg.family.cfg, net_cls, cfg.model.cfg, spec,
                    Precision.from_config(cfg.precision))


def updates_per_step(family, names) -> dict:
  """Optimizer updates each network takes per train step (a WGAN critic: n_critic)."""
  return {n: sum(u.repeat for u in family.updates if n in u.networks) or 1 for n in names}


def _optimizers(cfg: Config, names: list[str], family):
  if isinstance(cfg.optimizer, dict):
    unknown = sorted(set(cfg.optimizer) - set(names))
    if unknown:
      raise UserError(f"optimizer.{unknown[0]}: the family '{cfg.family.name}' has no network "
                      f"'{unknown[0]}'; its networks: {', '.join(names)}")
    missing = sorted(set(names) - set(cfg.optimizer))
    if missing:
      raise UserError(f"optimizer: per-network sections must cover every network; missing "
                      f"{', '.join(missing)} (the family's networks: {', '.join(names)})")
  # Each schedule spans the network's own updates over the run (and its warm-up counts
  # them): a critic updated n_critic times a step decays over n_critic * train.steps.
  updates = {n: cfg.train.steps * k for n, k in updates_per_step(family, names).items()}
  txs = {n: optim.optimizer(cfg.optimizer_for(n), updates[n]) for n in names}
  schedules = {n: optim.schedule(cfg.optimizer_for(n), updates[n]) for n in names}
  return txs, schedules


def _check_batch(cfg: Config, mesh: Mesh, family) -> None:
  """Every slice the step takes (repeats x micro-batches) splits evenly over the batch axes,
  and the family accepts the batch and the batch axes' device count."""
  repeat = max((u.repeat for u in family.updates), default=1)
  for u in family.updates:
    if u.repeat < 1:
      raise ValueError(f"update {u.name} has repeat={u.repeat}")
  mesh_lib.check_batch(mesh, cfg.train.batch_size, cfg.train.micro_batches, repeat)
  family.check_batch(cfg.train.batch_size, mesh_lib.batch_shards(mesh))


def check_mesh_use(mesh: Mesh, shardings: state_lib.TrainState, rules_name) -> None:
  """Refuses a mesh axis with devices that nothing is split over.

  The batch is split over `data` and `fsdp`; `tensor` splits only what the rules map to
  it. With `mesh.tensor=2` and no parameter on `tensor`, half the devices would repeat
  the other half's work.
  """
  used = set(mesh_lib.BATCH_AXES)
  for s in jax.tree.leaves(shardings):
    for entry in s.spec:
      used.update(entry if isinstance(entry, tuple) else (entry,))
  for axis in mesh_lib.AXES:
    if mesh.shape[axis] > 1 and axis not in used:
      raise UserError(
          f"mesh.{axis}={mesh.shape[axis]}, but no parameter is split over '{axis}' under "
          f"rules {rules_name!r}: its devices would duplicate work. Set mesh.{axis}=1 (its "
          f"devices go to mesh.data), or use rules that map a role to '{axis}' "
          "(e.g. fsdp_tensor)")


def build(cfg: Config, devices=None, spec=None) -> Experiment:
  """Checks everything that can be checked before compiling, in a fixed order."""
  from scaler.data import load_spec

  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  rules = partitioning.resolve_rules(cfg.rules)
  spec = spec if spec is not None else load_spec(cfg.data)
  family = build_family(cfg, spec)
  _check_batch(cfg, mesh, family)
  networks = state_lib.describe(family)
  txs, schedules = _optimizers(cfg, sorted(networks.graphdefs), family)
  exp = Experiment(cfg, mesh, rules, spec, family, networks, txs, schedules)
  _, shardings = abstract_shardings(exp)  # every parameter's rule is checked here
  check_mesh_use(mesh, shardings, cfg.rules)
  mesh_lib.check_batch_rows(mesh)
  return exp


def abstract_state(exp: Experiment) -> state_lib.TrainState:
  init = state_lib.init_fn(exp.family, exp.networks, exp.txs, exp.use_ema, exp.cfg.train.seed)
  return jax.eval_shape(init)


def abstract_shardings(exp: Experiment):
  abstract = abstract_state(exp)
  shardings = state_lib.state_shardings(abstract, exp.family, exp.networks, exp.txs,
                                        exp.rules, exp.mesh)
  return abstract, shardings


def abstract_target(exp: Experiment):
  """Shape, dtype and sharding of every leaf: what a restore reads into."""
  abstract, shardings = abstract_shardings(exp)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
