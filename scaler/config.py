"""Typed, frozen configs loaded from YAML (safely), with dotted `key=value` overrides.

A config file is a plain mapping of sections. Where the keys of a section depend on a
choice (the family, the network, the data source, the optimizer, a schedule, a sampler),
the choice is a `Named` value: a `name` (or `source`) that picks a dataclass from a
registry, and only that dataclass's keys. So a key that the choice would ignore is an
unknown key, and every key has an effect or is an error. Each field may carry a range
check (`param(default, check)`); a value outside it is a `UserError` naming the key.

Why not a library (draccus, as in Levanter): per-network optimizer sections (a mapping
of choices keyed by network names known only once the family is built), one-line
errors that name the key and what is accepted, and YAML that refuses duplicate keys are
each a few lines here and a wrapper around the library there.
"""

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from scaler.errors import UserError


# --- fields with checks, and choices ---

def param(default, check=None, **kw):
  """A dataclass field whose values `check(value)` must accept (returns a complaint or None)."""
  return dataclasses.field(default=default, metadata={"check": check}, **kw)


def choice(registry: dict, default: str | None, key: str = "name"):
  """A field holding a `Named` choice from `registry` (name -> config dataclass)."""
  value = None if default is None else Named(default, registry[default]())
  return dataclasses.field(default=value, metadata={"choices": registry, "key": key})


def positive(x):
  return None if x > 0 else "must be positive"


def at_least(n):
  return lambda x: None if x >= n else f"must be at least {n}"


def fraction(x):
  """[0, 1): a decay, a dropout rate, a moment coefficient."""
  return None if 0 <= x < 1 else "must be in [0, 1)"


def unit(x):
  """[0, 1]."""
  return None if 0 <= x <= 1 else "must be in [0, 1]"


def one_of(*names):
  return lambda x: None if x in names else f"is not accepted: one of {', '.join(names)}"


@dataclasses.dataclass(frozen=True)
class Named:
  """A registry entry picked by name, with its own typed config."""
  name: str
  cfg: Any

  def __getattr__(self, attr):
    # `cfg.optimizer.lr` reads through to the chosen config; `name` stays the choice.
    if attr.startswith("__"):
      raise AttributeError(attr)
    return getattr(self.cfg, attr)


# --- sections owned by the core ---

@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1     # -1 takes the devices the other axes leave
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = param(1000, positive)
  batch_size: int = param(256, positive)   # global batch, over all processes
  micro_batches: int = param(1, positive)  # gradient accumulation: batch_size / micro_batches each
  seed: int = 0
  ema_decay: float = param(0.0, fraction)  # EMA of the sampled networks' parameters; 0 is off
  log_every: int = param(50, positive)
  max_in_flight: int = param(8, at_least(1))  # dispatched steps not yet awaited (XLA:CPU hangs past ~32)
  check_finite_every: int = param(0, at_least(0))  # 0: at log and save steps; --debug: every step
  num_samples: int = param(1000, positive)   # samples drawn for the final plot


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = param(500, at_least(0))    # save every N steps (and always at the end); 0: end only
  keep_last: int = param(3, positive)     # keep the last K saves
  keep_every: int = param(0, at_least(0))  # also keep every M-th step for good; 0 turns it off
  async_save: bool = True
  directory: str | None = None  # default: <run_dir>/checkpoints; may be a gs:// or s3:// URL
  preemption_signal: str | None = None  # a second signal treated like SIGTERM, e.g. SIGUSR1


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
  """Master weights and optimizer state in `params`; forward and backward in `compute`."""
  params: str = param("float32", one_of("float32"))
  compute: str = param("float32", one_of("float32", "bfloat16", "float16"))

  def __post_init__(self):
    if self.compute == "float16":
      raise UserError("precision.compute=float16 is refused: float16 overflows without a "
                      "loss scale, which scaler does not apply; use bfloat16")


