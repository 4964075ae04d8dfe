"""scaler's train step against a hand-written jax + optax step of the same network.

    python3 benchmarks/step_overhead.py            # ~3 minutes on 2 CPU cores

Measures, interleaved in one process on one device:
  * compiled step time, scaler / plain (compute-bound sizes: MLP batch 1024, UNet
    batch 128); target <= 1.03;
  * the whole loop per step at batch 1 (data, dispatch, bookkeeping), scaler's
    `train()` / a plain loop; target <= 1.25;
  * achieved FLOP/s (XLA's cost analysis of the compiled step) as a share of this
    machine's measured float32 matmul peak.
Then, in subprocesses: step time on 8 simulated devices / 1 device (the price of debug
mode); target <= 2.0. Figures go to benchmarks/results/step_overhead.json.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

CASES = {
    "mlp_b1024": ("configs/diffusion_moons.yaml", ["train.batch_size=1024"]),
    "unet_b128": ("configs/diffusion_digits.yaml", ["train.batch_size=128"]),
    "mlp_b1": ("configs/diffusion_moons.yaml", ["train.batch_size=1"]),
}
COMMON = ["train.ema_decay=0.0", "mesh.data=1", "optimizer.schedule.warmup_steps=0"]


def plain_step(exp):
  """The hand-written baseline: the same network, loss and optimizer, no scaler."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from scaler import optim
  fam = exp.family
  model = fam.init(nnx.Rngs(0))["denoiser"]
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.optimizer(exp.cfg.optimizer_for("denoiser"), exp.cfg.train.steps)
  opt_state = tx.init(params)
  sched = fam.schedule

  def loss_fn(params, x, key):
    t_key, n_key = jax.random.split(key)
    t = jax.random.randint(t_key, (x.shape[0],), 0, fam.cfg.num_timesteps)
    noise = jax.random.normal(n_key, x.shape)
    abar = sched.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
    x_t = jnp.sqrt(abar) * x + jnp.sqrt(1 - abar) * noise
    eps = nnx.merge(graphdef, params)(x_t, t)
    return jnp.mean((eps - noise) ** 2)

  @jax.jit
  def step(params, opt_state, x, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  return step, params, opt_state


def time_calls(fn, n, in_flight=16):
  """Mean seconds per call; at most `in_flight` calls queued (XLA:CPU can hang with more
  than ~32 unawaited steps that hold collectives, as scaler's loop also bounds)."""
  import jax
  out = None
  t0 = time.perf_counter()
  for i in range(n):
    out = fn()
    if i % in_flight == in_flight - 1:
      jax.block_until_ready(out)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n


def compiled_step_ratio(name, repeats=5):
  import jax
  import numpy as np

  from scaler import config as config_lib
  from scaler import experiment as experiment_lib
  from scaler import mesh as mesh_lib
  from scaler import state as state_lib
  from scaler.perf import per_device_flops
  from scaler.train import compile_step
  path, overrides = CASES[name]
  cfg = config_lib.load(ROOT / path, overrides + COMMON)
  dev = jax.devices()[:1]
  exp = experiment_lib.build(cfg, dev)
  _, shardings = experiment_lib.abstract_shardings(exp)
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, False, exp.rules, exp.mesh, 0)
  bsh = mesh_lib.batch_sharding(exp.mesh)
  x = np.random.default_rng(0).normal(size=(cfg.train.batch_size, *exp.spec.shape))
  x = x.astype(np.float32)
  batch = {"x": jax.device_put(x, bsh)}
  key = jax.random.key(0)
  compiled = compile_step(exp, shardings, bsh).lower(state, batch, key).compile()
  flops = per_device_flops(compiled)  # one device here: the whole step
  p_step, params, opt = plain_step(exp)
  xd = jax.device_put(x, dev[0])
  box = {"s": state, "p": (params, opt)}

  def ours():
    box["s"], m = compiled(box["s"], batch, key)
    return m

  def plain():
    p, o, loss = p_step(*box["p"], xd, key)
    box["p"] = (p, o)
    return loss

  n = 20 if "unet" in name else 200
  time_calls(ours, 3), time_calls(plain, 3)  # warm both
  t_ours, t_plain = [], []
  for _ in range(repeats):  # interleaved so drifts hit both alike
    t_ours.append(time_calls(ours, n))
    t_plain.append(time_calls(plain, n))
  a, b = statistics.median(t_ours), statistics.median(t_plain)
  return {"case": name, "scaler_ms": a * 1e3, "plain_ms": b * 1e3, "ratio": a / b,
          "flops_per_step": flops, "achieved_flops_per_sec": flops / a}


def loop_ratio(repeats=3, steps=400):
  """Whole loop at batch 1: scaler's train() against a plain Python loop."""
  import jax
  import numpy as np

  from scaler import config as config_lib
  from scaler import experiment as experiment_lib
  from scaler.data import load_source
  from scaler.train import train
  path, overrides = CASES["mlp_b1"]
  cfg = config_lib.load(ROOT / path, overrides + COMMON + [
      f"train.steps={steps}", f"train.log_every={steps // 2}", "checkpoint.every=100000"])
  dev = jax.devices()[:1]
  exp = experiment_lib.build(cfg, dev)
  p_step, params, opt = plain_step(exp)
  source = load_source(cfg.data, "train")
  data = source.rows(np.arange(len(source)))["x"]
  key = jax.random.key(0)
  ours, plain = [], []
  for r in range(repeats):
    with tempfile.TemporaryDirectory() as d:
      train(cfg, Path(d) / "run", devices=dev)
      rows = [json.loads(l) for l in open(Path(d) / "run" / "metrics.jsonl")]
      ours.append(1.0 / rows[-1]["steps_per_sec"])  # second half: compile excluded
    p, o, _ = p_step(params, opt, jax.device_put(data[:1], dev[0]), key)
    jax.block_until_ready(p)
    rng = np.random.default_rng(r)
    t0 = time.perf_counter()
    for i in range(steps // 2):
      idx = rng.integers(0, len(data), 1)
      p, o, loss = p_step(p, o, jax.device_put(data[idx], dev[0]), jax.random.fold_in(key, i))
    jax.block_until_ready(loss)
    plain.append((time.perf_counter() - t0) / (steps // 2))
    params, opt = p, o
  a, b = statistics.median(ours), statistics.median(plain)
  return {"case": "loop_b1", "scaler_ms": a * 1e3, "plain_ms": b * 1e3, "ratio": a / b}


def matmul_peak(n=2048, reps=10):
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time_calls(lambda: f(a), reps)
  return 2 * n ** 3 / t


def debug_mode_ratio(config):
  """Step time on 8 simulated devices over 1 device, each in a fresh process."""
  times = {}
  for devices in (1, 8):
    env = {**os.environ,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    code = ("import sys; sys.path.insert(0, %r); from benchmarks.step_overhead import _one;"
            " print(_one(%r))" % (str(ROOT), config))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    times[devices] = float(out.stdout.strip().splitlines()[-1])
  return {"case": f"debug_8_over_1 {config}", "one_device_ms": times[1] * 1e3,
          "eight_devices_ms": times[8] * 1e3, "ratio": times[8] / times[1]}


def _one(config):
  """Compiled step time of a shipped config, as shipped, on all visible devices."""
  import jax
  import numpy as np

  from scaler import config as config_lib
  from scaler import experiment as experiment_lib
  from scaler import mesh as mesh_lib
  from scaler import state as state_lib
  from scaler.train import compile_step
  cfg = config_lib.load(ROOT / config)
  exp = experiment_lib.build(cfg)
  _, shardings = experiment_lib.abstract_shardings(exp)
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, True, exp.rules, exp.mesh, 0)
  bsh = mesh_lib.batch_sharding(exp.mesh)
  x = np.random.default_rng(0).normal(size=(cfg.train.batch_size, *exp.spec.shape))
  x = x.astype(np.float32)
  batch = {"x": jax.device_put(x, bsh)}
  key = jax.random.key(0)
  step = compile_step(exp, shardings, bsh).lower(state, batch, key).compile()
  box = {"s": state}

  def call():
    box["s"], m = step(box["s"], batch, key)
    return m

  time_calls(call, 10)
  return statistics.median(time_calls(call, 100) for _ in range(5))


def main():
  import jax
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  peak = matmul_peak()
  rows = [compiled_step_ratio(c) for c in ("mlp_b1024", "unet_b128")]
  for r in rows:
    r["share_of_matmul_peak"] = r["achieved_flops_per_sec"] / peak
  rows.append(loop_ratio())
  rows.append(debug_mode_ratio("configs/diffusion_moons.yaml"))
  rows.append(debug_mode_ratio("configs/diffusion_digits.yaml"))
  result = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "matmul_peak_flops_per_sec": peak, "rows": rows,
            "date": time.strftime("%Y-%m-%d")}
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "step_overhead.json").write_text(json.dumps(result, indent=1))
  print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
  for r in rows:
    print(json.dumps(r))


if __name__ == "__main__":
  main()
