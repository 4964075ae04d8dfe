"""The network pairs, sharded by their roles, give the gradients they give on one device.

This guards the roles against XLA's partitioner as much as against our own mistakes:
with the decoder's first projection on `embed` (fsdp), XLA 0.10.2 computed gradients
off by 100% on 2x2 and 2x4 fsdp x tensor meshes, while the losses agreed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from scaler import mesh as mesh_lib
from scaler import partitioning
from scaler.config import MeshConfig
from scaler.nn.conv import ConvVAE, ConvVAEConfig, DCGAN, DCGANConfig
from scaler.nn.layers import FLOAT32

KW = dict(precision=FLOAT32)
DIGIT = (8, 8, 1)
NETWORKS = {
    "encoder": lambda rngs: ConvVAE.encoder(ConvVAEConfig(channels=(8, 16), groups=4), DIGIT,
                                            (8,), 10, rngs=rngs, **KW),
    "decoder": lambda rngs: ConvVAE.decoder(ConvVAEConfig(channels=(8, 16), groups=4), (4,),
                                            DIGIT, 10, rngs=rngs, **KW),
    "grid_decoder": lambda rngs: ConvVAE.decoder(ConvVAEConfig(channels=(8, 16), norm="none"),
                                                 (4, 4, 8), DIGIT, rngs=rngs, **KW),
    "generator": lambda rngs: DCGAN.generator(DCGANConfig(channels=(8, 16)), 16, DIGIT, 10,
                                              rngs=rngs, **KW),
    "discriminator": lambda rngs: DCGAN.discriminator(
        DCGANConfig(channels=(8, 16), discriminator_norm="layer"), DIGIT, 10, rngs=rngs, **KW),
}
INPUTS = {"encoder": DIGIT, "decoder": (4,), "grid_decoder": (4, 4, 8), "generator": (16,),
          "discriminator": DIGIT}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_sharded_gradients_match_one_device(name):
  module = NETWORKS[name](nnx.Rngs(0))
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  x = jax.random.normal(jax.random.key(1), (32, *INPUTS[name]))
  label = jnp.arange(32) % 10

  def loss(params, x, label):
    y = nnx.merge(graphdef, params, rest)(x, label)
    return jnp.mean(y ** 3)

  expected = jax.jit(jax.grad(loss))(params, x, label)
  for mesh_cfg in (MeshConfig(data=1, fsdp=2, tensor=2),):   # 2x4 failed alike
    n = mesh_cfg.fsdp * mesh_cfg.tensor
    mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:n])
    shardings = partitioning.param_shardings(params, specs,
                                             partitioning.resolve_rules("fsdp_tensor"), mesh)
    batch = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
    got = jax.jit(jax.grad(loss))(jax.device_put(params, shardings), jax.device_put(x, batch),
                                  jax.device_put(label, batch))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6,
                                 err_msg=f"{name} {jax.tree_util.keystr(path)} on {mesh_cfg}")
