"""scaler's GAN step against a hand-written jax + optax two-optimizer step, and the price
of debug mode for the VAE and GAN configs.

    python3 benchmarks/gan_step.py            # ~10 minutes on 2 shared CPU cores

1. Compiled step time, scaler / plain, interleaved in one process on one device, at
   compute-bound sizes (DCGAN pair on the digits): WGAN-GP with 5 critic updates a step
   (gradient penalty, generator EMA) and the non-saturating DCGAN (BatchNorm in both
   networks). The plain step is written out here: the same NNX networks split once,
   the losses by hand, a `lax.scan` over the critic's slices, two optax optimizers.
   Target <= 1.03.
2. Debug mode: step time on 8 simulated devices over 1 device for each new config as
   shipped, in fresh processes, next to the same ratio for a plain jax + optax step of
   the same family's losses (data-parallel over a mesh of all devices).
Figures go to benchmarks/results/gan_step.json.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

CASES = {
    "wgan_gp_b320": ("configs/wgan_gp_digits.yaml", []),
    "dcgan_ns_b256": ("configs/wgan_gp_digits.yaml", [
        "family.loss=non_saturating", "family.n_critic=1", "model.discriminator_norm=batch",
        "train.batch_size=256"]),
}
CONFIGS = ["configs/vae_moons.yaml", "configs/vae_digits.yaml", "configs/vqvae_digits.yaml",
           "configs/gan_eight_gaussians.yaml", "configs/wgan_gp_digits.yaml"]


def time_calls(fn, n, in_flight=8):
  import jax
  out = None
  t0 = time.perf_counter()
  for i in range(n):
    out = fn()
    if i % in_flight == in_flight - 1:
      jax.block_until_ready(out)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n


def plain_gan_step(exp):
  """The hand-written baseline: n_critic critic updates, one generator update, the EMA."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  fam, cfg = exp.family, exp.cfg
  nets = fam.init(nnx.Rngs(0))
  g_def, g_params, g_rest = nnx.split(nets["generator"], nnx.Param, ...)
  d_def, d_params, d_rest = nnx.split(nets["discriminator"], nnx.Param, ...)
  g_tx, d_tx = exp.txs["generator"], exp.txs["discriminator"]
  n_critic, latent, kind = fam.cfg.n_critic, fam.cfg.latent_dim, fam.cfg.loss.name
  gp_weight = getattr(fam.cfg.loss.cfg, "gp_weight", 0.0)
  decay = cfg.train.ema_decay
  not_param = nnx.Not(nnx.Param)

  def d_loss(d_params, d_rest, g_params, g_rest, x, key):
    G = nnx.merge(g_def, g_params, g_rest)
    D = nnx.merge(d_def, d_params, d_rest)
    z_key, e_key = jax.random.split(key)
    fake = jax.lax.stop_gradient(G(jax.random.normal(z_key, (x.shape[0], latent))))
    real_out, fake_out = D(x), D(fake)
    if kind == "wgan_gp":
      eps = jax.random.uniform(e_key, (x.shape[0], 1, 1, 1))
      x_hat = eps * x + (1 - eps) * fake
      grad = jax.grad(lambda v: jnp.sum(D(v)))(x_hat)
      norm = jnp.sqrt(jnp.sum(grad.reshape(x.shape[0], -1) ** 2, axis=1) + 1e-12)
      loss = jnp.mean(fake_out) - jnp.mean(real_out) + gp_weight * jnp.mean((norm - 1) ** 2)
    else:
      loss = jnp.mean(jax.nn.softplus(-real_out) + jax.nn.softplus(fake_out))
    return loss, (nnx.state(G, not_param), nnx.state(D, not_param))

  def g_loss(g_params, g_rest, d_params, d_rest, n, key):
    G = nnx.merge(g_def, g_params, g_rest)
    D = nnx.merge(d_def, d_params, d_rest)
    out = D(G(jax.random.normal(key, (n, latent))))
    loss = -jnp.mean(out) if kind == "wgan_gp" else jnp.mean(jax.nn.softplus(-out))
    return loss, (nnx.state(G, not_param), nnx.state(D, not_param))

  def step(s, x, key):
    g_params, g_rest, g_opt, d_params, d_rest, d_opt, ema = s
    parts = x.reshape(n_critic, x.shape[0] // n_critic, *x.shape[1:])

    def critic(carry, xs):
      d_params, d_rest, g_rest, d_opt = carry
      part, i = xs
      (loss, (g_rest, d_rest)), grads = jax.value_and_grad(d_loss, has_aux=True)(
          d_params, d_rest, g_params, g_rest, part, jax.random.fold_in(key, i))
      updates, d_opt = d_tx.update(grads, d_opt, d_params)
      return (optax.apply_updates(d_params, updates), d_rest, g_rest, d_opt), loss

    (d_params, d_rest, g_rest, d_opt), d_losses = jax.lax.scan(
        critic, (d_params, d_rest, g_rest, d_opt), (parts, jnp.arange(n_critic)))
    (g_l, (g_rest, d_rest)), grads = jax.value_and_grad(g_loss, has_aux=True)(
        g_params, g_rest, d_params, d_rest, x.shape[0], jax.random.fold_in(key, 99))
    updates, g_opt = g_tx.update(grads, g_opt, g_params)
    g_params = optax.apply_updates(g_params, updates)
    if decay > 0:
      ema = optax.incremental_update(g_params, ema, 1.0 - decay)
    return (g_params, g_rest, g_opt, d_params, d_rest, d_opt, ema), (jnp.mean(d_losses), g_l)

  state = (g_params, g_rest, g_tx.init(g_params), d_params, d_rest, d_tx.init(d_params),
           jax.tree.map(jnp.copy, g_params))
  return jax.jit(step, donate_argnums=0), state


def _batch(exp, batch_size, sharding):
  import jax
  import numpy as np
  rng = np.random.default_rng(0)
  x = np.clip(rng.normal(size=(batch_size, *exp.spec.shape)), -1, 1).astype(np.float32)
  batch = {"x": jax.device_put(x, sharding)}
  if exp.spec.num_classes:
    label = (np.arange(batch_size) % exp.spec.num_classes).astype(np.int32)
    batch["label"] = jax.device_put(label, sharding)
  return batch


def compiled_step_ratio(name, repeats=5, n=10):
  import jax

  from scaler import config as config_lib
  from scaler import experiment as experiment_lib
  from scaler import mesh as mesh_lib
  from scaler import state as state_lib
  from scaler.perf import per_device_flops
  from scaler.train import compile_step
  path, overrides = CASES[name]
  cfg = config_lib.load(ROOT / path, overrides + ["mesh.data=1"])
  dev = jax.devices()[:1]
  exp = experiment_lib.build(cfg, dev)
  _, shardings = experiment_lib.abstract_shardings(exp)
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, exp.use_ema, exp.rules,
                              exp.mesh, 0)
  bsh = mesh_lib.batch_sharding(exp.mesh)
  batch = _batch(exp, cfg.train.batch_size, bsh)
  key = jax.random.key(0)
  compiled = compile_step(exp, shardings, bsh).lower(state, batch, key).compile()
  p_step, p_state = plain_gan_step(exp)
  xd = jax.device_put(batch["x"], dev[0])
  box = {"s": state, "p": p_state}

  def ours():
    box["s"], m = compiled(box["s"], batch, key)
    return m

  def plain():
    box["p"], losses = p_step(box["p"], xd, key)
    return losses

  time_calls(ours, 3), time_calls(plain, 3)   # compile and warm both
  t_ours, t_plain = [], []
  for _ in range(repeats):   # interleaved, so drifts of the shared host hit both alike
    t_ours.append(time_calls(ours, n))
    t_plain.append(time_calls(plain, n))
  a, b = statistics.median(t_ours), statistics.median(t_plain)
  flops = per_device_flops(compiled)
  return {"case": name, "scaler_ms": a * 1e3, "plain_ms": b * 1e3, "ratio": a / b,
          "flops_per_step": flops, "achieved_flops_per_sec": flops / a}


def plain_family_step(exp):
  """A plain jax + optax step over the family's own losses, updates in order (a critic's
  repeats unrolled), each on its slice; data-parallel over the experiment's mesh."""
  import jax
  import optax
  from flax import nnx

  fam = exp.family
  split = {n: nnx.split(m, nnx.Param, ...) for n, m in fam.init(nnx.Rngs(0)).items()}
  defs = {n: s[0] for n, s in split.items()}

  def step(s, batch, key):
    params, rest, opt = (dict(t) for t in s)
    for i, u in enumerate(fam.updates):
      for r in range(u.repeat):
        # Every r-th row: each device keeps its own rows (a contiguous slice would move
        # the batch between devices).
        part = jax.tree.map(lambda a: a[r::u.repeat], batch)

        def loss_fn(train, rest):
          nets = {n: nnx.merge(defs[n], {**params, **train}[n], rest[n]) for n in defs}
          out = u.loss(nets, None, part, jax.random.fold_in(key, 10 * i + r),
                       jax.numpy.zeros((), jax.numpy.int32))
          return out.loss, {n: nnx.state(m, nnx.Not(nnx.Param)) for n, m in nets.items()}

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            {n: params[n] for n in u.networks}, rest)
        for n in u.networks:
          updates, opt[n] = exp.txs[n].update(grads[n], opt[n], params[n])
          params[n] = optax.apply_updates(params[n], updates)
    return (params, rest, opt), loss

  params = {n: s[1] for n, s in split.items()}
  rest = {n: s[2] for n, s in split.items()}
  opt = {n: exp.txs[n].init(params[n]) for n in params}
  return step, (params, rest, opt)


def _one(config):
  """(scaler, plain) compiled step times of a shipped config on all visible devices."""
  import jax

  from scaler import config as config_lib
  from scaler import experiment as experiment_lib
  from scaler import mesh as mesh_lib
  from scaler import state as state_lib
  from scaler.train import compile_step
  jax.config.update("jax_threefry_partitionable", True)
  cfg = config_lib.load(ROOT / config)
  exp = experiment_lib.build(cfg)
  _, shardings = experiment_lib.abstract_shardings(exp)
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, exp.use_ema, exp.rules,
                              exp.mesh, 0)
  bsh = mesh_lib.batch_sharding(exp.mesh)
  batch = _batch(exp, cfg.train.batch_size, bsh)
  key = jax.random.key(0)
  ours = compile_step(exp, shardings, bsh).lower(state, batch, key).compile()
  plain, p_state = plain_family_step(exp)
  rep = mesh_lib.replicated(exp.mesh)
  p_state = jax.device_put(p_state, rep)
  plain = jax.jit(plain, in_shardings=(rep, bsh, rep), out_shardings=(rep, rep),
                  donate_argnums=0)
  box = {"s": state, "p": p_state}

  def call_ours():
    box["s"], m = ours(box["s"], batch, key)
    return m

  def call_plain():
    box["p"], loss = plain(box["p"], batch, key)
    return loss

  time_calls(call_ours, 5), time_calls(call_plain, 5)
  t_ours, t_plain = [], []
  for _ in range(5):
    t_ours.append(time_calls(call_ours, 20))
    t_plain.append(time_calls(call_plain, 20))
  return statistics.median(t_ours), statistics.median(t_plain)


def debug_mode_ratio(config):
  """Step time on 8 simulated devices over 1 device, each in a fresh process."""
  times = {}
  for devices in (1, 8):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    code = ("import sys; sys.path.insert(0, %r); from benchmarks.gan_step import _one;"
            " print(*_one(%r))" % (str(ROOT), config))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    times[devices] = [float(v) for v in out.stdout.strip().splitlines()[-1].split()]
  (ours1, plain1), (ours8, plain8) = times[1], times[8]
  return {"case": f"debug_8_over_1 {config}", "one_device_ms": ours1 * 1e3,
          "eight_devices_ms": ours8 * 1e3, "ratio": ours8 / ours1,
          "plain_one_device_ms": plain1 * 1e3, "plain_eight_devices_ms": plain8 * 1e3,
          "plain_ratio": plain8 / plain1}


def main():
  import jax
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  which = sys.argv[1:] or ["steps", "debug"]
  rows = []
  if "steps" in which:
    rows += [compiled_step_ratio(c) for c in CASES]
  if "debug" in which:
    rows += [debug_mode_ratio(c) for c in CONFIGS]
  result = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "rows": rows}
  RESULTS.mkdir(exist_ok=True)
  out = RESULTS / "gan_step.json"
  old = json.loads(out.read_text()) if out.exists() else {}
  kept = [r for r in old.get("rows", []) if r["case"] not in {r2["case"] for r2 in rows}]
  result["rows"] = kept + rows
  out.write_text(json.dumps(result, indent=1))
  for r in rows:
    print(json.dumps(r))


if __name__ == "__main__":
  main()
