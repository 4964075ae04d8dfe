"""Multi-host training without Ray: which processes make up the job, and joining them.

    srun --ntasks 4 --nodes 4 scaler train CONFIG          # SLURM: from its environment
    mpirun -np 4 scaler train CONFIG                       # Open MPI: likewise
    gcloud compute tpus tpu-vm ssh NAME --worker=all --command "scaler train CONFIG"
    scaler train CONFIG --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0  # by hand

The job's processes come from the three flags, or else from the environment exactly as
JAX's own cluster detection reads it (`jax._src.clusters`: SLURM, Open MPI, Cloud TPU VMs
on GCE and GKE, Kubernetes); with neither, the job is this one process. Flags and
environment that disagree are refused, before anything starts.

Collectives are the backend's own: NCCL between GPUs, ICI within a TPU slice and DCN
across slices. `jax_cpu_collectives_implementation` concerns only the CPU backend: gloo
when the job runs on CPUs, nothing otherwise. After `jax.distributed.initialize` JAX's
preemption notifier owns SIGTERM; nothing here installs a Python handler for it (see
scaler/checkpoint_preemption.py).
"""

import dataclasses
import logging
import os
import re

from scaler.errors import UserError

log = logging.getLogger("scaler")

INIT_TIMEOUT_S = 300      # JAX's default: the slowest process of a scheduled job to start
# The variables each scheduler sets for the process count and rank, to name them in errors.
_VARIABLES = {"slurm": ("SLURM_NTASKS", "SLURM_PROCID"),
              "ompi": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")}
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):(\d+)$")


@dataclasses.dataclass(frozen=True)
class Job:
  coordinator: str             # process 0's ADDR:PORT
  num_processes: int
  process_id: int
  source: str                  # "flags" or the JAX cluster environment's name (slurm, ...)
  local_device_ids: tuple | None = None   # what the scheduler assigned (one GPU per task)


def _cluster_env():
  """JAX's cluster environment that is present here, or None (JAX's order and rules)."""
  from jax._src import clusters
  for env in clusters.ClusterEnv._cluster_types:
    if not env.opt_in_only_method and env.is_env_present():
      return env
  return None


def _check_flags(args) -> None:
  given = {f"--{n.replace('_', '-')}": getattr(args, n, None)
           for n in ("coordinator", "num_processes", "process_id")}
  if all(v is None for v in given.values()):
    return
  if getattr(args, "hosts", None) is not None:
    raise UserError("--hosts starts the hosts through Ray; --coordinator, --num-processes "
                    "and --process-id join a job started otherwise: give one or the other")
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise UserError(f"{', '.join(missing)} missing: --coordinator ADDR:PORT, --num-processes "
                    "N and --process-id I go together")
  if not _ADDRESS.match(args.coordinator) or not 0 < int(_ADDRESS.match(args.coordinator)[2]) < 65536:
    raise UserError(f"--coordinator {args.coordinator}: needs ADDR:PORT, process 0's address "
                    "and a free port on it, e.g. 10.0.0.1:1234")
  if args.num_processes < 1:
    raise UserError(f"--num-processes {args.num_processes}: needs at least 1")
  if not 0 <= args.process_id < args.num_processes:
    raise UserError(f"--process-id {args.process_id} is outside [0, {args.num_processes}): "
                    f"the processes of a job are numbered 0 to --num-processes - 1")


def _from_environment(env) -> Job:
  """The job as JAX's cluster detection reads it; a malformed variable is a UserError."""
  from jax._src import clusters
  try:
    coordinator, n, pid, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, env.name, INIT_TIMEOUT_S)
  except (KeyError, ValueError, RuntimeError) as e:
    raise UserError(f"the {env.name} environment does not describe a job: "
                    f"{type(e).__name__}: {e}") from None
  if not 0 <= pid < n:
    count, rank = _VARIABLES.get(env.name, ("its process count", "its process id"))
    raise UserError(f"the {env.name} environment gives process id {pid} of {n} ({rank}, "
                    f"{count}): outside [0, {n})")
  return Job(coordinator, n, pid, env.name, tuple(local_ids) if local_ids else None)


