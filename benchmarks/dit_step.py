"""The DiT train step against a hand-written jax + optax step of the same network.

    python3 benchmarks/dit_step.py            # ~5 minutes on 2 quiet CPU cores

Interleaved in one process on one CPU device, at a compute-bound size (a class-conditional
DiT of width 128, depth 4, 64 tokens, batch 64: about 21 GFLOP a step):
  * compiled step time, scaler / plain; target <= 1.02;
  * achieved FLOP/s as a share of this machine's measured float32 matmul peak, counted
    two ways: XLA's cost analysis of the compiled step, and the model's FLOPs
    (3 x `scaler.nn.dit.flops_per_example` x batch: what the network needs, whatever
    the compiler or `remat` adds).
Figures go to benchmarks/results/dit_step.json.
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = "configs/dit_digits.yaml"
SIZE = ["model.patch=1", "model.width=128", "model.depth=4", "model.heads=4",
        "train.batch_size=64", "train.ema_decay=0.0", "mesh.data=1",
        "optimizer.schedule.warmup_steps=0"]


def plain_step(exp):
  """The hand-written baseline: the same network, loss (with label dropout), optimizer."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from scaler import optim
  fam = exp.family
  graphdef, params = nnx.split(fam.init(nnx.Rngs(0))["denoiser"], nnx.Param)
  tx = optim.optimizer(exp.cfg.optimizer_for("denoiser"), exp.cfg.train.steps)
  sched, k = fam.schedule, fam.num_classes
  p_drop = exp.cfg.family.condition.label_dropout

  def loss_fn(params, x, y, key):
    t_key, n_key = jax.random.split(key)
    t = jax.random.randint(t_key, (x.shape[0],), 0, fam.cfg.num_timesteps)
    noise = jax.random.normal(n_key, x.shape)
    y = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 2), p_drop, y.shape), k, y)
    abar = sched.alphas_cumprod[t].reshape((-1, 1, 1, 1))
    x_t = jnp.sqrt(abar) * x + jnp.sqrt(1 - abar) * noise
    return jnp.mean((nnx.merge(graphdef, params)(x_t, t, y) - noise) ** 2)

  def step(params, opt_state, x, y, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), params, tx.init(params)


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


def matmul_peak(n=2048, reps=10):
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  return max(2 * n ** 3 / time_calls(lambda: f(a), reps) for _ in range(3))


def step_ratio(repeats=5, n=10):
  import jax
  import numpy as np

  from scaler import config as config_lib
  from scaler import experiment as experiment_lib
  from scaler import mesh as mesh_lib
  from scaler import state as state_lib
  from scaler.data import load_source
  from scaler.nn.dit import flops_per_example
  from scaler.perf import per_device_flops
  from scaler.train import compile_step
  cfg = config_lib.load(ROOT / CONFIG, SIZE)
  dev = jax.devices()[:1]
  exp = experiment_lib.build(cfg, dev)
  _, shardings = experiment_lib.abstract_shardings(exp)
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, False, exp.rules, exp.mesh, 0)
  bsh = mesh_lib.batch_sharding(exp.mesh)
  src = load_source(cfg.data, "train")
  b = cfg.train.batch_size
  batch = {"x": jax.device_put(src.x[:b], bsh), "label": jax.device_put(src.label[:b], bsh)}
  key = jax.random.key(0)
  compiled = compile_step(exp, shardings, bsh).lower(state, batch, key).compile()
  xla_flops = per_device_flops(compiled)
  model_flops = 3 * flops_per_example(cfg.model.cfg, exp.spec.shape) * b
  p_step, params, opt = plain_step(exp)
  xd, yd = jax.device_put(src.x[:b], dev[0]), jax.device_put(src.label[:b], dev[0])
  box = {"s": state, "p": (params, opt)}

  def ours():
    box["s"], m = compiled(box["s"], batch, key)
    return m

  def plain():
    p, o, loss = p_step(*box["p"], xd, yd, key)
    box["p"] = (p, o)
    return loss

  time_calls(ours, 2), time_calls(plain, 2)  # warm both
  t_ours, t_plain = [], []
  for _ in range(repeats):  # interleaved so drifts of a shared host hit both alike
    t_ours.append(time_calls(ours, n))
    t_plain.append(time_calls(plain, n))
  a, p = statistics.median(t_ours), statistics.median(t_plain)
  return {"case": "dit_w128_d4_n64_b64", "scaler_ms": a * 1e3, "plain_ms": p * 1e3,
          "ratio": a / p, "ratios_per_repeat": [x / y for x, y in zip(t_ours, t_plain)],
          "xla_flops_per_step": xla_flops, "model_flops_per_step": model_flops,
          "achieved_xla_flops_per_sec": xla_flops / a,
          "achieved_model_flops_per_sec": model_flops / a}


def main():
  import jax
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  peak_before = matmul_peak()
  row = step_ratio()
  peak = max(peak_before, matmul_peak())   # the host is shared: the better of two
  row["share_of_matmul_peak_xla"] = row["achieved_xla_flops_per_sec"] / peak
  row["share_of_matmul_peak_model"] = row["achieved_model_flops_per_sec"] / peak
  result = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(), "matmul_peak_flops_per_sec": peak,
            "rows": [row], "date": time.strftime("%Y-%m-%d")}
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "dit_step.json").write_text(json.dumps(result, indent=1))
  print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
  print(json.dumps(row, indent=1))


if __name__ == "__main__":
  main()
