"""The run directory: one config's record, never silently resumed, overwritten or shared.

    plan = run_dir.plan(path, cfg, allow_config_change=False)   # reads only; may refuse
    with run_dir.Lock(path):                                     # process 0: one writer
      ...restore, then plan.commit() writes config.yaml (or records a config change)

A directory holds the config it was started with (`config.yaml`). Resuming with the same
resolved config goes on; with another one it is refused with a short diff, unless the
user allows the change: then the diff goes to `config_changes.log` and the new config to
`config.<N>.yaml` beside the old, never over it. A run whose latest checkpoint has
reached `train.steps` has nothing to do. Nothing here writes before every check passed.
"""

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import socket
from pathlib import Path

import yaml

from scaler import config as config_lib
from scaler.checkpoint_checks import committed_steps, is_local
from scaler.errors import UserError

log = logging.getLogger("scaler")

CONFIG = "config.yaml"
CHANGES = "config_changes.log"
LOCK = ".scaler.lock"


def config_hash(cfg: config_lib.Config) -> str:
  """A short hash of the resolved config: the same for the same experiment."""
  text = yaml.safe_dump(cfg.to_dict(), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def default_path(config_path, cfg: config_lib.Config) -> Path:
  """runs/<config file stem>-<hash of the resolved config>: two configs, or one config
  with two sets of overrides, never share a directory."""
  return Path("runs") / f"{Path(config_path).stem}-{config_hash(cfg)}"


def _flat(tree, prefix="") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def diff(saved: dict, new: dict) -> list[str]:
  """`key: saved -> new` for every resolved key that differs."""
  a, b = _flat(saved), _flat(new)
  lines = []
  for key in sorted(a.keys() | b.keys()):
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      lines.append(f"{key}: {a.get(key, '<absent>')} -> {b.get(key, '<absent>')}")
  return lines


def latest_config(path: Path) -> tuple[Path, dict] | None:
  """The config the run last trained with: config.<N>.yaml with the highest N, else
  config.yaml; None when the directory holds none."""
  numbered = sorted((int(p.name.split(".")[1]), p) for p in path.glob("config.*.yaml")
                    if p.name.split(".")[1].isdigit())
  current = numbered[-1][1] if numbered else path / CONFIG
  if not current.is_file():
    return None
  return current, yaml.safe_load(current.read_text())


def check_writable(path: Path, what: str) -> None:
  """`path` is (or can be created as) a writable directory; checked without writing."""
  if path.exists() and not path.is_dir():
    raise UserError(f"{what} {path} exists and is not a directory")
  probe = path
  while not probe.exists():
    probe = probe.parent
  if not probe.is_dir():
    raise UserError(f"{what} {path} cannot be created: {probe} is not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UserError(f"{what} {path} cannot be written: no write permission on {probe}")


@dataclasses.dataclass
class Plan:
  """What a start will do to the run directory, decided before anything is written."""
  path: Path
  cfg: config_lib.Config
  latest_step: int | None     # the latest committed checkpoint, None for a fresh run
  changes: list[str]          # the config diff the user allowed (empty: same config)

  @property
  def finished(self) -> bool:
    return self.latest_step is not None and self.latest_step >= self.cfg.train.steps

  def commit(self) -> None:
    """Writes the config (fresh run) or records an allowed change. Process 0 only."""
    self.path.mkdir(parents=True, exist_ok=True)
    if latest_config(self.path) is None:
      config_lib.dump(self.cfg, self.path / CONFIG)
      return
    if not self.changes:
      return
    n = 1 + max([int(p.name.split(".")[1]) for p in self.path.glob("config.*.yaml")
                 if p.name.split(".")[1].isdigit()], default=0)
    target = self.path / f"config.{n}.yaml"
    config_lib.dump(self.cfg, target)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    with open(self.path / CHANGES, "a") as f:
      f.write(f"{stamp} at step {self.latest_step}: {target.name}\n")
      for line in self.changes:
        f.write(f"  {line}\n")
    log.warning("config changed at step %s (allowed); recorded in %s:\n  %s",
                self.latest_step, self.path / CHANGES, "\n  ".join(self.changes))


PLACEMENT = ("mesh.", "rules:", "rules.")


def _schedule_note(changes: list[str]) -> str:
  if any(line.startswith("train.steps:") for line in changes):
    return (" Raising train.steps extends the run: the learning-rate schedule is a function "
            "of train.steps, so from the current step it follows the new schedule (a cosine "
            "or linear decay is stretched to the new length, which raises the current rate).")
  return ""


def plan(path, cfg: config_lib.Config, *, allow_config_change: bool = False,
         resume_from: int | None = None) -> Plan:
  """Every check of the run directory, reading only. Raises UserError when the start
  must be refused."""
  path = Path(path)
  ckpt_dir = cfg.checkpoint.directory or str(path / "checkpoints")
  check_writable(path, "run directory")
  if is_local(ckpt_dir):
    check_writable(Path(ckpt_dir), "checkpoint directory")
  saved = latest_config(path) if path.is_dir() else None
  steps = _steps(ckpt_dir)
  if resume_from is not None and resume_from not in steps:
    raise UserError(f"--resume-from {resume_from}: no checkpoint at that step in {ckpt_dir}; "
                    f"available steps: {', '.join(map(str, steps)) or 'none'}")
  if saved is None:
    if path.is_dir() and any(not _scaffold(p, ckpt_dir) for p in path.iterdir()):
      raise UserError(f"run directory {path} exists and holds no scaler run (no {CONFIG}); "
                      "choose a new --run-dir (nothing there is overwritten)")
    return Plan(path, cfg, steps[-1] if steps else None, [])
  saved_path, saved_cfg = saved
  changes = diff(saved_cfg, cfg.to_dict())
  # A new mesh or rule table moves the same arrays onto another topology (the restore
  # reshards them) and trains the same numbers: recorded like any change, never refused.
  refused = [c for c in changes if not c.startswith(PLACEMENT)]
  if refused and not allow_config_change:
    shown = "; ".join(refused[:6]) + (f"; ... {len(refused) - 6} more" if len(refused) > 6 else "")
    raise UserError(f"run directory {path} was trained with another config ({saved_path.name}): "
                    f"{shown}. Use a new --run-dir, or pass --allow-config-change to go on "
                    f"with the new config (the change is recorded).{_schedule_note(refused)}")
  latest = resume_from if resume_from is not None else (steps[-1] if steps else None)
  return Plan(path, cfg, latest, changes)


def _scaffold(p: Path, ckpt_dir: str) -> bool:
  """What a start creates before its config: the lock, an empty checkpoint directory (a
  multi-host launcher makes it for every host before they start)."""
  if p.name == LOCK:
    return True
  return p.is_dir() and os.path.abspath(p) == os.path.abspath(ckpt_dir) and not any(p.iterdir())


def _steps(ckpt_dir: str) -> list[int]:
  if is_local(ckpt_dir):
    from etils import epath
    return committed_steps(epath.Path(os.path.abspath(ckpt_dir)))
  from etils import epath
  return committed_steps(epath.Path(ckpt_dir))


class Lock:
  """One writer per run directory: an exclusive lock file naming its holder.

  Created with O_EXCL (atomic on local disks and NFS). A lock left by a dead process on
  this host is taken over with a warning; one held by another host is refused, since
  its process cannot be checked from here. Only process 0 of a job takes it.
  """

  def __init__(self, path: Path, enabled: bool = True):
    self.file = Path(path) / LOCK
    self.enabled = enabled
    self.held = False

  def __enter__(self):
    if not self.enabled:
      return self
    self.file.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now().isoformat(timespec="seconds")}
    for _ in range(2):
      try:
        fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise UserError(f"cannot take the lock {self.file}")

  def _take_over_if_stale(self) -> None:
    try:
      holder = json.loads(self.file.read_text())
    except (OSError, ValueError):
      holder = {}
    host, pid = holder.get("host"), holder.get("pid")
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
      log.warning("taking over the lock of %s: its holder (pid %d on %s, since %s) is no "
                  "longer running", self.file.parent, pid, host, holder.get("since"))
      self.file.unlink(missing_ok=True)
      return
    raise UserError(
        f"run directory {self.file.parent} is in use by another training (pid {pid} on "
        f"{host}, since {holder.get('since')}); wait for it, or use another --run-dir. If "
        f"that process is gone, delete {self.file}")

  def __exit__(self, *exc):
    if self.held:
      self.file.unlink(missing_ok=True)
      self.held = False


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
