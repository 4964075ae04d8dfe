"""The `scaler` command: train, sample, layout, export.

    scaler train configs/diffusion_moons.yaml --debug            # 8 simulated CPU devices
    scaler train CONFIG optimizer.lr=3e-4 mesh.fsdp=4 --run-dir runs/x
    scaler sample runs/x --num 1000 --out samples.png [--label K]
    scaler layout CONFIG --devices 8
    scaler train CONFIG --hosts 2 --devices-per-host 2   # N host processes through Ray
    srun -n 4 scaler train CONFIG                        # one of N processes, without Ray

jax is imported only after the arguments are read: the number of simulated devices has
to be set before jax starts.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from launch import early_sigterm

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 42   # as commands.EXIT_PREEMPTED: resumable


class _Help(argparse.HelpFormatter):
  """Shows an option's default where it has one and its help does not say it already."""

  def _get_help_string(self, action):
    text = action.help or ""
    silent = action.default is None or action.default is False or action.default == argparse.SUPPRESS
    if not silent and "default" not in text:
      text += " (default: %(default)s)"
    return text


def _parser():
  fmt = _Help
  p = argparse.ArgumentParser(prog="scaler", description=__doc__.split("\n")[0],
                              formatter_class=fmt)
  p.add_argument("--version", action="version", version=f"scaler {_version()}")
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train a config, or go on with a run directory's own",
                     formatter_class=fmt)
  t.add_argument("config", nargs="?", help="a YAML config, e.g. configs/diffusion_moons.yaml; "
                 "omit it with --run-dir to resume that run with its saved config")
  t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.lr=3e-4")
  t.add_argument("--run-dir", help="where checkpoints, metrics and plots go (default: "
                 "runs/<config name>-<hash of the resolved config>); one with checkpoints "
                 "of the same config resumes")
  t.add_argument("--resume-from", type=int, help="resume from this checkpoint step "
                 "(default: the latest)")
  t.add_argument("--allow-config-change", action="store_true",
                 help="resume a run directory with a different config; the change is "
                 "recorded in it and the new config saved beside the old")
  t.add_argument("--debug", action="store_true",
                 help="one process on simulated CPU devices, NaN/Inf checked every step")
  t.add_argument("--devices", type=int, help="simulated devices with --debug (default 8)")
  j = t.add_argument_group("multi-host without Ray (default: from SLURM, Open MPI or a "
                           "Cloud TPU VM's environment, as JAX detects it; see launch/README.md)")
  j.add_argument("--coordinator", metavar="ADDR:PORT",
                 help="process 0's address and a free port on it; every process gives the same")
  j.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
  j.add_argument("--process-id", type=int, metavar="I", help="this process, in [0, N)")
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

  s = sub.add_parser("sample", help="draw samples from a trained run", formatter_class=fmt)
  s.add_argument("run_dir", help="a run directory (scaler train's --run-dir)")
  s.add_argument("--num", type=int, default=1000, help="number of samples")
  s.add_argument("--out", required=True, help="an .npz (array 'samples') or .png to create")
  s.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  s.add_argument("--seed", type=int, default=0, help="sampling seed")
  s.add_argument("--chunk", type=int, default=4096,
                 help="samples drawn per call; larger --num is drawn in chunks and streamed")
  s.add_argument("--from-buffer", action="store_true",
                 help="start the chains from the run's replay buffer (EBM), not from noise")
  s.add_argument("--label", type=int, help="class of every sample (class-conditional runs)")
  s.add_argument("--guidance", type=float, help="classifier-free guidance scale w "
                 "(default: the run's family.condition.guidance_scale)")

  s.add_argument("--temperature", type=float, help="sampling temperature of flow and "
                 "autoregressive runs (default: the run's family.temperature, or 1)")
  s.add_argument("--top-k", type=int, help="autoregressive runs: draw each token from the k "
                 "most likely (default: the run's family.top_k; 0: all)")

  v = sub.add_parser("eval", help="held-out likelihood and sample quality of a trained run",
                     formatter_class=fmt)
  v.add_argument("run_dir", help="a run directory (scaler train's --run-dir)")
  v.add_argument("--split", default="test", choices=("test", "train"), help="data split")
  v.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  v.add_argument("--num", type=int, default=2000, help="held-out examples (at most the "
                 "split's); num/2 samples are scored against held-out data")
  v.add_argument("--metrics", default="all", choices=("all", "likelihood", "quality"),
                 help="what to compute")
  v.add_argument("--devices", type=int, help="simulated CPU devices, to evaluate a --debug "
                 "run on its own mesh (default: this machine's devices)")

  lay = sub.add_parser("layout", help="state shardings and step memory, no training",
                       formatter_class=fmt)
  lay.add_argument("config", help="a YAML config")
  lay.add_argument("overrides", nargs="*", help="dotted key=value overrides")
  lay.add_argument("--devices", type=int, default=8, help="simulated devices")

  e = sub.add_parser("export", help="write a weights-only checkpoint for plain orbax",
                     formatter_class=fmt)
  e.add_argument("run_dir", help="a run directory (scaler train's --run-dir)")
  e.add_argument("--out", required=True, help="a new (or empty) directory")
  e.add_argument("--step", type=int, help="checkpoint step (default: the latest)")

  sub.add_parser("list", help="configs, families, networks, data sources, rule presets",
                 formatter_class=fmt)

  d = sub.add_parser("data", help="prepare datasets", formatter_class=fmt).add_subparsers(dest="data_command",
                                                                     required=True)
  c = d.add_parser("convert", help="an image folder, .npy or .npz -> ArrayRecord shards",
                 formatter_class=fmt)
  c.add_argument("src", help="a folder of images (one subfolder per class), .npy or .npz")
  c.add_argument("--out", required=True, help="a new folder for the shards")
  c.add_argument("--shards", type=int, default=1, help="ArrayRecord files to write")
  c.add_argument("--key", help="the .npz array of images (default: its only one)")
  c.add_argument("--label-key", help="the .npz array of integer labels")
  return p


