"""The pieces of an experiment, built from a config: mesh, data, family, optimizers.

`scaler train`, `scaler layout` and `scaler sample` all start here, so a config that
trains is a config that lays out and samples, with the same checks in the same order.
"""

import dataclasses

import jax
from jax.sharding import Mesh

from scaler import mesh as mesh_lib
from scaler import optim
from scaler import partitioning
from scaler import state as state_lib
from scaler.config import Config
from scaler.data import load_source
from scaler.families import FAMILIES
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


def build_family(cfg: Config, data_shape):
  family_cls = FAMILIES[cfg.family.name][1]
  net_cls = NETWORKS[cfg.model.name][1]
  return family_cls(cfg.family.cfg, net_cls, cfg.model.cfg, tuple(data_shape))


def build(cfg: Config, devices=None, train_source=None) -> Experiment:
  """Checks everything that can be checked before compiling, in a fixed order."""
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  mesh_lib.check_batch(mesh, cfg.train.batch_size, cfg.train.micro_batches)
  rules = partitioning.resolve_rules(cfg.rules)
  source = train_source if train_source is not None else load_source(cfg.data, "train")
  family = build_family(cfg, source.spec.shape)
  networks = state_lib.describe(family)
  names = sorted(networks.graphdefs)
  schedules = {n: optim.schedule(cfg.optimizer, cfg.train.steps) for n in names}
  txs = {n: optim.optimizer(cfg.optimizer, cfg.train.steps) for n in names}
  exp = Experiment(cfg, mesh, rules, source.spec, family, networks, txs, schedules)
  abstract_shardings(exp)  # every parameter's rule is checked here, before any compile
  return exp


def abstract_state(exp: Experiment):
  init = state_lib.init_fn(exp.family, exp.txs, exp.cfg.train.ema_decay > 0)
  return jax.eval_shape(init, jax.random.key(0))


def abstract_shardings(exp: Experiment):
  abstract = abstract_state(exp)
  shardings = state_lib.state_shardings(abstract, exp.networks, exp.txs, exp.rules, exp.mesh)
  return abstract, shardings