def job(args, environ=None) -> Job | None:
  """The multi-process job this `scaler train` belongs to, or None for one process.

  Raises UserError for flags out of range and for flags that the environment contradicts
  (JAX_COORDINATOR_ADDRESS, or a scheduler's process count or rank).
  """
  environ = os.environ if environ is None else environ
  _check_flags(args)
  flags = getattr(args, "coordinator", None) is not None
  if getattr(args, "hosts", None) is not None:
    return None   # the Ray launcher's own; its hosts join through launch/host.py
  env = _cluster_env()
  found = _from_environment(env) if env is not None else None
  if not flags:
    return found if found is not None and found.num_processes > 1 else None
  mine = Job(args.coordinator, args.num_processes, args.process_id, "flags")
  address = environ.get("JAX_COORDINATOR_ADDRESS")
  if address and address != mine.coordinator:
    raise UserError(f"--coordinator {mine.coordinator} disagrees with "
                    f"JAX_COORDINATOR_ADDRESS={address}; unset it or give the same address")
  if found is not None:
    count, rank = _VARIABLES.get(found.source, ("its process count", "its process id"))
    for flag, mine_v, theirs, var in (("--num-processes", mine.num_processes,
                                       found.num_processes, count),
                                      ("--process-id", mine.process_id, found.process_id, rank)):
      if mine_v != theirs:
        raise UserError(f"{flag} {mine_v} disagrees with the {found.source} environment "
                        f"({var} gives {theirs}); drop the flags to use the environment, or "
                        "start the processes outside the scheduler's job step")
  return mine


def cpu_collectives(environ=None) -> str | None:
  """gloo when the job may run on CPUs (JAX_PLATFORMS unset or naming cpu); None when it
  runs on accelerators only, whose collectives are their own (NCCL, ICI/DCN)."""
  environ = os.environ if environ is None else environ
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  return "gloo" if not platforms or "cpu" in platforms else None


def initialize(coordinator: str, num_processes: int, process_id: int, *, bind: str | None,
               local_device_ids=None, init_timeout: int = INIT_TIMEOUT_S,
               heartbeat_timeout: int = 100, shutdown_timeout: int = 300) -> None:
  """jax.distributed.initialize with every argument explicit, so that no stale variable
  of another job or scheduler overrides them (cluster detection is off)."""
  import jax

  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives())
  jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
      local_device_ids=list(local_device_ids) if local_device_ids else None,
      coordinator_bind_address=bind if process_id == 0 else None,
      cluster_detection_method="deactivate", initialization_timeout=init_timeout,
      heartbeat_timeout_seconds=heartbeat_timeout, shutdown_timeout_seconds=shutdown_timeout)


def _bind_address(job: Job) -> str | None:
  """Where process 0's coordinator listens: JAX_COORDINATOR_BIND_ADDRESS if set; else the
  address given with --coordinator when it is an IP address (127.0.0.1 on one machine);
  else every interface, as JAX does on a scheduler's nodes (None)."""
  if os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
    return os.environ["JAX_COORDINATOR_BIND_ADDRESS"]
  host = job.coordinator.rsplit(":", 1)[0].strip("[]")
  is_ip = re.fullmatch(r"[0-9.]+", host) or ":" in host
  return job.coordinator if job.source == "flags" and is_ip else None


def start(args) -> None:
  """Joins the job `args` and the environment describe, or starts the one-process runtime
  (whose preemption notifier a single process needs too). Once per process."""
  from scaler import checkpoint_preemption

  given = any(getattr(args, n, None) is not None
              for n in ("coordinator", "num_processes", "process_id"))
  if checkpoint_preemption.runtime_started() and not given:
    return   # a Ray host, or a second call: the environment need not be read again
  this = job(args)   # flags are checked, and compared with the environment, in any case
  if checkpoint_preemption.runtime_started():
    return
  if this is None:
    checkpoint_preemption.start_runtime()
    return
  print(f"scaler: process {this.process_id} of {this.num_processes} ({this.source}), "
        f"coordinator {this.coordinator}; waiting up to {INIT_TIMEOUT_S} s for the others",
        flush=True)
  try:
    initialize(this.coordinator, this.num_processes, this.process_id,
               bind=_bind_address(this), local_device_ids=this.local_device_ids)
  except Exception as e:  # noqa: BLE001 - a timeout, an unreachable or taken address
    raise UserError(f"process {this.process_id} of {this.num_processes} could not join the "
                    f"job at {this.coordinator}: {type(e).__name__}: "
                    f"{' '.join(str(e).split())[:300]}") from None
