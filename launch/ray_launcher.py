"""`scaler train CONFIG --hosts N`: the driver of a multi-host job, with Ray as the engine.

    scaler train configs/tiny_diffusion.yaml --hosts 2 --devices-per-host 2   # one machine
    scaler train CONFIG --hosts 4 --address auto                            # a Ray cluster

Stages: check the config and run directory, connect to Ray (or start it on 127.0.0.1),
reserve one placement-group bundle per host, then attempts. An attempt starts one actor
per host, each running a fresh `launch.host` process; host 0 is the JAX coordinator. The
driver forwards every line as `[host i] ...` and watches exit codes: the first host to
fail or stall brings the whole group down at once (JAX alone would wait for its
100-second heartbeat), and the next attempt resumes from the latest checkpoint. Failures
and preemptions have separate budgets, as in Levanter.
"""

import dataclasses
import os
import re
import signal
import sys
import time
from pathlib import Path

from launch import host as host_lib
from launch import ray_cluster
from scaler.errors import UserError

# glog's fatal-error trace: "*** Check failure stack trace: ***", then "    @ 0x7f.. fn".
_NATIVE_FRAME = re.compile(r"^\s*(@\s+0x[0-9a-f]+|\*\*\* Check failure stack trace)")
MAX_PREEMPTIONS = 1000    # a preemption is the cluster's doing, not the job's
POLL_S = 0.25
ACTOR_START_S = 120       # actors (worker processes) up, or the node is taken as lost
HOST_ANSWER_S = 30        # an actor that stays silent this long is taken as lost
PREEMPT_GRACE_S = 60      # peers finish their coordinated save after the first one exits
SETTLE_S = 1.5            # after a first failure, how long peers may still report theirs
SLOW_S = 600              # before the first step (compile, restore), as the host's watchdog
STOPPED_S = 2.0           # a host the kernel reports stopped (SIGSTOP), silent this long
SILENT_S = 3.0            # once peers stall, a host silent this long is the frozen one


@dataclasses.dataclass
class Outcome:
  kind: str   # done lost killed frozen stalled preempted user_error startup crashed
  rank: int = -1
  message: str = ""
  traceback: str = ""
  step: int = -1            # the host's last step
  ended_at: float = 0.0     # wall time the host process ended
  summary: list = dataclasses.field(default_factory=list)  # host 0's final lines

  def describe(self) -> str:
    return f"host {self.rank} {self.message}" if self.rank >= 0 else self.message


def _out(text: str) -> None:
  print(text, flush=True)


def _say(text: str) -> None:
  print(f"scaler: {text}", file=sys.stderr, flush=True)


