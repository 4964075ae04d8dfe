"""The train step: one pure function `(state, batch, key) -> (state, metrics)`.

It runs the family's updates in order (one for diffusion; a critic, n_critic times, then
a generator for a WGAN). Each update takes gradients of its loss with respect to its own
networks only, accumulated over micro-batches with `lax.scan`, applies those networks'
optimizers, and writes back the non-parameter state the loss changed (BatchNorm
statistics, RNG counts) and the family's extra state. The EMA follows. The step is the
same on one CPU, on simulated devices and on a pod: no mode flags.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from scaler import state as state_lib
from scaler.families.base import LossOut, Update


def interleaved_split(batch, parts: int):
  """(B, ...) -> (parts, B/parts, ...), keeping each device's rows on that device.

  Row r of part m is row r*parts + m of the batch, so every part draws evenly from every
  device's shard and the reshape needs no communication.
  """
  def split(x):
    x = x.reshape(x.shape[0] // parts, parts, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


@dataclasses.dataclass(frozen=True)
class _Carry:
  """What one application of an update changes."""
  params: dict
  opt_state: dict
  counts: dict
  rest: dict
  extra: object


jax.tree_util.register_dataclass(_Carry)


def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


class StepBuilder:
  """Builds the pure step for one family; every choice is made here, not inside it."""

  def __init__(self, family, networks: state_lib.Networks, txs: dict, schedules: dict,
               ema_decay: float, micro_batches: int):
    self.family, self.networks = family, networks
    self.txs, self.schedules = txs, schedules
    self.ema_decay, self.micro_batches = ema_decay, micro_batches
    self.updates = tuple(family.updates)

  def _grads(self, update: Update, carry: _Carry, batch, key, step):
    """Mean gradient over micro-batches, the mean loss and metrics, and the new
    non-parameter and extra state (threaded through the micro-batches in order)."""

    def loss_fn(trainable, rest, extra, micro, key):
      # Networks outside this update enter as constants: no gradient flows to them.
      nets = state_lib.merge(self.networks, {**carry.params, **trainable}, rest)
      out = update.loss(nets, extra, micro, key, step)
      new_extra = extra if out.extra is None else out.extra
      return out.loss, (out, state_lib.split_rest(nets), new_extra)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    trainable = {n: carry.params[n] for n in update.networks}
    if self.micro_batches == 1:
      (_, (out, rest, extra)), grads = grad_fn(trainable, carry.rest, carry.extra, batch, key)
      return grads, out, rest, extra

    def body(acc, xs):
      grads_acc, rest, extra = acc
      micro, i = xs
      (_, (out, rest, extra)), grads = grad_fn(trainable, rest, extra, micro,
                                               jax.random.fold_in(key, i))
      return (jax.tree.map(jnp.add, grads_acc, grads), rest, extra), (out.loss, out.metrics)

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    xs = (interleaved_split(batch, self.micro_batches), jnp.arange(self.micro_batches))
    (grads, rest, extra), (losses, metrics) = jax.lax.scan(
        body, (zeros, carry.rest, carry.extra), xs)
    grads = jax.tree.map(lambda g: g / self.micro_batches, grads)
    mean = lambda x: jnp.mean(x, axis=0)
    return grads, LossOut(mean(losses), jax.tree.map(mean, metrics)), rest, extra

  def _apply(self, update: Update, carry: _Carry, batch, key, step):
    """One application of `update`: gradients, optimizer steps, written-back state."""
    grads, out, rest, extra = self._grads(update, carry, batch, key, step)
    params, opt_state, counts = dict(carry.params), dict(carry.opt_state), dict(carry.counts)
    for n in update.networks:
      delta, opt_state[n] = self.txs[n].update(grads[n], opt_state[n], params[n])
      params[n] = optax.apply_updates(params[n], delta)
      counts[n] = counts[n] + 1
    metrics = {"loss": out.loss, "grad_norm": optax.tree.norm(grads), **out.metrics}
    return _Carry(params, opt_state, counts, rest, extra), metrics

  def _run(self, update: Update, carry: _Carry, batch, key, step):
    if update.repeat == 1:
      return self._apply(update, carry, batch, key, step)

    def body(carry, xs):
      part, r = xs
      return self._apply(update, carry, part, jax.random.fold_in(key, r), step)

    xs = (interleaved_split(batch, update.repeat), jnp.arange(update.repeat))
    carry, metrics = jax.lax.scan(body, carry, xs)
    return carry, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

  def __call__(self, state: state_lib.TrainState, batch, key):
    carry = _Carry(state.params, state.opt_state, state.counts, state.rest, state.extra)
    metrics = {}
    for i, update in enumerate(self.updates):
      carry, update_metrics = self._run(update, carry, batch, jax.random.fold_in(key, i),
                                        state.step)
      metrics.update({f"{update.name}/{k}": v for k, v in update_metrics.items()})
    for n, sched in self.schedules.items():
      # The rate of the network's last update: its schedule counts its own updates.
      metrics[f"lr/{n}"] = sched(jnp.maximum(carry.counts[n] - 1, 0))
    ema = state.ema
    if self.ema_decay > 0:
      # Warm-up (TF's num_updates rule, as in diffusers): a fixed 0.999 would still hold
      # 22% of the random init after 1500 steps, and a blend of init and trained weights
      # is a broken network, not a smoothed one.
      step = state.step.astype(jnp.float32)
      decay = jnp.minimum(self.ema_decay, (1.0 + step) / (10.0 + step))
      ema = {n: optax.incremental_update(carry.params[n], ema[n], 1.0 - decay) for n in ema}
    new_state = state.replace(step=state.step + 1, params=carry.params,
                              opt_state=carry.opt_state, counts=carry.counts, ema=ema,
                              rest=carry.rest, extra=carry.extra)
    # Checked on the state a save would commit, not only on losses and gradients: a
    # finite gradient times a huge learning rate still overflows the parameters.
    metrics["finite"] = _all_finite((new_state.params, new_state.opt_state, new_state.rest,
                                     new_state.extra, metrics))
    return new_state, metrics


def make_train_step(family, networks, txs, schedules, ema_decay, micro_batches):
  return StepBuilder(family, networks, txs, schedules, ema_decay, micro_batches)
