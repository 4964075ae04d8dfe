"""Normalizing flows (RealNVP, Glow, MAF): exact log-likelihood, trained by maximum likelihood.

A flow f maps data x to a latent eps of the same size; by the change of variables

    log p(x) = log N(f(x); 0, I) + log |det df/dx|            (RealNVP eq. 3)

and training minimises -log p(x) over the batch. Images are dequantised first (uniform
noise over each integer pixel level's bin), so the density's value bounds the
probability of the discrete pixels from below (scaler/families/discrete.py); the loss
and the metrics are in bits per dimension over the pixel levels, with the change of
variables of scaler's own normalisation included. Vectors: nats per example in data
space. Sampling inverts the flow: x = f^-1(eps), eps ~ N(0, T^2 I) (T: temperature).

The model choice is the flow (`realnvp`, `glow`, `maf`; scaler/nn/flow_nets.py); one
network, `flow`. Glow's ActNorm gets its data-dependent init through `data_init`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from scaler.config import at_least, param
from scaler.errors import UserError
from scaler.families import discrete
from scaler.families.base import FamilyDefaults, LossOut, Update
from scaler.nn.flow_nets import FLOWS

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  # Images: pixel levels (null: hi - lo + 1 of the data's integer range; the digits
  # have 17, 8-bit images 256). Vectors take none.
  levels: int | None = param(None, at_least(2))


def check_flow_model(net_cls, family: str, accepted):
  if net_cls not in accepted:
    raise UserError(f"family {family} needs model {' or '.join(accepted.values())}; "
                    f"model {getattr(net_cls, '__name__', net_cls)} is not one of them")


class FlowFamily(FamilyDefaults):
  """One network, `flow`: forward(x) -> (eps_BxD, logdet_B), inverse(eps_BxD) -> x."""

  def __init__(self, cfg: FlowConfig, net_cls, net_cfg, spec, precision):
    check_flow_model(net_cls, "flow", {cls: name for name, (_, cls) in FLOWS.items()})
    self.net_cls, self.net_cfg, self.precision = net_cls, net_cfg, precision
    self.data_shape = tuple(spec.shape)
    self.dims = math.prod(self.data_shape)
    # The shape checks here, not only when the flow is built: build_family is where a
    # config is checked, before anything is traced under eval_shape.
    net_cls.check(net_cfg, self.data_shape)
    if spec.kind == "image":
      self.levels = discrete.Levels(spec, cfg.levels)
      self.units = self.levels.density_units
    else:
      if cfg.levels is not None:
        raise UserError(f"family.levels={cfg.levels} is for images; this data is vectors "
                        f"of shape {self.data_shape} (leave family.levels out)")
      self.levels, self.units = None, discrete.data_space_units(spec)
    # Only a flow with ActNorm has data-dependent initialisation; without it, none runs.
    if not net_cls.needs_data_init:
      self.data_init = None

  def init(self, rngs):
    return {"flow": self.net_cls(self.net_cfg, self.data_shape, precision=self.precision,
                                 rngs=rngs)}

  @property
  def updates(self):
    return (Update("flow", ("flow",), self.loss),)

  def log_prob(self, flow, y):
    """log p(y) in model space, per example (the change of variables, RealNVP eq. 3)."""
    eps_BxD, logdet_B = flow.forward(y)
    return jnp.sum(-0.5 * jnp.square(eps_BxD) - HALF_LOG_2PI, axis=1) + logdet_B

  def _model_input(self, x, rng):
    return x if self.levels is None else self.levels.dequantize(x, rng)

  def nll(self, nets, batch, rng):
    """-log p per example in nats, where the data lives (pixel levels or data space)."""
    return self.units.nats(-self.log_prob(nets["flow"], self._model_input(batch["x"], rng)))

  def loss(self, nets, extra, batch, rng, step):
    nll_B = self.nll(nets, batch, rng)
    bpd = jnp.mean(self.units.bits_per_dim(nll_B))
    # Minimised per dimension, so the learning rate means the same for any data size.
    return LossOut(jnp.mean(nll_B) / self.dims, {"nll": jnp.mean(nll_B), "bpd": bpd})

  def evaluate(self, nets, extra, batch, rng):
    nll_B = self.nll(nets, batch, rng)
    return {"nll": nll_B, "bpd": self.units.bits_per_dim(nll_B)}

  def data_init(self, nets, batch, rng):
    """ActNorm's data-dependent init on the (dequantised) first global batch."""
    nets["flow"].forward(self._model_input(batch["x"], rng), init=True)

  def sample(self, nets, rng, num, temperature: float | None = None, **kw):
    """x = f^-1(eps), eps ~ N(0, T^2 I); images rounded to their pixel levels."""
    t = 1.0 if temperature is None else temperature
    x = nets["flow"].inverse(t * jax.random.normal(rng, (num, self.dims)))
    return x if self.levels is None else self.levels.quantize(x)
