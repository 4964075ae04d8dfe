"""The normalizing flows: RealNVP, Glow and MAF, built from scaler/nn/flows.py.

Every flow is a bijection between model space and a flat latent of the same size:

    eps_BxD, logdet_B = flow.forward(x)        # log p(x) = log N(eps; 0, I) + logdet_B
    x = flow.inverse(eps_BxD)

Glow's split with a learned prior fits this form: the factored-out half z is mapped to
eps = (z - mu(h)) / sigma(h) given the half h that goes on, with -sum log sigma added to
the log-determinant, so N(eps; 0, I) is the learned prior N(z; mu(h), sigma(h)^2).
`forward(x, init=True)` runs ActNorm's data-dependent initialisation on the way.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scaler.config import at_least, one_of, param, positive
from scaler.errors import UserError
from scaler.nn import flows, layers
from scaler.nn.layers import Precision

SQUEEZE = 2   # the side of the patches a squeeze turns into channels


def _flat(x):
  return x.reshape(x.shape[0], -1)


def check_squeezable(model: str, data_shape, scales: int) -> None:
  """Every squeeze must find an even side; the message names the scale and the size."""
  if len(data_shape) != 3:
    raise UserError(f"model {model} needs images (H, W, C); the data has shape "
                    f"{tuple(data_shape)}: use realnvp or maf for vectors")
  h, w, _ = data_shape
  for scale in range(1, scales + 1):
    if h % SQUEEZE or w % SQUEEZE:
      raise UserError(
          f"model.scales={scales}: at scale {scale} the image is {h}x{w}, not divisible "
          f"by the squeeze factor {SQUEEZE}; use model.scales={scale - 1} or less, or "
          "images whose sides are divisible by 2^scales")
    h, w = h // SQUEEZE, w // SQUEEZE


class Sequence(nnx.Module):
  """Layers applied in turn; the log-determinants add up."""

  def __init__(self, steps):
    self.steps = nnx.List(steps)

  def forward(self, x):
    logdet = jnp.zeros(x.shape[:1])
    for step in self.steps:
      x, ld = step.forward(x)
      logdet = logdet + ld
    return x, logdet

  def inverse(self, y):
    for step in reversed(self.steps):
      y = step.inverse(y)
    return y


# --- RealNVP --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RealNVPConfig:
  couplings: int = param(4, positive)   # vectors: coupling layers; images: per mask type and scale
  scales: int = param(1, positive)      # images: checkerboard couplings, squeeze, channel couplings
  hidden: int = param(64, positive)     # width of each coupling's network (M)
  depth: int = param(2, positive)       # layers of each coupling's network
  clamp: float = param(2.0, positive)   # log-scale bound: s = clamp * tanh(s / clamp)


class RealNVP(nnx.Module):
  """Affine couplings with alternating masks (Dinh et al. 2017).

  Vectors: `couplings` layers, each transforming one half of the dimensions given the
  other, the halves alternating. Images, at each of `scales` scales: `couplings`
  checkerboard couplings, a squeeze, `couplings` channel couplings (sec. 3.6; nothing is
  factored out, so the latent is the last scale's whole tensor).
  """
  needs_data_init = False

  @staticmethod
  def check(cfg: RealNVPConfig, data_shape) -> None:
    if len(data_shape) == 1 and data_shape[0] < 2:
      raise UserError("model realnvp needs at least 2 dimensions to split into halves; "
                      "the data has 1: use maf")
    if len(data_shape) != 1:
      check_squeezable("realnvp", data_shape, cfg.scales)

  def __init__(self, cfg: RealNVPConfig, data_shape, *, precision: Precision, rngs):
    self.check(cfg, data_shape)
    self.data_shape = tuple(data_shape)
    kw = dict(precision=precision, rngs=rngs)
    steps = []
    if len(data_shape) == 1:
      (d,) = data_shape
      for i in range(cfg.couplings):
        net = flows.MLPNet(d, 2 * d, cfg.hidden, cfg.depth, **kw)
        steps.append(flows.MaskedCoupling(net, (d,), "halves", i % 2, cfg.clamp))
    else:
      h, w, c = data_shape
      for _ in range(cfg.scales):
        for i in range(cfg.couplings):
          net = flows.ConvNet(c, 2 * c, cfg.hidden, cfg.depth, **kw)
          steps.append(flows.MaskedCoupling(net, (h, w, c), "checkerboard", i % 2, cfg.clamp))
        steps.append(Squeeze())
        h, w, c = h // SQUEEZE, w // SQUEEZE, c * SQUEEZE ** 2
        steps += [flows.ChannelCoupling(c, cfg.hidden, cfg.depth, cfg.clamp, bool(i % 2), **kw)
                  for i in range(cfg.couplings)]
      self.latent_shape = (h, w, c)
    self.flow = Sequence(steps)

  def forward(self, x, init=False):
    z, logdet = self.flow.forward(x)
    return _flat(z), logdet

  def inverse(self, eps_BxD):
    shape = self.data_shape if len(self.data_shape) == 1 else self.latent_shape
    return self.flow.inverse(eps_BxD.reshape(-1, *shape))


class Squeeze(nnx.Module):
  def forward(self, x):
    return flows.squeeze(x, SQUEEZE), jnp.zeros(x.shape[:1])

  def inverse(self, y):
    return flows.unsqueeze(y, SQUEEZE)


# --- Glow -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GlowConfig:
  scales: int = param(2, positive)    # L: squeeze, K steps, split (but the last)
  steps: int = param(4, positive)     # K steps of flow per scale
  hidden: int = param(64, positive)   # width of each coupling's network
  depth: int = param(2, positive)     # layers of each coupling's network
  clamp: float = param(2.0, positive)  # log-scale bound of couplings and priors
  remat: str = param("none", one_of(*layers.REMAT))   # activation checkpointing per step


class GlowStep(nnx.Module):
  """ActNorm, invertible 1x1 convolution, affine coupling (Glow fig. 2a)."""

  def __init__(self, channels, cfg: GlowConfig, *, precision: Precision, rngs):
    self.norm = flows.ActNorm(channels, precision=precision)
    self.mix = flows.InvConv1x1(channels, precision=precision, rngs=rngs)
    self.coupling = flows.ChannelCoupling(channels, cfg.hidden, cfg.depth, cfg.clamp, False,
                                          precision=precision, rngs=rngs)

  def forward(self, x, init=False):
    x, ld1 = self.norm.forward(x, init)
    x, ld2 = self.mix.forward(x)
    x, ld3 = self.coupling.forward(x)
    return x, ld1 + ld2 + ld3

  def __call__(self, x):
    return self.forward(x)

  def inverse(self, y):
    return self.norm.inverse(self.mix.inverse(self.coupling.inverse(y)))


class LearnedPrior(nnx.Module):
  """The split's prior N(z; mu(h), sigma(h)^2), from a zero-initialised 3x3 conv of the
  half h that goes on (Glow sec. 3.4; it starts as N(0, I))."""

  def __init__(self, c_in, c_out, clamp, *, precision: Precision, rngs):
    self.conv = layers.conv(c_in, 2 * c_out, (3, 3), in_role=None, out_role=None,
                            kernel_init=flows._zeros, precision=precision, rngs=rngs)
    self.precision, self.clamp = precision, clamp

  def __call__(self, h):
    mu, log_sigma = jnp.split(self.precision.output(self.conv(self.precision.cast(h))), 2, -1)
    return mu, flows.soft_clamp(log_sigma, self.clamp)


class Glow(nnx.Module):
  """Multi-scale Glow (Kingma & Dhariwal 2018, fig. 2b): at each of L scales a squeeze,
  K steps of flow, and (but at the last) a split whose factored-out half gets a learned
  prior conditioned on the other half."""
  needs_data_init = True

  @staticmethod
  def check(cfg: GlowConfig, data_shape) -> None:
    check_squeezable("glow", data_shape, cfg.scales)

  def __init__(self, cfg: GlowConfig, data_shape, *, precision: Precision, rngs):
    self.check(cfg, data_shape)
    self.cfg, self.data_shape = cfg, tuple(data_shape)
    h, w, c = data_shape
    scales, priors, self.split_shapes = [], [], []
    for level in range(cfg.scales):
      h, w, c = h // SQUEEZE, w // SQUEEZE, c * SQUEEZE ** 2
      scales.append(nnx.List([GlowStep(c, cfg, precision=precision, rngs=rngs)
                              for _ in range(cfg.steps)]))
      if level < cfg.scales - 1:
        keep = c // 2
        priors.append(LearnedPrior(keep, c - keep, cfg.clamp, precision=precision, rngs=rngs))
        self.split_shapes.append((h, w, c - keep))
        c = keep
    self.scales, self.priors = nnx.List(scales), nnx.List(priors)
    self.top_shape = (h, w, c)

  def forward(self, x, init=False):
    # Activation checkpointing per step, but not in the data-dependent init (no gradient
    # there, and `init` must stay a Python flag).
    remat = layers.checkpointed(self.cfg.remat)
    call = (lambda step, x: step.forward(x, True)) if init else remat
    logdet, eps = jnp.zeros(x.shape[:1]), []
    for level, steps in enumerate(self.scales):
      x = flows.squeeze(x, SQUEEZE)
      for step in steps:
        x, ld = call(step, x)
        logdet = logdet + ld
      if level < len(self.priors):
        keep = x.shape[-1] // 2
        x, z = x[..., :keep], x[..., keep:]
        mu, log_sigma = self.priors[level](x)
        eps.append(_flat((z - mu) * jnp.exp(-log_sigma)))
        logdet = logdet - jnp.sum(_flat(log_sigma), axis=1)
    eps.append(_flat(x))
    return jnp.concatenate(eps, axis=1), logdet

  def inverse(self, eps_BxD):
    sizes = [math.prod(s) for s in self.split_shapes] + [math.prod(self.top_shape)]
    pieces = jnp.split(eps_BxD, np.cumsum(sizes)[:-1], axis=1)
    x = pieces[-1].reshape(-1, *self.top_shape)
    for level in reversed(range(len(self.scales))):
      if level < len(self.priors):
        mu, log_sigma = self.priors[level](x)
        z = pieces[level].reshape(-1, *self.split_shapes[level]) * jnp.exp(log_sigma) + mu
        x = jnp.concatenate([x, z], axis=-1)
      for step in reversed(self.scales[level]):
        x = step.inverse(x)
      x = flows.unsqueeze(x, SQUEEZE)
    return x


# --- MAF ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MAFConfig:
  blocks: int = param(5, positive)       # MADE blocks
  hidden: int = param(64, positive)      # MADE's hidden width
  depth: int = param(2, at_least(1))     # MADE's hidden layers
  order: str = param("reverse", one_of("reverse", "random"))   # each block's order vs the last
  clamp: float = param(3.0, positive)    # bound of MADE's log-scale alpha


class MAF(nnx.Module):
  """Masked autoregressive flow (Papamakarios et al. 2017): MADE blocks, each in a new
  order (the previous one reversed, or a fresh seeded permutation); any data shape,
  flattened to D."""
  needs_data_init = False

  @staticmethod
  def check(cfg: MAFConfig, data_shape) -> None:
    pass   # any shape: MADE sees the flattened data

  def __init__(self, cfg: MAFConfig, data_shape, *, precision: Precision, rngs):
    self.data_shape = tuple(data_shape)
    d = math.prod(data_shape)
    order = np.arange(d)
    blocks = []
    for i in range(cfg.blocks):
      blocks.append(flows.MAFBlock(d, cfg.hidden, cfg.depth, tuple(int(o) for o in order),
                                   cfg.clamp, precision=precision, rngs=rngs))
      order = (order[::-1] if cfg.order == "reverse"
               else np.random.default_rng(i).permutation(d))
    self.flow = Sequence(blocks)

  def forward(self, x, init=False):
    return self.flow.forward(_flat(x))

  def inverse(self, eps_BxD):
    return self.flow.inverse(eps_BxD).reshape(-1, *self.data_shape)


FLOWS = {"realnvp": (RealNVPConfig, RealNVP), "glow": (GlowConfig, Glow),
         "maf": (MAFConfig, MAF)}