@dataclasses.dataclass(frozen=True)
class Config:
  family: Named
  model: Named
  data: Named                       # chosen by `source`; see scaler/data/config.py
  optimizer: Named | dict           # one for every network, or {network: Named}
  mesh: MeshConfig
  rules: str | dict                 # a preset name, or {preset: NAME, role: axes, ...}
  train: TrainConfig
  checkpoint: CheckpointConfig
  precision: PrecisionConfig = PrecisionConfig()

  def optimizer_for(self, network: str) -> Named:
    if isinstance(self.optimizer, Named):
      return self.optimizer
    return self.optimizer[network]

  def to_dict(self) -> dict:
    """The plain mapping that `from_dict` reads back: the resolved config."""
    return {f.name: _plain(getattr(self, f.name), "source" if f.name == "data" else "name")
            for f in dataclasses.fields(self)}


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _plain(value, key="name"):
  if isinstance(value, Named):
    return {key: value.name, **_plain(value.cfg)}
  if dataclasses.is_dataclass(value):
    out = {}
    for f in dataclasses.fields(value):
      out[f.name] = _plain(getattr(value, f.name), f.metadata.get("key", "name"))
    return out
  if isinstance(value, tuple):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


# --- building ---

def _type_name(tp) -> str:
  names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
           dict: "a mapping", type(None): "null"}
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    return " or ".join(_type_name(a) for a in typing.get_args(tp))
  if typing.get_origin(tp) is tuple:
    return "a list"
  return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, key):
  """Checks (and mildly converts) one value against a field type."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg, key)
      except UserError:
        pass
    raise UserError(f"config key '{key}': {value!r} is not {_type_name(tp)}")
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
    number = _number(value)
    if number is not None and math.isfinite(number) and number.is_integer():
      return int(number)  # 1000.0 and 1e3 (a string to YAML 1.1) alike
  elif tp is float:
    number = _number(value)
    if number is not None:
      if not math.isfinite(number):
        raise UserError(f"config key '{key}': {value!r} is not a finite number")
      return number
  elif tp is str:
    if isinstance(value, str):
      return value
  else:
    raise TypeError(f"unsupported config field type {tp}")
  raise UserError(f"config key '{key}': {value!r} is not {_type_name(tp)}")


def _number(value) -> float | None:
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str):
    try:
      return float(value)  # YAML 1.1 reads `3e-4` as a string
    except ValueError:
      return None
  return None


def build(cls, raw, section: str, chosen: str = ""):
  """Builds dataclass `cls` from a mapping, refusing unknown keys, bad types and ranges.
  `chosen` names the choice `cls` stands for (`source: npz`), for the message."""
  if raw is None:
    raw = {}
  if not isinstance(raw, dict):
    raise UserError(f"config section '{section}' must be a mapping, got {raw!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - set(fields))
  if unknown:
    accepted = ", ".join(sorted(fields)) or "no keys"
    raise UserError(f"unknown config key '{section}.{unknown[0]}'; '{section}'{chosen} "
                    f"accepts: {accepted}")
  kwargs = {}
  for k, v in raw.items():
    f, key = fields[k], f"{section}.{k}"
    if "choices" in f.metadata:
      default = f.default.name if isinstance(f.default, Named) else None
      kwargs[k] = build_named(v, key, f.metadata["choices"], f.metadata["key"], default)
      continue
    kwargs[k] = _coerce(v, hints[k], key)
    check = f.metadata.get("check")
    if check is not None and kwargs[k] is not None:
      complaint = check(kwargs[k])
      if complaint:
        raise UserError(f"config key '{key}'={kwargs[k]!r} {complaint}")
  try:
    return cls(**kwargs)
  except TypeError as e:  # a dataclass field without a default
    raise UserError(f"config section '{section}': {e}") from None


def build_named(raw, section: str, registry: dict, key: str = "name",
                default: str | None = None) -> Named:
  """A `Named` choice: `{key: NAME, ...NAME's own keys}`, or just `NAME`; without a name,
  the `default` choice."""
  if isinstance(raw, str):
    raw = {key: raw}
  if isinstance(raw, dict) and key not in raw and default is not None:
    raw = {key: default, **raw}
  if not isinstance(raw, dict) or key not in raw:
    raise UserError(f"config section '{section}' needs a '{key}': one of {', '.join(sorted(registry))}")
  raw = dict(raw)
  name = raw.pop(key)
  if name not in registry:
    raise UserError(f"unknown {section} '{name}'; accepted: {', '.join(sorted(registry))}")
  entry = registry[name]
  cfg_cls = entry[0] if isinstance(entry, tuple) else entry
  return Named(name, build(cfg_cls, raw, section, f" with {key} {name}"))


def _optimizers(raw, registry):
  """One optimizer section for every network, or one per network name."""
  if raw is None or isinstance(raw, str):
    return build_named(raw or "adamw", "optimizer", registry)
  if not isinstance(raw, dict):
    raise UserError(f"config section 'optimizer' must be a mapping, got {raw!r}")
  per_network = raw and all(isinstance(v, (dict, str)) for v in raw.values()) and "name" not in raw
  if per_network and not any(k in _all_fields(registry) for k in raw):
    return {net: build_named(v if v is not None else {}, f"optimizer.{net}", registry,
                             default="adamw")
            for net, v in raw.items()}
  return build_named({"name": "adamw", **raw}, "optimizer", registry)


def _all_fields(registry) -> set:
  return {f.name for cls in registry.values() for f in dataclasses.fields(cls)}


def from_dict(raw: dict) -> Config:
  # Registries are imported here so that this module stays cheap to import.
  from scaler.data.config import DATA_SOURCES
  from scaler.families import FAMILIES
  from scaler.nn.registry import NETWORKS
  from scaler.optim import OPTIMIZERS

  if not isinstance(raw, dict):
    raise UserError(f"a config must be a mapping of sections ({', '.join(SECTIONS)})")
  unknown = sorted(set(raw) - set(SECTIONS))
  if unknown:
    raise UserError(f"unknown config key '{unknown[0]}'; accepted sections: {', '.join(SECTIONS)}")
  for required in ("family", "model"):
    if required not in raw:
      raise UserError(f"config needs a '{required}' section")
  from scaler.partitioning import resolve_rules
  rules = raw.get("rules", "data_parallel")
  if not isinstance(rules, (str, dict)):
    raise UserError(f"config key 'rules': {rules!r} must be a preset name or a mapping")
  resolve_rules(rules)  # an unknown preset, role or mesh axis fails here, by name
  data = raw.get("data") or {}
  if isinstance(data, dict) and "source" not in data:
    data = {"source": "two_moons", **data}
  return Config(
      family=build_named(raw["family"], "family", FAMILIES),
      model=build_named(raw["model"], "model", NETWORKS),
      data=build_named(data, "data", DATA_SOURCES, key="source"),
      optimizer=_optimizers(raw.get("optimizer"), OPTIMIZERS),
      mesh=build(MeshConfig, raw.get("mesh"), "mesh"),
      rules=rules,
      train=build(TrainConfig, raw.get("train"), "train"),
      checkpoint=build(CheckpointConfig, raw.get("checkpoint"), "checkpoint"),
      precision=build(PrecisionConfig, raw.get("precision"), "precision"),
  )


# --- overrides and files ---

# A string that stands for a mapping: `family: diffusion` is `{name: diffusion}`, and
# `rules: fsdp` is `{preset: fsdp}`, so that `rules.embed=null` overrides one rule.
_SHORTHAND_KEY = {"rules": "preset", "data": "source"}


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
      if isinstance(child, str):
        child = {_SHORTHAND_KEY.get(part, "name"): child}
      if child is None:
        child = {}
      if not isinstance(child, dict):
        raise UserError(f"override {item!r}: '{'.'.join(parents[:i + 1])}' is not a section "
                        f"(it holds {child!r})")
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


class _StrictLoader(yaml.SafeLoader):
  """yaml.safe_load that refuses a key given twice (PyYAML keeps the last silently)."""


def _mapping(loader, node, deep=False):
  seen = set()
  for key_node, _ in node.value:
    key = loader.construct_object(key_node, deep=deep)
    if key in seen:
      raise yaml.constructor.ConstructorError(
          None, None, f"duplicate key {key!r}", key_node.start_mark)
    seen.add(key)
  return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_yaml(text: str, where: str):
  try:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
  except yaml.YAMLError as e:
    raise UserError(f"config file {where} is not valid YAML: {' '.join(str(e).split())}") from None


def read_yaml(path) -> dict:
  path = Path(path)
  if path.is_dir():
    raise UserError(f"config path {path} is a directory; give a YAML file, e.g. "
                    "configs/diffusion_moons.yaml")
  if not path.is_file():
    raise UserError(f"config file not found: {path}")
  raw = parse_yaml(path.read_text(), str(path))
  if not isinstance(raw, dict):
    raise UserError(f"config file {path} must hold a mapping of sections ({', '.join(SECTIONS)})")
  return raw


def load(path, overrides=()) -> Config:
  return from_dict(apply_overrides(read_yaml(path), list(overrides)))


def dump(cfg: Config, path) -> None:
  Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
