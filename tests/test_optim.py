"""Optimizers from config: weight decay on matrices only, each choice's own defaults."""

import jax.numpy as jnp
import numpy as np
import pytest

from scaler import config as config_lib
from scaler import optim
from scaler.config import Named


def _opt(name, **kw):
  raw = {"name": name, "schedule": "constant", **kw}
  return config_lib.build_named(raw, "optimizer", optim.OPTIMIZERS)


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd"])
def test_weight_decay_skips_biases_and_norm_scales(name):
  params = {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,)), "scale": jnp.ones((3,))}
  tx = optim.optimizer(_opt(name, lr=0.1, weight_decay=0.5), 10)
  zero = {k: jnp.zeros_like(v) for k, v in params.items()}
  updates, _ = tx.update(zero, tx.init(params), params)
  # With zero gradients only the decay moves anything: the kernel, not the vectors.
  assert float(jnp.abs(updates["kernel"]).max()) > 0
  assert float(jnp.abs(updates["bias"]).max()) == 0
  assert float(jnp.abs(updates["scale"]).max()) == 0


def test_schedules_warm_up_then_decay():
  sched = optim.schedule(_opt("adamw", lr=1.0, schedule={"name": "cosine", "warmup_steps": 10,
                                                          "min_lr_ratio": 0.1}), 110)
  assert float(sched(0)) == 0 and float(sched(10)) == pytest.approx(1.0)
  assert float(sched(110)) == pytest.approx(0.1)
  constant = optim.schedule(_opt("adamw", lr=0.5), 100)
  np.testing.assert_allclose([float(constant(s)) for s in (0, 50, 100)], 0.5)


def test_warmup_longer_than_the_run_is_refused():
  from scaler.errors import UserError
  with pytest.raises(UserError, match="warmup_steps=200 is more than train.steps=100"):
    optim.schedule(_opt("adamw", schedule={"name": "linear", "warmup_steps": 200}), 100)


def test_nesterov_needs_momentum():
  from scaler.errors import UserError
  with pytest.raises(UserError, match="nesterov"):
    optim.optimizer(_opt("sgd", momentum=0.0, nesterov=True), 10)


def test_named_reads_through_to_its_config():
  opt = Named("adamw", optim.AdamWConfig(lr=0.3))
  assert opt.lr == 0.3 and opt.name == "adamw"
