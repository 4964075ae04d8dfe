"""Checkpoints on 8 simulated CPU devices: round trips, keep policy, resharding, damaged
or unsafe directories, export, background errors and the preemption sync point."""

import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from scaler.checkpoint import Checkpointer
from scaler.config import CheckpointConfig
from scaler.errors import UserError
from scaler.export import export

RECORD = {"scaler_version": "test", "mesh": {"data": 8, "fsdp": 1, "tensor": 1},
          "process_count": 1, "data_fingerprint": "abc"}


def mesh_of(shape, devices=None):
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), ("data", "fsdp", "tensor"))


def shardings(tree, mesh, matrix_spec):
  """`matrix_spec` for 2-D arrays, replicated for the rest."""
  return jax.tree.map(
      lambda a: NamedSharding(mesh, matrix_spec if a.ndim == 2 else P()), tree)


def make_state(mesh, matrix_spec=P("data"), width=8, ema=True):
  """A state shaped like scaler's, with an adam state moved one step off zero."""
  net = {"w": jnp.arange(16 * width, dtype=jnp.float32).reshape(16, width) / 7,
         "b": jnp.linspace(-1, 1, width)}
  tx = optax.adam(1e-2)
  opt = tx.init(net)
  _, opt = tx.update(jax.tree.map(lambda p: jnp.sin(p) + 0.5, net), opt, net)
  state = {"step": jnp.int32(7), "params": {"net": net}, "opt_state": {"net": opt},
           "ema": {"net": jax.tree.map(lambda p: p * 0.5, net)} if ema else {},
           "rest": {"net": {"count": jnp.int32(3)}}, "extra": None}
  return jax.device_put(state, shardings(state, mesh, matrix_spec))


def abstract(state, mesh, matrix_spec):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      state, shardings(state, mesh, matrix_spec))


def cfg(**kw):
  return CheckpointConfig(**{"every": 1, "keep_last": 3, **kw})


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), strict=True)


def snapshot(path):
  """Every file under `path` with its size and modification time."""
  return {os.path.join(r, f): (os.path.getsize(os.path.join(r, f)),
                               os.path.getmtime(os.path.join(r, f)))
          for r, _, files in os.walk(path) for f in files}


@pytest.fixture(scope="module")
def mesh8():
  return mesh_of((8, 1, 1))


@pytest.fixture(scope="module")
def state(mesh8):
  return make_state(mesh8)


def saved(directory, state, steps, **kw):
  ckpt = Checkpointer(str(directory), cfg(**kw), RECORD)
  for s in steps:
    assert ckpt.save(s, state, {"step": s, "seed": 0})
  ckpt.wait()
  return ckpt


def test_round_trip_is_bitwise(tmp_path, mesh8, state):
  ckpt = Checkpointer(str(tmp_path), cfg(every=5), RECORD)
  assert not ckpt.save(3, state, {"step": 3, "seed": 0})      # not a multiple of every
  assert ckpt.save(10, state, {"step": 10, "seed": 1, "epoch": 2})
  assert not ckpt.save(10, state, {"step": 10, "seed": 1}, force=True)  # already saved
  ckpt.wait()
  assert ckpt.all_steps() == [10] and ckpt.latest_step() == 10
  target = abstract(state, mesh8, P("data"))
  restored, data_state, step = ckpt.restore(target)
  assert step == 10 and data_state == {"step": 10, "seed": 1, "epoch": 2}
  assert_same(restored, state)
  assert type(restored["opt_state"]["net"][0]) is optax.ScaleByAdamState
  assert jax.tree.map(lambda a: a.sharding, restored) == jax.tree.map(
      lambda a: a.sharding, target)
  assert '"data_fingerprint": "abc"' in (tmp_path / "10" / "record" / "metadata").read_text()
  ckpt.close()


def test_async_save_returns_before_commit(tmp_path, state):
  ckpt = Checkpointer(str(tmp_path), cfg(async_save=True), RECORD)
  assert ckpt.save(1, state, {"step": 1})
  ckpt.wait()
  assert ckpt.all_steps() == [1]
  assert (tmp_path / "1" / "commit_success.txt").exists()
  assert not list(tmp_path.glob("*.orbax-checkpoint-tmp*"))
  ckpt.close()


