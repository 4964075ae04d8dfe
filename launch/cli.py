"""The `scaler` command: train, sample, layout, export.

    scaler train configs/diffusion_moons.yaml --debug            # 8 simulated CPU devices
    scaler train CONFIG optimizer.lr=3e-4 mesh.fsdp=4 --run-dir runs/x
    scaler sample runs/x --num 1000 --out samples.png [--label K]
    scaler layout CONFIG --devices 8
    scaler train CONFIG --hosts 2 --devices-per-host 2   # N host processes through Ray

jax is imported only after the arguments are read: the number of simulated devices has
to be set before jax starts.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


def _parser():
  p = argparse.ArgumentParser(prog="scaler", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train a config")
  t.add_argument("config", help="a YAML config, e.g. configs/diffusion_moons.yaml")
  t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
  t.add_argument("--run-dir", help="where checkpoints, metrics and plots go "
                 "(default runs/<config name>); an existing one with checkpoints resumes")
  t.add_argument("--resume-from", type=int, help="resume from this checkpoint step")
  t.add_argument("--debug", action="store_true",
                 help="one process on simulated CPU devices, NaN/Inf checked every step")
  t.add_argument("--devices", type=int, help="simulated devices with --debug (default 8)")
  h = t.add_argument_group("multi-host (through Ray; see launch/README.md)")
  h.add_argument("--hosts", type=int, help="host processes, one per placement-group bundle")
  h.add_argument("--devices-per-host", type=int, help="accelerators per host (default: a "
                 "node's GPUs or TPU chips), or simulated CPU devices (default 1)")
  h.add_argument("--address", help="a running Ray cluster (host:port or 'auto'); default: "
                 "RAY_ADDRESS, else a local instance on 127.0.0.1")
  h.add_argument("--max-failures", type=int, default=3,
                 help="restarts after a host dies or stalls (preemptions are not counted)")
  h.add_argument("--stall-timeout", type=float, default=300.0,
                 help="seconds without a step before a host's stacks are dumped and the "
                 "group restarts")
  h.add_argument("--placement-timeout", type=float, default=45.0,
                 help="seconds to wait for the cluster to grant every host")

  s = sub.add_parser("sample", help="draw samples from a trained run")
  s.add_argument("run_dir")
  s.add_argument("--num", type=int, default=1000)
  s.add_argument("--out", required=True, help=".npz (array 'samples') or .png")
  s.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--label", type=int, help="draw class K (a conditional run)")

  lay = sub.add_parser("layout", help="parameter shardings and step memory, no training")
  lay.add_argument("config")
  lay.add_argument("overrides", nargs="*")
  lay.add_argument("--devices", type=int, default=8, help="simulated devices")

  e = sub.add_parser("export", help="write a parameters-only checkpoint for plain orbax")
  e.add_argument("run_dir")
  e.add_argument("--out", required=True)
  e.add_argument("--step", type=int)
  return p


def simulate_devices(n: int) -> None:
  """N simulated CPU devices; must run before jax is imported."""
  if "jax" in sys.modules:
    raise RuntimeError("simulate_devices() must run before jax is imported")
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def configure_logging() -> None:
  # force: in a host process jax (absl) has configured the root logger already.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      force=True)
  for noisy in ("absl", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def _parse(argv):
  """Like parse_args, but `key=value` overrides may also follow the options, as users
  write them (argparse alone stops collecting positionals at the first option)."""
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  late = [a for a in extra if "=" in a and not a.startswith("-")]
  unknown = [a for a in extra if a not in late]
  if unknown or (late and not hasattr(args, "overrides")):
    parser.error(f"unrecognized arguments: {' '.join(unknown or late)}")
  if late:
    args.overrides = [*args.overrides, *late]
  return args


def main(argv=None) -> None:
  args = _parse(argv)
  configure_logging()
  multi_host = args.command == "train" and args.hosts is not None
  if args.command == "train" and args.devices is not None and not args.debug:
    _fail(f"--devices {args.devices} simulates CPU devices and needs --debug; without it "
          "the run uses the machine's real devices (--devices-per-host with --hosts)")
  if args.command == "train" and args.debug and not multi_host:
    devices = 8 if args.devices is None else args.devices
    if devices < 1:
      _fail(f"--devices {devices}: needs at least 1")
    simulate_devices(devices)
  elif args.command == "layout":
    if args.devices < 1:
      _fail(f"--devices {args.devices}: needs at least 1")
    simulate_devices(args.devices)

  from scaler.errors import UserError
  if multi_host:
    from launch import ray_launcher as commands  # the driver never imports jax
  else:
    from launch import commands
  try:
    code = getattr(commands, args.command)(args)
  except UserError as e:
    _fail(str(e))
  sys.exit(code or 0)


def _fail(message: str) -> None:
  print(f"scaler: error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)
