"""Typed, frozen configs loaded from YAML (safely), with dotted `key=value` overrides.

A config file is a plain mapping of sections. `family` and `model` carry a `name` that
picks their dataclass from a registry; every other section is one dataclass here. Any
unknown key or ill-typed value is a `UserError` that names the key and what is accepted.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from scaler.errors import UserError


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1     # -1 takes the devices the other axes leave
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adamw"          # adamw | sgd | lion
  lr: float = 1e-3             # peak learning rate
  schedule: str = "cosine"     # constant | cosine | linear (decay after warmup)
  warmup_steps: int = 0
  min_lr_ratio: float = 0.0    # final lr as a share of the peak
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  momentum: float = 0.9        # sgd only
  clip_norm: float = 0.0       # global-norm clipping; 0 turns it off


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 256        # global batch, over all processes
  micro_batches: int = 1       # gradient accumulation: batch_size / micro_batches each
  seed: int = 0
  ema_decay: float = 0.0       # parameter EMA; 0 turns it off
  log_every: int = 50
  max_in_flight: int = 8       # dispatched steps not yet awaited (XLA:CPU hangs past ~32)
  check_finite_every: int = 0  # 0: at log steps only; debug mode checks every step
  num_samples: int = 1000      # samples drawn for the final plot


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 500             # save every N steps (and always at the end)
  keep_last: int = 3           # keep the last K saves
  keep_every: int = 0          # also keep every M-th step for good; 0 turns it off
  async_save: bool = True
  directory: str | None = None  # default: <run_dir>/checkpoints; may be a gs:// or s3:// URL
  preemption_signal: str | None = None  # a second signal treated like SIGTERM, e.g. SIGUSR1


@dataclasses.dataclass(frozen=True)
class Named:
  """A registry entry picked by name, with its own typed config."""
  name: str
  cfg: Any


@dataclasses.dataclass(frozen=True)
class Config:
  family: Named
  model: Named
  data: Any                    # scaler.data.DataConfig
  optimizer: OptimizerConfig
  mesh: MeshConfig
  rules: str | dict            # a preset name or a role -> mesh axes mapping
  train: TrainConfig
  checkpoint: CheckpointConfig

  def to_dict(self) -> dict:
    """The plain mapping that `from_dict` reads back: the resolved config."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, Named):
        out[f.name] = {"name": value.name, **_plain(value.cfg)}
      else:
        out[f.name] = _plain(value)
    return out


def _plain(value):
  if dataclasses.is_dataclass(value):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, tuple):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


def _coerce(value, tp, key):
  """Checks (and mildly converts) one value against a field type."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg, key)
      except UserError as e:
        errors.append(str(e))
    raise UserError(f"config key '{key}': {value!r} is not a {_type_name(tp)}")
  if tp is Any:
    return value
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise UserError(f"config key '{key}': expected a list, got {value!r}")
    (elem, *_) = typing.get_args(tp)
    return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
  if origin is dict or tp is dict:
    if not isinstance(value, dict):
      raise UserError(f"config key '{key}': expected a mapping, got {value!r}")
    return dict(value)
  if tp is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
      return value.lower() == "true"
  elif tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
  elif tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):
      try:
        return float(value)  # YAML 1.1 reads `3e-4` as a string
      except ValueError:
        pass
  elif tp is str:
    if isinstance(value, str):
      return value
  else:
    raise TypeError(f"unsupported config field type {tp}")
  raise UserError(f"config key '{key}': {value!r} is not a {_type_name(tp)}")


def _type_name(tp):
  return getattr(tp, "__name__", str(tp))


def build(cls, raw, section: str):
  """Builds dataclass `cls` from a mapping, refusing unknown keys and bad types."""
  if raw is None:
    raw = {}
  if not isinstance(raw, dict):
    raise UserError(f"config section '{section}' must be a mapping, got {raw!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - fields)
  if unknown:
    raise UserError(
        f"unknown config key '{section}.{unknown[0]}'; "
        f"'{section}' accepts: {', '.join(sorted(fields))}")
  kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in raw.items()}
  return cls(**kwargs)


def _build_named(raw, section, registry):
  if isinstance(raw, str):
    raw = {"name": raw}
  if not isinstance(raw, dict) or "name" not in raw:
    raise UserError(f"config section '{section}' needs a 'name': one of {', '.join(sorted(registry))}")
  raw = dict(raw)
  name = raw.pop("name")
  if name not in registry:
    raise UserError(f"unknown {section} '{name}'; accepted: {', '.join(sorted(registry))}")
  cfg_cls = registry[name][0]
  return Named(name, build(cfg_cls, raw, section))


SECTIONS = ("family", "model", "data", "optimizer", "mesh", "rules", "train", "checkpoint")


def from_dict(raw: dict) -> Config:
  # Registries are imported here so that this module stays cheap to import.
  from scaler.data import DataConfig
  from scaler.families import FAMILIES
  from scaler.nn.registry import NETWORKS

  if not isinstance(raw, dict):
    raise UserError(f"a config must be a mapping of sections ({', '.join(SECTIONS)})")
  unknown = sorted(set(raw) - set(SECTIONS))
  if unknown:
    raise UserError(f"unknown config key '{unknown[0]}'; accepted sections: {', '.join(SECTIONS)}")
  for required in ("family", "model"):
    if required not in raw:
      raise UserError(f"config needs a '{required}' section")
  rules = raw.get("rules", "data_parallel")
  if not isinstance(rules, (str, dict)):
    raise UserError(f"config key 'rules': {rules!r} must be a preset name or a mapping")
  return Config(
      family=_build_named(raw["family"], "family", FAMILIES),
      model=_build_named(raw["model"], "model", NETWORKS),
      data=build(DataConfig, raw.get("data"), "data"),
      optimizer=build(OptimizerConfig, raw.get("optimizer"), "optimizer"),
      mesh=build(MeshConfig, raw.get("mesh"), "mesh"),
      rules=rules,
      train=build(TrainConfig, raw.get("train"), "train"),
      checkpoint=build(CheckpointConfig, raw.get("checkpoint"), "checkpoint"),
  )


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
  """Applies `a.b=value` overrides to a raw mapping; values are read as YAML scalars."""
  raw = _deepcopy(raw)
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise UserError(f"override {item!r} must look like key=value, e.g. optimizer.lr=3e-4")
    try:
      value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
      value = text
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
      child = node.get(part)
      if isinstance(child, str) and i == 0 and part in ("family", "model", "rules"):
        child = {"name": child} if part != "rules" else child
      if child is None:
        child = {}
      if not isinstance(child, dict):
        raise UserError(f"override {item!r}: '{'.'.join(parents[:i + 1])}' is not a section")
      node[part] = child
      node = child
    node[leaf] = value
  return raw


def _deepcopy(raw):
  if isinstance(raw, dict):
    return {k: _deepcopy(v) for k, v in raw.items()}
  if isinstance(raw, list):
    return [_deepcopy(v) for v in raw]
  return raw


def read_yaml(path) -> dict:
  path = Path(path)
  if not path.is_file():
    raise UserError(f"config file not found: {path}")
  try:
    raw = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    raise UserError(f"config file {path} is not valid YAML: {e}") from None
  if not isinstance(raw, dict):
    raise UserError(f"config file {path} must hold a mapping of sections ({', '.join(SECTIONS)})")
  return raw


def load(path, overrides=()) -> Config:
  return from_dict(apply_overrides(read_yaml(path), list(overrides)))


def dump(cfg: Config, path) -> None:
  Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
