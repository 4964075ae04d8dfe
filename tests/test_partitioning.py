"""Mesh from config and the rule table: checked before anything compiles."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from scaler import mesh as mesh_lib
from scaler import partitioning
from scaler import state as state_lib
from scaler.config import MeshConfig
from scaler.errors import UserError
from toy_family import DenoiseFamily


def test_minus_one_takes_the_rest():
  assert mesh_lib.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
  assert mesh_lib.mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)


@pytest.mark.parametrize("cfg, words", [
    (MeshConfig(data=3), ["data=3", "8"]),
    (MeshConfig(data=-1, fsdp=3), ["fsdp=3", "8 devices"]),
    (MeshConfig(data=-1, fsdp=-1), ["only one axis"]),
    (MeshConfig(data=0), ["mesh.data=0"]),
])
def test_bad_mesh(cfg, words):
  with pytest.raises(UserError) as e:
    mesh_lib.mesh_shape(cfg, 8)
  for w in words:
    assert w in str(e.value)


def test_batch_must_split_over_data_and_fsdp():
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  mesh_lib.check_batch(mesh, 64, 2)
  with pytest.raises(UserError, match=r"batch_size=6 .* 2 x 2 = 4"):
    mesh_lib.check_batch(mesh, 6, 1)
  with pytest.raises(UserError, match="micro-batch 6"):
    mesh_lib.check_batch(mesh, 12, 2)
  with pytest.raises(UserError, match="micro_batches=3"):
    mesh_lib.check_batch(mesh, 64, 3)


def _shardings(family, mesh_cfg, rules):
  mesh = mesh_lib.make_mesh(mesh_cfg)
  nets = state_lib.describe(family)
  abstract = jax.eval_shape(lambda: state_lib.split(family.init(nnx.Rngs(0)))[1])
  return partitioning.param_shardings(abstract["net"], nets.logical_specs["net"],
                                      partitioning.resolve_rules(rules), mesh)


def test_presets_place_roles():
  fam = DenoiseFamily()
  sh = _shardings(fam, MeshConfig(data=1, fsdp=4, tensor=2), "fsdp_tensor")
  assert sh["b"]["kernel"].spec == P("fsdp", "tensor")
  assert sh["c"]["kernel"].spec == P("tensor", None)
  sh = _shardings(fam, MeshConfig(data=1, fsdp=8), "fsdp")
  assert sh["b"]["kernel"].spec == P("fsdp", None)
  sh = _shardings(fam, MeshConfig(), "data_parallel")
  assert all(s.spec == P(*([None] * len(s.spec))) for s in jax.tree.leaves(sh))


def test_indivisible_dimension_names_the_parameter():
  fam = DenoiseFamily(hidden=12)  # 12 is not divisible by fsdp=8
  with pytest.raises(UserError) as e:
    _shardings(fam, MeshConfig(data=1, fsdp=8), "fsdp")
  msg = str(e.value)
  assert "a/bias (12,)" in msg
  assert "embed" in msg and "8 devices" in msg


def test_unknown_role_names_the_parameter():
  fam = DenoiseFamily(in_role="pixels")
  with pytest.raises(UserError) as e:
    _shardings(fam, MeshConfig(), {"embed": None, "mlp": None})
  assert "a/kernel" in str(e.value) and "pixels" in str(e.value)


def test_unknown_mesh_axis_and_preset():
  with pytest.raises(UserError, match="'model'"):
    partitioning.resolve_rules({"embed": "model"})
  with pytest.raises(UserError, match="zero3"):
    partitioning.resolve_rules("zero3")