def test_keep_last_and_keep_every(tmp_path, state):
  small = {"step": state["step"], "params": state["params"]}
  ckpt = saved(tmp_path, small, range(1, 11), keep_last=2, keep_every=4)
  assert ckpt.all_steps() == [4, 8, 9, 10]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "4", "8", "9"]
  ckpt.close()


@pytest.mark.parametrize("shape,spec", [((1, 2, 2), P("fsdp", "tensor")), ((1, 1, 1), P())],
                         ids=["4dev-fsdp2-tensor2", "1dev"])
def test_restore_onto_another_mesh(tmp_path, state, shape, spec):
  ckpt = saved(tmp_path, state, [5])
  n = int(np.prod(shape))
  mesh = mesh_of(shape, jax.devices()[:n])
  target = abstract(state, mesh, spec)
  restored, _, _ = ckpt.restore(target)
  assert_same(restored, state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert got.sharding == want.sharding
    assert {d.id for d in got.devices()} <= {d.id for d in mesh.devices.flat}
  w = restored["params"]["net"]["w"]
  if n == 4:
    assert w.addressable_shards[0].data.shape == (8, 4)   # really split, not gathered
  ckpt.close()


def _chunk_files(step_dir):
  return sorted((p for p in step_dir.glob("state/**/d/*") if p.is_file()),
                key=lambda p: p.stat().st_size)


# A failed tensorstore read leaves callbacks aimed at orbax's closed event loop; Python
# reports them when they are collected. Collected here, so other tests stay strict.
damaged_read = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@damaged_read
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, mesh8, state, caplog, damage):
  ckpt = saved(tmp_path, state, [1, 2])
  for f in _chunk_files(tmp_path / "2"):
    if damage == "truncate":
      os.truncate(f, f.stat().st_size // 2)
    else:
      f.unlink()
  before = snapshot(tmp_path)
  with caplog.at_level(logging.WARNING, logger="scaler"):
    restored, data_state, step = ckpt.restore(abstract(state, mesh8, P("data")))
  assert step == 1 and data_state["step"] == 1
  assert_same(restored, state)
  assert "CHECKPOINT STEP 2" in caplog.text and "CANNOT BE RESTORED" in caplog.text
  assert snapshot(tmp_path) == before        # a failed restore changes nothing
  with pytest.raises(UserError, match="step 2 .* cannot be restored"):
    ckpt.restore(abstract(state, mesh8, P("data")), step=2)
  # Training on from step 1 saves step 2 again; the damaged one is moved aside, kept.
  assert ckpt.save(2, state, {"step": 2})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  assert len(list(tmp_path.glob("2.abandoned-*"))) == 1
  assert ckpt.restore(abstract(state, mesh8, P("data")))[2] == 2
  ckpt.close()
  gc.collect()


@damaged_read
def test_nothing_restorable_is_an_error_not_step_0(tmp_path, mesh8, state):
  ckpt = saved(tmp_path, state, [1])
  for f in _chunk_files(tmp_path / "1"):
    f.unlink()
  with pytest.raises(UserError, match="no checkpoint .* can be restored"):
    ckpt.restore(abstract(state, mesh8, P("data")))
  ckpt.close()
  gc.collect()


def test_missing_step_lists_available(tmp_path, mesh8, state):
  ckpt = saved(tmp_path, state, [1, 2])
  with pytest.raises(UserError, match=r"no checkpoint at step 7 .*available steps: 1, 2"):
    ckpt.restore(abstract(state, mesh8, P("data")), step=7)
  ckpt.close()


def test_architecture_mismatch_lists_paths(tmp_path, mesh8, state):
  ckpt = saved(tmp_path, state, [1])
  other = make_state(mesh8, width=4)
  other["params"]["net"]["extra_layer"] = jnp.zeros(3)
  with pytest.raises(UserError) as err:
    ckpt.restore(abstract(other, mesh8, P("data")))
  message = str(err.value)
  assert "params/net/w: saved (16, 8), expected (16, 4)" in message
  assert "opt_state/net/0/mu/w: saved (16, 8), expected (16, 4)" in message
  assert "params/net/extra_layer: missing from the checkpoint" in message
  assert "CANNOT BE RESTORED" not in message
  ckpt.close()


def test_symlinks_refused(tmp_path, mesh8, state):
  real = tmp_path / "real"
  saved(real, state, [1]).close()
  (tmp_path / "link").symlink_to(real)
  with pytest.raises(UserError, match="symbolic link"):
    Checkpointer(str(tmp_path / "link"), cfg(), RECORD)
  # A step directory that resolves outside the root.
  outside = tmp_path / "outside"
  (real / "1").rename(outside)
  (real / "1").symlink_to(outside)
  ckpt = Checkpointer(str(real), cfg(), RECORD)
  with pytest.raises(UserError, match="outside the checkpoint directory"):
    ckpt.restore(abstract(state, mesh8, P("data")))
  ckpt.close()


def test_uncommitted_steps_ignored(tmp_path, mesh8, state):
  import shutil
  ckpt = saved(tmp_path, state, [1])
  # A save killed before its rename, and one copied without its commit file.
  shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp")
  shutil.copytree(tmp_path / "1", tmp_path / "3")
  (tmp_path / "3" / "commit_success.txt").unlink()
  _, _, step = ckpt.restore(abstract(state, mesh8, P("data")))
  assert step == 1 and ckpt.all_steps() == [1]
  ckpt.close()
  fresh = Checkpointer(str(tmp_path), cfg(), RECORD)
  assert fresh.all_steps() == [1] and fresh.latest_step() == 1
  assert (tmp_path / "2.orbax-checkpoint-tmp").exists()   # a reader deletes nothing
  assert fresh.save(4, state, {"step": 4})
  fresh.wait()
  assert fresh.all_steps() == [1, 4]
  assert not (tmp_path / "2.orbax-checkpoint-tmp").exists()   # cleaned before saving
  fresh.close()


def test_export_restores_with_plain_orbax(tmp_path, state):
  later = jax.tree.map(lambda x: x + 1, state)
  ckpt = saved(tmp_path / "ckpt", state, [1])
  ckpt.save(2, later, {"step": 2})
  ckpt.close()
  assert export(str(tmp_path / "ckpt"), None, str(tmp_path / "out")) == str(tmp_path / "out")
  with ocp.StandardCheckpointer() as ckptr:
    weights = ckptr.restore(str(tmp_path / "out"))
  assert_same(weights, jax.tree.map(np.asarray, later["ema"]))   # the latest step's EMA
  assert isinstance(weights["net"]["w"], np.ndarray)
  with pytest.raises(UserError, match="not empty"):
    export(str(tmp_path / "ckpt"), 1, str(tmp_path / "out"))
  with pytest.raises(UserError, match="available steps: 1, 2"):
    export(str(tmp_path / "ckpt"), 9, str(tmp_path / "out2"))


def test_export_without_ema_takes_params(tmp_path, mesh8):
  plain = make_state(mesh8, ema=False)
  saved(tmp_path / "ckpt", plain, [1]).close()
  (tmp_path / "out").mkdir()                       # existing but empty is fine
  export(str(tmp_path / "ckpt"), 1, str(tmp_path / "out"))
  with ocp.StandardCheckpointer() as ckptr:
    assert_same(ckptr.restore(str(tmp_path / "out")), jax.tree.map(np.asarray, plain["params"]))


def test_background_error_is_raised(tmp_path, state, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  ckpt = saved(tmp_path, state, [1], keep_last=1)

  async def full_disk(self):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk)
  assert ckpt.save(2, state, {"step": 2})          # returns; the commit fails behind it
  with pytest.raises(OSError, match="No space left"):
    ckpt.wait()
  monkeypatch.undo()
  assert ckpt.all_steps() == [1]                   # the failed step is not listed ...
  assert (tmp_path / "1" / "commit_success.txt").exists()   # ... and step 1 survived
  ckpt.close()


def test_background_error_raised_by_next_save(tmp_path, state, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  async def full_disk(self):
    raise OSError(28, "No space left on device")

  ckpt = Checkpointer(str(tmp_path), cfg(), RECORD)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk)
  assert ckpt.save(1, state, {"step": 1})
  with pytest.raises(OSError, match="No space left"):
    for step in range(2, 200):                    # the next save() call raises it
      ckpt.save(step, state, {"step": step})
  monkeypatch.undo()
  ckpt.close()


PREEMPTION_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    from scaler import checkpoint_preemption as preemption
    assert not preemption.reached(0)        # no runtime: never True
    preemption.start_runtime()              # before any JAX computation
    import jax.numpy as jnp
    from scaler.checkpoint import Checkpointer
    from scaler.config import CheckpointConfig
    ckpt = Checkpointer(sys.argv[1], CheckpointConfig(every=4), {})
    state = {"step": jnp.int32(0), "params": {"w": jnp.ones((4, 4))}}
    for step in range(1, 2000):             # the train loop's order of calls
      ckpt.save(step, state, {"step": step})
      if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      if ckpt.reached_preemption(step):
        ckpt.save(step, state, {"step": step}, force=True)
        ckpt.wait()
        print("reached", step, ckpt.latest_step())
        sys.exit(0)
      time.sleep(0.01)
    sys.exit("never reached")
""")


def test_preemption_sync_point_single_process(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
  out = subprocess.run([sys.executable, "-c", PREEMPTION_SCRIPT, str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  _, step, latest = out.stdout.split()
  assert int(step) > 3 and int(latest) == int(step)


def test_relative_directories_save_restore_and_export(tmp_path, state, monkeypatch):
  # The default run directory (runs/NAME) is relative; orbax only takes absolute paths.
  monkeypatch.chdir(tmp_path)
  ckpt = Checkpointer("runs/x/checkpoints", cfg(), RECORD)
  assert ckpt.save(1, state, {"step": 1, "seed": 0})
  ckpt.wait()
  assert ckpt.all_steps() == [1]
  restored = ckpt.restore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  ckpt.close()
  assert_same(restored[0], state)
  export("runs/x/checkpoints", None, "exported")
  with ocp.StandardCheckpointer() as ckptr:
    assert_same(ckptr.restore(str(tmp_path / "exported")), jax.tree.map(np.asarray, state["ema"]))


def test_small_replicated_arrays_save_without_compiling(tmp_path, mesh8, caplog):
  # orbax's replica-parallel save slices every replicated array on every device: one
  # compile per device and shape, seconds at a small model's first save. The checksums
  # are one compiled function for the whole state, compiled once.
  rep = NamedSharding(mesh8, P())
  small = {"w": jax.device_put(jnp.ones((64, 64)), rep), "b": jax.device_put(jnp.ones(64), rep)}
  ckpt = Checkpointer(str(tmp_path), cfg(), RECORD)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    assert ckpt.save(1, small, {"step": 1})
    ckpt.wait()
  ckpt.close()
  compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
  assert len(compiled) <= 1 and all("_all_checksums" in m for m in compiled), compiled


def test_only_the_loop_asks_jax_for_the_stop_step(tmp_path, state, monkeypatch):
  # JAX's sync manager takes each call's step as the current one: orbax asking from its
  # finalize thread with an older step could set the stop step behind the loop.
  calls = []

  def sync_point(step):
    calls.append((threading.current_thread() is threading.main_thread(), step))
    return step == 4

  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", sync_point)
  ckpt = Checkpointer(str(tmp_path), cfg(every=2), RECORD)
  for step in range(1, 5):
    ckpt.save(step, state, {"step": step, "seed": 0})
    stop = ckpt.reached_preemption(step)
  ckpt.close()
  assert stop and calls == [(True, s) for s in range(1, 5)]


@pytest.mark.parametrize("bad", [{"keep_last": 0}, {"every": -1}, {"keep_every": -2}])
def test_config_checked(tmp_path, bad):
  with pytest.raises(UserError, match="checkpoint."):
    Checkpointer(str(tmp_path), cfg(**bad), RECORD)
