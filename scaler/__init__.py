"""scaler: one JAX trainer for every generative family, from a laptop CPU to a pod."""

import flax

# Variables carry their roles as metadata only; scaler places them itself, from the
# rule table in the config, with one jitted init (never eagerly on creation).
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