def _check_args(args) -> None:
  for name in ("hosts", "devices_per_host"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise UserError(f"--{name.replace('_', '-')} {value}: needs at least 1")
  if args.max_failures < 0:
    raise UserError(f"--max-failures {args.max_failures}: must be 0 or more")
  if args.stall_timeout <= 0:
    raise UserError(f"--stall-timeout {args.stall_timeout}: must be positive")


def _prepare_run(args) -> Path:
  """The checks a single process makes, made once here, before anything starts."""
  from launch import commands
  from scaler import run_dir as run_dir_lib

  cfg, run_dir = commands.train_config(args)
  run_dir_lib.plan(run_dir, cfg, allow_config_change=args.allow_config_change,
                   resume_from=args.resume_from)
  return run_dir


def _train_argv(args, run_dir: Path, attempt: int) -> list[str]:
  argv = ["train", *([args.config] if args.config else []), *args.overrides,
          "--run-dir", str(run_dir)]
  if args.allow_config_change and attempt == 0:   # a restart resumes what attempt 0 saved
    argv.append("--allow-config-change")
  if args.resume_from is not None and attempt == 0:  # a restart takes the latest save
    argv += ["--resume-from", str(args.resume_from)]
  if args.debug:
    argv.append("--debug")
  return argv


def _classify(rank: int, code, status, ended_at, oom_kills=None) -> Outcome:
  """How one host ended, from its exit code, the status file it wrote and, for SIGKILL,
  the OOM kills its memory cgroup counted while it ran (None: not readable)."""
  status = status or {}
  message = status.get("message", "")
  if code < 0:
    name = signal.Signals(-code).name
    # SIGKILL also comes from people, schedulers and this launcher: out of memory only
    # when the kernel's OOM killer was at work in the host's cgroup meanwhile.
    hint = (" (out of memory: the kernel's OOM killer ran in its cgroup)"
            if -code == signal.SIGKILL and oom_kills else "")
    return Outcome("killed", rank, f"was killed by {name}{hint}", ended_at=ended_at)
  kind = {host_lib.EXIT_PREEMPTED: "preempted", host_lib.EXIT_STALLED: "stalled",
          host_lib.EXIT_USER_ERROR: "user_error", host_lib.EXIT_STARTUP: "startup"}.get(
              code, "crashed")
  step = status.get("step", -1)
  preempted = "was preempted" if step >= 0 else (
      "was preempted at start-up (SIGTERM before training began; nothing to save)")
  text = {"preempted": preempted, "stalled": message or "stalled",
          "user_error": message, "startup": f"failed at start-up: {message}"}.get(
              kind, f"failed (exit code {code}): {message or 'no report'}")
  return Outcome(kind, rank, text, status.get("traceback", ""), step, ended_at)


def root_cause(failures: list[Outcome]) -> Outcome:
  """The failure that brought the others down.

  A frozen host (its heartbeat silent, seen from outside) is the cause, the first to go
  silent if several: its peers stall after it inside collectives. A host stuck but alive
  holds its peers the same way: every watchdog fires, and the stuck host is the one whose
  last step is lowest (the others dispatched ahead). Otherwise the first host to end is
  the cause (peers abort after it, JAX's SIGABRT included); a preemption counts only when
  it is all there is, or when it came at start-up and ended first (its peers then fail
  for want of it).
  """
  frozen = [o for o in failures if o.kind == "frozen"]
  if frozen:
    return min(frozen, key=lambda o: o.ended_at)
  stalled = [o for o in failures if o.kind == "stalled"]
  if stalled:
    return min(stalled, key=lambda o: (o.step, o.ended_at))
  first = min(failures, key=lambda o: o.ended_at)
  if first.kind == "preempted" and first.step < 0:
    return first
  real = [o for o in failures if o.kind != "preempted"] or failures
  return min(real, key=lambda o: o.ended_at)


class Attempt:
  """One set of host processes, from start to the first failure or to the end."""

  def __init__(self, res, args, run_dir, attempt: int, local: bool):
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from launch.ray_hosts import HostActor

    self.ray, self.res, self.args, self.run_dir = ray, res, args, run_dir
    self.attempt, self.local = attempt, local
    remote = ray.remote(HostActor)
    custom = {k: v for k, v in res.bundle.items() if k not in ("CPU", "GPU")}
    # Each actor asks for its whole bundle: Ray then hands it the node's GPUs too.
    self.actors = [remote.options(
        num_cpus=res.bundle["CPU"], num_gpus=res.bundle.get("GPU", 0), resources=custom,
        max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(res.pg, i),
    ).remote(i) for i in range(args.hosts)]
    self.ended = [None] * args.hosts   # each host's Outcome, once it has ended
    self.beats = [None] * args.hosts   # each host's last heartbeat (launch/heartbeat.py)
    self.held = None                   # lines that came after the first failure
    self.summary = []

  def _start(self) -> None:
    ray, args, res = self.ray, self.args, self.res
    ip, port = ray.get(self.actors[0].address.remote(), timeout=ACTOR_START_S)
    coordinator = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    _say(f"attempt {self.attempt + 1}: {args.hosts} hosts x {res.devices} {res.platform} "
         f"device(s), coordinator {coordinator}")
    # Only the test hook crosses from the driver's shell; nothing else is inherited.
    extra = {k: os.environ[k] for k in ("SCALER_FAULT",) if k in os.environ}
    common = ["--hosts", str(args.hosts), "--coordinator", coordinator, "--attempt",
              str(self.attempt), "--stall-timeout", str(args.stall_timeout), "--",
              *_train_argv(args, self.run_dir, self.attempt)]
    cwd = os.getcwd() if self.local else None  # on a cluster: the job's working directory
    ray.get([a.start.remote(["--rank", str(i), *common], res.devices, res.platform == "cpu",
                            extra, cwd) for i, a in enumerate(self.actors)],
            timeout=ACTOR_START_S)

  def _poll(self) -> None:
    """Forwards new lines; records the outcome of each host that has ended."""
    ray = self.ray
    refs = {rank: a.poll.remote() for rank, a in enumerate(self.actors)
            if self.ended[rank] is None}
    for rank, ref in refs.items():
      try:
        report = ray.get(ref, timeout=HOST_ANSWER_S)
      except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
        self.ended[rank] = Outcome("lost", rank, f"was lost (its node or actor died: "
                                   f"{type(e).__name__})", ended_at=time.time())
        continue
      for line in report["lines"]:
        if self.held is None:
          _out(f"[host {rank}] {line}")
        else:
          self.held.append((rank, line))
        if rank == 0 and line.startswith("scaler: "):
          self.summary.append(line)
      self.beats[rank] = report["progress"]
      code = report["code"]
      if code is not None:
        self.ended[rank] = (Outcome("done", rank) if code == 0 else
                            _classify(rank, code, report["status"], report["ended_at"],
                                      report["oom_kills"]))

  def _find_frozen(self, silent_s: float | None = None) -> None:
    """Ends, as frozen, each running host whose heartbeat has gone silent.

    Silent for the stall timeout (the host's own watchdog cannot fire: nothing in the
    process runs), or stopped by a signal (SIGSTOP; not a debugger's brief trace stop);
    with `silent_s`, once peers have stalled, silent that long.
    """
    now = time.time()
    for rank, beat in enumerate(self.beats):
      if self.ended[rank] is not None or beat is None:
        continue
      limit = self.args.stall_timeout if beat["step"] >= 0 else max(SLOW_S,
                                                                    self.args.stall_timeout)
      stopped = beat["state"] == "T"
      if (beat["silent_s"] > limit or (stopped and beat["silent_s"] > STOPPED_S)
          or (silent_s is not None and beat["silent_s"] > silent_s)):
        where = f"after step {beat['step']}" if beat["step"] >= 0 else "before the first step"
        why = " (its process is stopped, as by SIGSTOP)" if stopped else ""
        self.ended[rank] = Outcome(
            "frozen", rank, f"froze {where}: no sign of life for {beat['silent_s']:.0f} s"
            f"{why}", step=beat["step"], ended_at=now - beat["silent_s"])

  def _where_the_others_were(self, cause: Outcome) -> str:
    steps = []
    for rank in range(self.args.hosts):
      ended, beat = self.ended[rank], self.beats[rank]
      step = ended.step if ended is not None and ended.step >= 0 else (
          beat["step"] if beat else -1)
      if rank != cause.rank and step >= 0:
        steps.append(f"{step} on host {rank}")
    return f" (the others at steps {', '.join(steps)})" if steps else ""

  def run(self) -> Outcome:
    try:
      self._start()
    except Exception as e:  # noqa: BLE001 - RayActorError, GetTimeoutError, ...
      # Actors that cannot start in the first attempt are a set-up problem (scaler not
      # installed on a node?); later, most likely a node that went away.
      kind = "startup" if self.attempt == 0 else "lost"
      return Outcome(kind, -1, f"host actors did not start: {type(e).__name__}: {e}")
    first_failure = None
    while True:
      self._poll()
      # Peers that stalled wait for someone: a host gone silent meanwhile is the one.
      stalled = any(o is not None and o.kind == "stalled" for o in self.ended)
      self._find_frozen(SILENT_S if stalled else None)
      failures = [o for o in self.ended if o is not None and o.kind != "done"]
      if all(o is not None for o in self.ended):
        break
      if failures:
        first_failure = first_failure or time.monotonic()
        self.held = [] if self.held is None else self.held
        # Peers of a host preempted while training are still committing the save they
        # agreed on; a host preempted at start-up (step -1) agreed on nothing.
        saving = all(o.kind == "preempted" for o in failures) and any(
            o.step >= 0 for o in failures)
        if time.monotonic() - first_failure > (PREEMPT_GRACE_S if saving else SETTLE_S):
          break
      time.sleep(POLL_S)
    if not failures:
      return Outcome("done", 0, summary=self.summary)
    cause = root_cause(failures)
    if cause.kind in ("frozen", "stalled"):
      cause.message += self._where_the_others_were(cause)
    self._print_held(cause)
    return cause

  def _print_held(self, cause: Outcome) -> None:
    """The lines that came after the first failure, the consequences' stack traces cut.

    A peer that loses the coordinator dies in JAX's C++ runtime with a fatal error and a
    native stack trace of dozens of frames; printed in full, it buries the launcher's
    summary, which follows, and its frames say nothing about the cause.
    """
    cut = {}
    held = (self.held or []) + [(rank, None) for rank in range(self.args.hosts)]
    for rank, line in held:
      if line is not None and rank != cause.rank and _NATIVE_FRAME.match(line):
        cut[rank] = cut.get(rank, 0) + 1
        continue
      if cut.get(rank):
        _out(f"[host {rank}] ({cut.pop(rank)} lines of a native stack trace not shown)")
      if line is not None:
        _out(f"[host {rank}] {line}")

  def stop(self) -> None:
    """Kills every host process at once, then the actors."""
    ray = self.ray
    refs = [a.stop.remote() for a in self.actors]
    for ref in refs:
      try:
        ray.get(ref, timeout=15)
      except Exception:  # noqa: BLE001 - a lost actor has nothing left to stop
        pass
    for a in self.actors:
      ray.kill(a, no_restart=True)


def _interrupt(signum, frame):
  raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def train(args) -> int:
  """Runs the job; returns the exit code (0 done, 1 failed, 2 bad input, 42 preempted)."""
  _check_args(args)
  run_dir = _prepare_run(args)
  t0 = time.monotonic()
  # `ray job stop` and friends: tear down, also while Ray is still starting.
  signal.signal(signal.SIGTERM, _interrupt)
  attempt = res = None
  try:
    local = ray_cluster.connect(args.address, args.hosts)
    _say(f"Ray {'started on 127.0.0.1' if local else 'connected'} in "
         f"{time.monotonic() - t0:.1f} s")
    res = ray_cluster.reserve(args.hosts, args.devices_per_host, local, args.placement_timeout)
    failures = preemptions = 0
    for n in range(args.max_failures + MAX_PREEMPTIONS + 1):
      if n:
        ray_cluster.wait_ready(res, args.placement_timeout)
      attempt = Attempt(res, args, run_dir, n, local)
      outcome = attempt.run()
      attempt.stop()
      attempt = None
      if outcome.kind == "done":
        for line in outcome.summary:
          _out(line)
        return 0
      if outcome.traceback:
        _say(f"host {outcome.rank}'s traceback:\n{outcome.traceback.rstrip()}")
      if outcome.kind == "user_error":
        raise UserError(outcome.describe())
      if outcome.kind == "startup":
        _say(f"{outcome.describe()}; not restarting: a start-up failure repeats")
        return 1
      if outcome.kind == "preempted":
        preemptions += 1
        if preemptions > MAX_PREEMPTIONS:
          _say(f"giving up after {preemptions} preemptions")
          return host_lib.EXIT_PREEMPTED
        _say(f"{outcome.describe()}; restarting (preemption {preemptions}, not a failure)")
        continue
      failures += 1
      if failures > args.max_failures:
        _say(f"giving up: {failures} failure(s), --max-failures {args.max_failures}; "
             f"last: {outcome.describe()}")
        return 1
      _say(f"{outcome.describe()}; restarting the group from the latest checkpoint "
           f"(failure {failures} of {args.max_failures} allowed)")
    return 1
  except KeyboardInterrupt:
    _say("interrupted: stopping every host")
    return 130
  finally:
    if attempt is not None:
      attempt.stop()
    if res is not None:
      from ray.util import remove_placement_group
      remove_placement_group(res.pg)
    ray_cluster.disconnect()
