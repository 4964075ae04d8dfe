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
