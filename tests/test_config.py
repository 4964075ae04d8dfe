"""Configs: typed loading, dotted overrides, and one clear error per mistake."""

import pytest

from scaler import config as config_lib
from scaler.errors import UserError

BASE = {
    "family": {"name": "diffusion"},
    "model": {"name": "mlp_denoiser"},
    "train": {"steps": 10, "batch_size": 64},
}


def test_overrides_are_typed():
  raw = config_lib.apply_overrides(
      BASE, ["optimizer.lr=3e-4", "mesh.fsdp=4", "train.ema_decay=0.99", "model.hidden=128",
             "optimizer.clip_norm=1"])
  cfg = config_lib.from_dict(raw)
  assert cfg.optimizer.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string
  assert cfg.mesh.fsdp == 4 and isinstance(cfg.mesh.fsdp, int)
  assert cfg.model.cfg.hidden == 128
  assert isinstance(cfg.optimizer.clip_norm, float)
  assert BASE["train"] == {"steps": 10, "batch_size": 64}  # the input is not mutated


def test_round_trip_through_yaml(tmp_path):
  cfg = config_lib.from_dict(config_lib.apply_overrides(BASE, ["rules=fsdp"]))
  config_lib.dump(cfg, tmp_path / "c.yaml")
  assert config_lib.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, words", [
    (["optimizer.lrr=1"], ["optimizer.lrr", "lr"]),
    (["trian.steps=1"], ["trian", "train"]),
    (["train.steps=ten"], ["train.steps", "'ten'", "int"]),
    (["train.steps=1.5"], ["train.steps", "1.5"]),
    (["family.name=gann"], ["gann", "diffusion"]),
    (["model.name=resnet"], ["resnet", "mlp_denoiser"]),
    (["train.ema_decay=yes"], ["train.ema_decay"]),
    (["steps"], ["key=value"]),
])
def test_bad_config_names_the_key(override, words):
  with pytest.raises(UserError) as e:
    config_lib.from_dict(config_lib.apply_overrides(BASE, override))
  for w in words:
    assert w in str(e.value)


def test_yaml_is_loaded_safely(tmp_path):
  path = tmp_path / "evil.yaml"
  path.write_text("family: !!python/object/apply:os.system ['echo pwned']\n")
  with pytest.raises(UserError, match="not valid YAML"):
    config_lib.read_yaml(path)


def test_missing_config_file(tmp_path):
  with pytest.raises(UserError, match="not found"):
    config_lib.read_yaml(tmp_path / "nope.yaml")


# Keys a choice would silently ignore are unknown keys of that choice (the whole list the
# review found), and out-of-range values are refused by name.
@pytest.mark.parametrize("override, words", [
    (["optimizer.momentum=0.5"], ["optimizer.momentum", "accepts"]),
    (["optimizer.name=lion", "optimizer.momentum=0.5"], ["optimizer.momentum"]),
    (["optimizer.name=lion", "optimizer.eps=1e-6"], ["optimizer.eps"]),
    (["optimizer.name=sgd", "optimizer.b1=0.5"], ["optimizer.b1"]),
    (["optimizer.name=sgd", "optimizer.b2=0.5"], ["optimizer.b2"]),
    (["optimizer.schedule=constant", "optimizer.schedule.min_lr_ratio=0.1"],
     ["optimizer.schedule.min_lr_ratio", "warmup_steps"]),
    (["family.sampler=ancestral", "family.sampler.steps=10"], ["family.sampler.steps"]),
    (["family.sampler=ancestral", "family.sampler.eta=0.5"], ["family.sampler.eta"]),
    (["family.clip_range=2.0"], ["family.clip_range"]),
    (["rules.mpl=tensor"], ["rules.mpl", "unknown role", "mlp"]),
    # Out of range.
    (["optimizer.b1=2"], ["optimizer.b1", "[0, 1)"]),
    (["optimizer.clip_norm=-1"], ["optimizer.clip_norm"]),
    (["optimizer.schedule.min_lr_ratio=-0.5"], ["optimizer.schedule.min_lr_ratio", "[0, 1]"]),
    (["optimizer.lr=nan"], ["optimizer.lr", "finite"]),
    (["optimizer.lr=inf"], ["optimizer.lr", "finite"]),
    (["optimizer.lr=0"], ["optimizer.lr", "positive"]),
    (["train.ema_decay=1.0"], ["train.ema_decay", "[0, 1)"]),
    (["train.ema_decay=-0.1"], ["train.ema_decay"]),
    (["train.max_in_flight=0"], ["train.max_in_flight", "at least 1"]),
    (["train.steps=0"], ["train.steps", "positive"]),
    (["train.log_every=0"], ["train.log_every", "positive"]),
    (["train.num_samples=0"], ["train.num_samples"]),
    (["model.hidden=0"], ["model.hidden"]),
    (["model.hidden=-4"], ["model.hidden"]),
    (["model.time_dim=0"], ["model.time_dim"]),
    (["model.mlp_ratio=0"], ["model.mlp_ratio"]),
    (["precision.compute=float16"], ["float16", "loss scale"]),
    (["precision.compute=int8"], ["precision.compute", "bfloat16"]),
    (["train.steps=ten"], ["an integer"]),
])
def test_ignored_and_out_of_range_keys_are_refused(override, words):
  with pytest.raises(UserError) as e:
    config_lib.from_dict(config_lib.apply_overrides(BASE, override))
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_unet_groups_zero_is_refused():
  raw = {**BASE, "model": {"name": "unet", "groups": 0}}
  with pytest.raises(UserError, match="model.groups"):
    config_lib.from_dict(raw)


def test_lion_defaults_to_its_own_b2():
  cfg = config_lib.from_dict(config_lib.apply_overrides(BASE, ["optimizer.name=lion"]))
  assert cfg.optimizer.b2 == 0.99 and cfg.optimizer.name == "lion"


def test_integers_written_as_floats_are_accepted():
  cfg = config_lib.from_dict(config_lib.apply_overrides(BASE, ["train.steps=1e3"]))
  assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)


def test_one_rule_of_a_preset_can_be_overridden():
  from scaler import partitioning
  cfg = config_lib.from_dict(config_lib.apply_overrides(
      {**BASE, "rules": "fsdp_tensor"}, ["rules.embed=null"]))
  table = partitioning.resolve_rules(cfg.rules)
  assert table["embed"] is None and table["mlp"] == "tensor"
  assert table == {**partitioning.PRESETS["fsdp_tensor"], "embed": None}


def test_per_network_optimizer_sections():
  raw = {**BASE, "optimizer": {"denoiser": {"name": "lion", "lr": 1e-4}}}
  cfg = config_lib.from_dict(raw)
  assert cfg.optimizer_for("denoiser").name == "lion"
  assert cfg.optimizer_for("denoiser").cfg.lr == pytest.approx(1e-4)
  config_lib.dump(cfg, "/dev/null")


def test_duplicate_yaml_keys_are_refused(tmp_path):
  path = tmp_path / "dup.yaml"
  path.write_text("family: {name: diffusion}\nmodel: {name: mlp_denoiser}\n"
                  "train:\n  steps: 10\n  steps: 20\n")
  with pytest.raises(UserError, match="duplicate key 'steps'"):
    config_lib.read_yaml(path)


def test_a_directory_is_not_a_config(tmp_path):
  with pytest.raises(UserError, match="is a directory"):
    config_lib.read_yaml(tmp_path)
