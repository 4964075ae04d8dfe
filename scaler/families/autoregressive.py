"""Autoregressive models (PixelCNN, a transformer): exact likelihood by the chain rule.

The data become a sequence of S discrete tokens, and the network gives every token's
distribution given the tokens before it:

    log p(x) = sum_s log p(x_s | x_<s)            (PixelCNN eq. 1; GPT)

trained by cross-entropy. Images: the pixel levels in raster order (row, column,
channel), a softmax over the levels per pixel channel (the digits have 17, 0..16); the
likelihood is exact, in bits per dimension over the levels. Vectors: each dimension
discretised into `bins` bins over [-bound, bound] standard deviations, in order; the
bins' probabilities make a piecewise-uniform density, reported in nats per example in
data space (scaler/families/discrete.py). Sampling draws one token at a time with a
temperature and top-k (the transformer through its KV cache).

The model choice is the network (`pixelcnn`, `transformer`); one network, `net`. With
`prior: RUN_DIR`, the network models the codes of that VQ-VAE run instead of the data
(scaler/families/vq_prior.py).
"""

import dataclasses

import jax
import jax.numpy as jnp

from scaler.config import at_least, param, positive
from scaler.errors import UserError
from scaler.families import discrete
from scaler.families.base import FamilyDefaults, LossOut, Update
from scaler.nn.pixelcnn import PixelCNN, PixelCNNConfig
from scaler.nn.transformer import Transformer, TransformerConfig

NETWORKS = {"pixelcnn": (PixelCNNConfig, PixelCNN), "transformer": (TransformerConfig, Transformer)}


@dataclasses.dataclass(frozen=True)
class AutoregressiveConfig:
  levels: int | None = param(None, at_least(2))   # images: pixel levels (null: the data's range)
  bins: int | None = param(None, at_least(2))     # vectors: bins per dimension (null: 128)
  bound: float | None = param(None, positive)     # vectors: bins span +-bound std (null: 4)
  temperature: float = param(1.0, positive)       # sampling defaults; `scaler sample`
  top_k: int = param(0, at_least(0))              # --temperature / --top-k override them
  prior: str | None = None   # a VQ-VAE run directory: model its codes, sample through it


def _refuse(key, value, why):
  if value is not None:
    raise UserError(f"family.{key}={value} {why} (leave family.{key} out)")


class AutoregressiveFamily(FamilyDefaults):
  """One network, `net`: tokens (B, S) -> logits (B, S, V') over V <= V' values."""

  def __init__(self, cfg: AutoregressiveConfig, net_cls, net_cfg, spec, precision):
    names = {cls: name for name, (_, cls) in NETWORKS.items()}
    if net_cls not in names:
      raise UserError(f"family autoregressive needs model pixelcnn or transformer; model "
                      f"{getattr(net_cls, '__name__', net_cls)} is not one of them")
    self.cfg, self.net_cls, self.net_cfg, self.precision = cfg, net_cls, net_cfg, precision
    self.data_shape = tuple(spec.shape)
    self.prior = self.levels = self.bins = None
    if cfg.prior is not None:
      from scaler.families.vq_prior import VQPrior
      for key in ("levels", "bins", "bound"):
        _refuse(key, getattr(cfg, key), "is for data tokens; a prior models a VQ-VAE's codes")
      self.prior = VQPrior(cfg.prior, spec)
      self.token_shape, self.vocab = self.prior.code_shape, self.prior.codebook_size
      self.units = self.prior.units
    elif spec.kind == "image":
      _refuse("bins", cfg.bins, "is for vectors; these are images (family.levels sets theirs)")
      _refuse("bound", cfg.bound, "is for vectors; these are images")
      self.levels = discrete.Levels(spec, cfg.levels)
      self.token_shape, self.vocab = self.data_shape, self.levels.num
      self.units = self.levels.discrete_units
    else:
      _refuse("levels", cfg.levels, "is for images; this data is vectors (family.bins sets "
              "their bins)")
      self.bins = discrete.Bins(spec, cfg.bins or 128, cfg.bound or 4.0)
      self.token_shape, self.vocab = self.data_shape, self.bins.num
      self.units = self.bins.units
    if self.prior is not None:
      self.data_init = self.prior.data_init

  def init(self, rngs):
    net = self.net_cls(self.net_cfg, self.token_shape, self.vocab, precision=self.precision,
                       rngs=rngs)
    if self.prior is None:
      return {"net": net}
    return {"net": net, **self.prior.init(rngs)}

  @property
  def updates(self):
    return (Update("net", ("net",), self.loss),)

  @property
  def sampled_networks(self):
    return ("net",)

  def tokens(self, nets, x):
    """The data as tokens (B, S)."""
    if self.prior is not None:
      return self.prior.encode(nets, x)
    tokens = self.levels.tokens(x) if self.levels is not None else self.bins.tokens(x)
    return tokens.reshape(x.shape[0], -1)

  def nll(self, nets, batch):
    """-log p(x) per example in nats, where the data lives (exact for pixel levels)."""
    tokens_BxS = self.tokens(nets, batch["x"])
    logp = jax.nn.log_softmax(nets["net"](tokens_BxS), axis=-1)
    ll_BxS = jnp.take_along_axis(logp, tokens_BxS[..., None], axis=-1)[..., 0]
    return self.units.nats(-jnp.sum(ll_BxS, axis=1))

  def loss(self, nets, extra, batch, rng, step):
    nll_B = self.nll(nets, batch)
    per_token = jnp.mean(nll_B) / self.units.dims
    return LossOut(per_token, {"nll": jnp.mean(nll_B),
                               "bpd": jnp.mean(self.units.bits_per_dim(nll_B))})

  def evaluate(self, nets, extra, batch, rng):
    nll_B = self.nll(nets, batch)
    return {"nll": nll_B, "bpd": self.units.bits_per_dim(nll_B)}

  def sample(self, nets, rng, num, temperature: float | None = None,
             top_k: int | None = None, **kw):
    """`num` samples in model space: tokens one at a time, then their values."""
    t = self.cfg.temperature if temperature is None else temperature
    k = self.cfg.top_k if top_k is None else top_k
    if t <= 0 or k < 0:
      raise UserError(f"temperature {t} must be positive and top-k {k} at least 0")
    token_rng, value_rng = jax.random.split(rng)
    tokens_BxS = nets["net"].sample(token_rng, num, t, k)
    if self.prior is not None:
      return self.prior.decode(nets, tokens_BxS)
    tokens = tokens_BxS.reshape(num, *self.data_shape)
    if self.levels is not None:
      return self.levels.values(tokens)
    return self.bins.values(tokens, value_rng)
