"""The network pairs, sharded by their roles, give the gradients they give on one device.

This guards the roles against XLA's partitioner as much as against our own mistakes:
with the decoder's first projection on `embed` (fsdp), XLA 0.10.2 computed gradients
off by 100% on 2x2 and 2x4 fsdp x tensor meshes, while the losses agreed. Traced under
the rules, as the train step is, so the networks' pinned activations are split as in
training."""

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


MESH_2X2 = MeshConfig(data=1, fsdp=2, tensor=2)   # 2x4 failed alike


def split(module):
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
  return graphdef, nnx.to_pure_dict(params), specs, nnx.to_pure_dict(rest)


def sharded_grad(loss, mesh_cfg, params, specs, *batch):
  """jax.grad(loss) over `params` on `mesh_cfg` under fsdp_tensor, the arrays of `batch`
  split over the batch axes, traced under the rules."""
  n = mesh_cfg.fsdp * mesh_cfg.tensor
  mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:n])
  rules = partitioning.resolve_rules("fsdp_tensor")
  shardings = partitioning.param_shardings(params, specs, rules, mesh)
  rows = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  with partitioning.activation_rules(mesh, rules):
    return jax.jit(jax.grad(loss))(jax.device_put(params, shardings),
                                   *(jax.device_put(x, rows) for x in batch))


def assert_same(got, expected, what):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_sharded_gradients_match_one_device(name):
  graphdef, params, specs, rest = split(NETWORKS[name](nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (32, *INPUTS[name]))
  label = jnp.arange(32) % 10

  def loss(params, x, label):
    y = nnx.merge(graphdef, params, rest)(x, label)
    return jnp.mean(y ** 3)

  expected = jax.jit(jax.grad(loss))(params, x, label)
  got = sharded_grad(loss, MESH_2X2, params, specs, x, label)
  assert_same(got, expected, f"{name} on {MESH_2X2}")


def test_a_generated_batch_gets_the_gradients_of_one_device():
  # The GAN's generator update: z is drawn inside the step, so only the networks' pinned
  # activations tie its examples to the batch axes, and the critic scores G(z). Left to
  # propagation, XLA 0.10.2 split the convs over their windows on fsdp=2 x tensor=2 and
  # summed over the tensor replicas: the generator's last conv got half its gradient.
  nets = {"generator": split(NETWORKS["generator"](nnx.Rngs(0))),
          "discriminator": split(NETWORKS["discriminator"](nnx.Rngs(1)))}
  params = {n: p for n, (_, p, _, _) in nets.items()}
  specs = {n: s for n, (_, _, s, _) in nets.items()}
  label = jnp.arange(32) % 10

  def loss(params, label):
    G, D = (nnx.merge(nets[n][0], params[n], nets[n][3])
            for n in ("generator", "discriminator"))
    z = jax.random.normal(jax.random.key(2), (label.shape[0], 16))
    return -jnp.mean(D(G(z, label), label))

  expected = jax.jit(jax.grad(loss))(params, label)
  got = sharded_grad(loss, MESH_2X2, params, specs, label)
  assert_same(got, expected, f"generator under the critic on {MESH_2X2}")
