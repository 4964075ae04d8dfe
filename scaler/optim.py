"""optax optimizers and learning-rate schedules from config."""

import optax

from scaler.config import OptimizerConfig
from scaler.errors import UserError

OPTIMIZERS = ("adamw", "sgd", "lion")
SCHEDULES = ("constant", "cosine", "linear")


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then constant, cosine or linear decay to min_lr_ratio."""
  if cfg.schedule not in SCHEDULES:
    raise UserError(f"optimizer.schedule='{cfg.schedule}'; accepted: {', '.join(SCHEDULES)}")
  if cfg.warmup_steps < 0 or cfg.warmup_steps > total_steps:
    raise UserError(
        f"optimizer.warmup_steps={cfg.warmup_steps} must be between 0 and train.steps={total_steps}")
  end = cfg.lr * cfg.min_lr_ratio
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  if cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
  else:
    decay = optax.linear_schedule(cfg.lr, end, decay_steps)
  if cfg.warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  if cfg.name not in OPTIMIZERS:
    raise UserError(f"optimizer.name='{cfg.name}'; accepted: {', '.join(OPTIMIZERS)}")
  if cfg.lr <= 0:
    raise UserError(f"optimizer.lr={cfg.lr} must be positive")
  lr = schedule(cfg, total_steps)
  if cfg.name == "adamw":
    tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  elif cfg.name == "lion":
    tx = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  else:
    tx = optax.sgd(lr, momentum=cfg.momentum or None)
  if cfg.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx
