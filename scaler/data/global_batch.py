"""Process-local batches -> global jax.Arrays on the mesh."""

import jax
import numpy as np


def to_global(local_batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
  """Each process contributes its rows; together they form the global batch."""
  out = {}
  for key, local in local_batch.items():
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(local), global_shape)
  return out
