"""Process-local batches -> global jax.Arrays on the mesh."""

import jax
import numpy as np


def to_global(local_batch: dict, sharding: jax.sharding.NamedSharding, global_rows: int) -> dict:
  """Each process contributes the rows its devices hold (`scaler.mesh.process_rows`);
  together they form a global batch of `global_rows`. Where a non-batch mesh axis spans
  processes, several processes hold (and pass) the same rows."""
  out = {}
  for key, local in local_batch.items():
    out[key] = jax.make_array_from_process_local_data(
        sharding, np.asarray(local), (global_rows, *local.shape[1:]))
  return out