def _version() -> str:
  from importlib import metadata
  try:
    return metadata.version("scaler")
  except metadata.PackageNotFoundError:
    return "unknown"


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
  config = getattr(args, "config", None)
  if config is not None and "=" in config and not Path(config).exists():
    # `scaler train --run-dir DIR key=value`: the first override landed in `config`.
    args.overrides, args.config = [config, *args.overrides], None
  return args


def main(argv=None) -> None:
  args = _parse(argv)
  multi_host = args.command == "train" and args.hosts is not None
  # Training in this process: alone, or as one process of a job started without Ray.
  train_here = args.command == "train" and not multi_host
  if train_here:
    early_sigterm.install()   # until JAX's notifier exists, a SIGTERM is only recorded
  try:
    _run(args, multi_host, train_here)
  finally:
    early_sigterm.release()


def _run(args, multi_host: bool, train_here: bool) -> None:
  configure_logging()
  if args.command == "train" and args.devices is not None and not args.debug:
    _fail(f"--devices {args.devices} simulates CPU devices and needs --debug; without it "
          "the run uses the machine's real devices (--devices-per-host with --hosts)")
  if args.command == "train" and args.debug and not multi_host:
    devices = 8 if args.devices is None else args.devices
    if devices < 1:
      _fail(f"--devices {devices}: needs at least 1")
    simulate_devices(devices)
  elif args.command == "layout" or (args.command == "eval" and args.devices is not None):
    if args.devices < 1:
      _fail(f"--devices {args.devices}: needs at least 1")
    simulate_devices(args.devices)

  from scaler.errors import UserError
  if multi_host:
    from launch import ray_launcher as commands  # the driver never imports jax
  elif args.command == "data":
    from launch import data_commands as commands
  else:
    from launch import commands
  if train_here:
    _preempted_at_start_up(args)
  elif args.command == "train":
    _check_distributed(args)
  try:
    code = getattr(commands, {"list": "show_list", "eval": "evaluate"}.get(args.command,
                                                                      args.command))(args)
  except UserError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    print("\nscaler: interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(code or 0)


def _check_distributed(args) -> None:
  from launch import distributed
  from scaler.errors import UserError
  try:
    distributed.job(args)
  except UserError as e:
    _fail(str(e))


def _preempted_at_start_up(args) -> None:
  """Starts JAX's runtime (and its SIGTERM notifier): this process alone, or joining the
  job of the flags or the environment (launch/distributed.py); exits 42 if a SIGTERM came
  first.

  `commands.train` starts the runtime too; here it is started a step earlier, so that
  the hand-over from `early_sigterm` to JAX's notifier happens in one place.
  """
  from launch import distributed
  from scaler import checkpoint_preemption
  from scaler.errors import UserError
  try:
    distributed.start(args)
  except UserError as e:
    _fail(str(e))
  if early_sigterm.hand_over(checkpoint_preemption.notifier_installed()):
    print("scaler: preempted during start-up (SIGTERM before training began); nothing "
          "to save; run the same command again to resume", flush=True)
    sys.exit(EXIT_PREEMPTED)


def _fail(message: str) -> None:
  print(f"scaler: error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)
