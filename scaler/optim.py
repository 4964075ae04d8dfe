"""optax optimizers and learning-rate schedules from config.

Each optimizer and each schedule is a choice with only its own keys, e.g.

    optimizer: {name: adamw, lr: 3e-4, weight_decay: 0.01, clip_norm: 1.0,
                schedule: {name: cosine, warmup_steps: 500, min_lr_ratio: 0.1}}

Weight decay applies to matrices and kernels only (rank >= 2), never to biases or
normalisation scales, as in nanoGPT, MaxText and Levanter: decaying a LayerNorm scale
towards 0 fights the normalisation instead of regularising the model.
"""

import dataclasses

import jax
import optax

from scaler.config import Named, at_least, choice, fraction, param, positive, unit


@dataclasses.dataclass(frozen=True)
class ConstantSchedule:
  warmup_steps: int = param(0, at_least(0))   # linear warmup from 0 to the peak


@dataclasses.dataclass(frozen=True)
class DecaySchedule:
  warmup_steps: int = param(0, at_least(0))
  min_lr_ratio: float = param(0.0, unit)      # the final lr as a share of the peak


SCHEDULES = {"constant": ConstantSchedule, "cosine": DecaySchedule, "linear": DecaySchedule}


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
  lr: float = param(1e-3, positive)           # peak learning rate
  schedule: Named = choice(SCHEDULES, "cosine")
  b1: float = param(0.9, fraction)
  b2: float = param(0.999, fraction)
  eps: float = param(1e-8, positive)
  weight_decay: float = param(0.0, at_least(0.0))
  clip_norm: float = param(0.0, at_least(0.0))  # global-norm clipping; 0 turns it off


@dataclasses.dataclass(frozen=True)
class LionConfig:
  lr: float = param(1e-4, positive)
  schedule: Named = choice(SCHEDULES, "cosine")
  b1: float = param(0.9, fraction)
  b2: float = param(0.99, fraction)            # the Lion paper's and optax's default
  weight_decay: float = param(0.0, at_least(0.0))
  clip_norm: float = param(0.0, at_least(0.0))


@dataclasses.dataclass(frozen=True)
class SGDConfig:
  lr: float = param(1e-2, positive)
  schedule: Named = choice(SCHEDULES, "cosine")
  momentum: float = param(0.9, fraction)      # 0: plain SGD
  nesterov: bool = False
  weight_decay: float = param(0.0, at_least(0.0))
  clip_norm: float = param(0.0, at_least(0.0))


OPTIMIZERS = {"adamw": AdamWConfig, "lion": LionConfig, "sgd": SGDConfig}


def schedule(opt: Named, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then constant, cosine or linear decay to min_lr_ratio."""
  from scaler.errors import UserError

  cfg, sched = opt.cfg, opt.cfg.schedule
  warmup = sched.cfg.warmup_steps
  if warmup > total_steps:
    raise UserError(f"optimizer.schedule.warmup_steps={warmup} is more than "
                    f"train.steps={total_steps}")
  decay_steps = max(total_steps - warmup, 1)
  if sched.name == "constant":
    decay = optax.constant_schedule(cfg.lr)
  elif sched.name == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=sched.cfg.min_lr_ratio)
  else:
    decay = optax.linear_schedule(cfg.lr, cfg.lr * sched.cfg.min_lr_ratio, decay_steps)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params):
  """True for the parameters weight decay applies to: matrices and kernels."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer(opt: Named, total_steps: int) -> optax.GradientTransformation:
  """The optax transformation for one network, its schedule counting its own updates."""
  cfg, lr = opt.cfg, schedule(opt, total_steps)
  if opt.name == "adamw":
    tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=decay_mask)
  elif opt.name == "lion":
    tx = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
  else:
    if cfg.nesterov and not cfg.momentum:
      from scaler.errors import UserError
      raise UserError("optimizer.nesterov=true needs optimizer.momentum > 0")
    tx = optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    if cfg.weight_decay:
      # Decoupled from the lr schedule's scale as in adamw: -lr * wd * p, through sgd's lr.
      tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask), tx)
  if cfg.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx
