"""scaler's EBM step against a hand-written JAX step with the same chain and a replicated
buffer; and the buffer's bytes per device, sharded against replicated.

    python3 benchmarks/ebm_step.py            # ~5 minutes on 2 CPU cores

Measures, interleaved in one process (8 simulated CPU devices, `ebm_eight_gaussians.yaml`
as shipped: MLP energy, batch 256, 40 Langevin steps, buffer 10,000):
  * compiled step time, scaler / plain, on 1 device and on 8 devices data-parallel;
    target <= 1.05. The plain step draws buffer rows uniformly (`randint`) and writes the
    chains back with `.at[idx].set`, as one would by hand; on 8 devices its buffer is
    replicated, so the write-back needs every device's chains (an all-gather);
  * the buffer's bytes per device on 8 devices, sharded / replicated; target 1/8.
Figures go to benchmarks/results/ebm_step.json.
"""

import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "ebm_eight_gaussians.yaml"

from benchmarks.step_overhead import time_calls  # noqa: E402


def plain_step(exp, mesh):
  """The hand-written baseline: the same network, chain, loss and optimizer; the buffer
  replicated on every device, rows drawn uniformly with replacement."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from scaler import optim
  fam, cfg = exp.family, exp.family.cfg
  graphdef, params, rest = nnx.split(fam.init(nnx.Rngs(0))["energy"], nnx.Param, ...)
  tx = optim.optimizer(exp.cfg.optimizer_for("energy"), exp.cfg.train.steps)
  opt_state = tx.init(params)
  buffer = jax.random.uniform(jax.random.key(1), (cfg.buffer_size, 2), minval=-fam.bound,
                              maxval=fam.bound)
  h, s, bound = cfg.step_size, cfg.noise_scale, fam.bound

  repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(("data", "fsdp")))

  def energy(p, x):
    return nnx.merge(graphdef, p, rest)(x)

  def chain(p, x, key):
    grad = jax.grad(lambda x: jnp.sum(energy(p, x)))

    def body(i, x):
      g = grad(x)
      if fam.grad_clip is not None:
        norm = jnp.linalg.norm(g, axis=1, keepdims=True)
        g = g * jnp.minimum(1.0, fam.grad_clip / (norm + 1e-12))
      z = jax.random.normal(jax.random.fold_in(key, i), x.shape)
      return jnp.clip(x - 0.5 * h * g + jnp.sqrt(h) * s * z, -bound, bound)

    return jax.lax.fori_loop(0, cfg.langevin_steps, body, x)

  def step(params, opt_state, buffer, x_pos, key):
    k_idx, k_fresh, k_noise, k_chain = jax.random.split(key, 4)
    b = x_pos.shape[0]
    idx = jax.random.randint(k_idx, (b,), 0, buffer.shape[0])
    fresh = jax.random.uniform(k_fresh, (b, 1)) < cfg.reinit
    start = jnp.where(fresh, jax.random.uniform(k_noise, (b, 2), minval=-bound, maxval=bound),
                      buffer[idx])
    # Chains split like the batch: left to itself, XLA runs every chain on every device.
    start = jax.lax.with_sharding_constraint(start, rows)
    x_neg = jax.lax.stop_gradient(chain(jax.lax.stop_gradient(params), start, k_chain))

    def loss_fn(p):
      e_pos, e_neg = energy(p, x_pos), energy(p, x_neg)
      return (jnp.mean(e_pos) - jnp.mean(e_neg)
              + cfg.alpha * (jnp.mean(e_pos ** 2) + jnp.mean(e_neg ** 2)))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, buffer.at[idx].set(x_neg), loss

  jitted = jax.jit(step, in_shardings=(repl, repl, repl, rows, repl),
                   out_shardings=(repl, repl, repl, repl), donate_argnums=(0, 1, 2))
  return jitted, jax.device_put((params, opt_state, buffer), repl)


def compare(devices, repeats=int(os.environ.get("REPEATS", 5)), n=20):
  import jax
  import numpy as np

  from scaler import config as config_lib
  from scaler import experiment as experiment_lib
  from scaler import mesh as mesh_lib
  from scaler import state as state_lib
  from scaler.train import compile_step
  jax.config.update("jax_threefry_partitionable", True)
  cfg = config_lib.load(CONFIG, ["mesh.data=-1"])
  exp = experiment_lib.build(cfg, devices)
  _, shardings = experiment_lib.abstract_shardings(exp)
  state, _ = state_lib.create(exp.family, exp.networks, exp.txs, False, exp.rules, exp.mesh, 0)
  rows = mesh_lib.batch_sharding(exp.mesh)
  x = np.random.default_rng(0).normal(size=(cfg.train.batch_size, 2)).astype(np.float32)
  batch = {"x": jax.device_put(x, rows)}
  key = jax.device_put(jax.random.key(0), mesh_lib.replicated(exp.mesh))
  ours = compile_step(exp, shardings, rows).lower(state, batch, key).compile()
  p_step, p_state = plain_step(exp, exp.mesh)
  box = {"s": state, "p": p_state}

  def call_ours():
    box["s"], m = ours(box["s"], batch, key)
    return m

  def call_plain():
    p, o, b, loss = p_step(*box["p"], batch["x"], key)
    box["p"] = (p, o, b)
    return loss

  time_calls(call_ours, 3), time_calls(call_plain, 3)  # warm both
  t_ours, t_plain = [], []
  for _ in range(repeats):  # interleaved so drifts hit both alike
    t_ours.append(time_calls(call_ours, n))
    t_plain.append(time_calls(call_plain, n))
  a, b = statistics.median(t_ours), statistics.median(t_plain)
  buf, plain_buf = box["s"].extra["buffer"], box["p"][2]
  return {"devices": len(devices), "scaler_ms": a * 1e3, "plain_ms": b * 1e3, "ratio": a / b,
          "runs_ratio": [x / y for x, y in zip(t_ours, t_plain)],
          "buffer_bytes_per_device": buf.addressable_shards[0].data.nbytes,
          "replicated_buffer_bytes_per_device": plain_buf.addressable_shards[0].data.nbytes}


def main():
  import jax
  rows = [compare(jax.devices()[:1]), compare(jax.devices())]
  eight = rows[1]
  memory = {"buffer_rows": 10000, "sharded_bytes_per_device": eight["buffer_bytes_per_device"],
            "replicated_bytes_per_device": eight["replicated_buffer_bytes_per_device"],
            "ratio": eight["buffer_bytes_per_device"]
            / eight["replicated_buffer_bytes_per_device"]}
  result = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "config": str(CONFIG.relative_to(ROOT)), "step": rows, "buffer_memory": memory,
            "date": time.strftime("%Y-%m-%d")}
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "ebm_step.json").write_text(json.dumps(result, indent=1))
  for r in rows:
    print(json.dumps(r))
  print(json.dumps(memory))


if __name__ == "__main__":
  main()
