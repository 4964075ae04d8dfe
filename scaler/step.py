"""The train step: one pure function `(state, batch, rng) -> (state, metrics)`.

It runs the family's updates in order (one for diffusion, two for a GAN). Each update
takes gradients of its loss with respect to its own networks only, accumulated over
micro-batches with `lax.scan`, and applies that network's optimizer. The EMA follows.
The step is the same on one CPU, on simulated devices and on a pod: no mode flags.
"""

import jax
import jax.numpy as jnp
import optax

from scaler import state as state_lib
from scaler.families.base import LossOut


def _micro_split(batch, micro_batches):
  """(B, ...) -> (M, B/M, ...), keeping each device's rows on that device.

  Row r of micro-batch m is row r*M + m of the batch, so every micro-batch draws evenly
  from every device's shard and the reshape needs no communication.
  """
  def split(x):
    x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _grads(loss_fn, trainable, extra, batch, rng, micro_batches):
  """Mean gradient and outputs of `loss_fn` over micro-batches.

  Gradients are summed in the scan carry (one copy of the parameters, not M); the extra
  state threads through the micro-batches in order.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro_batches == 1:
    (_, out), grads = grad_fn(trainable, extra, batch, rng)
    return grads, out

  def body(carry, xs):
    acc, extra = carry
    micro, i = xs
    (_, out), grads = grad_fn(trainable, extra, micro, jax.random.fold_in(rng, i))
    extra = extra if out.extra is None else out.extra
    return (jax.tree.map(jnp.add, acc, grads), extra), (out.loss, out.metrics)

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  xs = (_micro_split(batch, micro_batches), jnp.arange(micro_batches))
  (grads, extra), (losses, metrics) = jax.lax.scan(body, (zeros, extra), xs)
  grads = jax.tree.map(lambda g: g / micro_batches, grads)
  mean = lambda x: jnp.mean(x, axis=0)
  return grads, LossOut(mean(losses), jax.tree.map(mean, metrics), extra)


def make_train_step(family, networks: state_lib.Networks, txs: dict, schedules: dict,
                    ema_decay: float, micro_batches: int):
  """Builds the pure step for one family; every choice is made here, not inside it."""
  updates = tuple(family.updates)
  use_ema = ema_decay > 0

  def train_step(state, batch, rng):
    params, opt_state = dict(state["params"]), dict(state["opt_state"])
    extra, metrics = state["extra"], {}
    finite = jnp.array(True)
    for i, update in enumerate(updates):

      def loss_fn(trainable, extra, micro, key, update=update):
        # Networks outside this update enter as constants: no gradient flows to them.
        nets = state_lib.merge(networks, {**params, **trainable}, state["rest"])
        out = update.loss(nets, extra, micro, key)
        return out.loss, out

      trainable = {n: params[n] for n in update.networks}
      grads, out = _grads(loss_fn, trainable, extra, batch, jax.random.fold_in(rng, i),
                          micro_batches)
      for n in update.networks:
        delta, opt_state[n] = txs[n].update(grads[n], opt_state[n], params[n])
        params[n] = optax.apply_updates(params[n], delta)
      grad_norm = optax.tree.norm(grads)
      finite &= jnp.isfinite(grad_norm) & jnp.isfinite(out.loss)
      metrics[f"{update.name}/loss"] = out.loss
      metrics[f"{update.name}/grad_norm"] = grad_norm
      for k, v in out.metrics.items():
        metrics[f"{update.name}/{k}"] = v
      if out.extra is not None:
        extra = out.extra
    for n, sched in schedules.items():
      metrics[f"lr/{n}"] = sched(state["step"])
    ema = state["ema"]
    if use_ema:
      # Warm-up (TF's num_updates rule, as in diffusers): a fixed 0.999 would still hold
      # 22% of the random init after 1500 steps, and a blend of init and trained weights
      # is a broken network, not a smoothed one.
      step = state["step"].astype(jnp.float32)
      decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
      ema = optax.incremental_update(params, ema, 1.0 - decay)
    metrics["finite"] = finite
    new_state = {**state, "step": state["step"] + 1, "params": params,
                 "opt_state": opt_state, "ema": ema, "extra": extra}
    return new_state, metrics

  return train_step
