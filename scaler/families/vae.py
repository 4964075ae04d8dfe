"""Variational autoencoders: the Gaussian VAE (beta-VAE, conditional) and the VQ-VAE.

VAE (Kingma & Welling 2014): an encoder q(z | x) = N(mu, diag sigma^2), a decoder
p(x | z), a prior N(0, I); training maximises the ELBO

    log p(x) >= E_q[log p(x | z)] - KL(q(z | x) || p(z))          (eq. 3)

through the reparameterisation z = mu + sigma * eps (eq. 10). beta-VAE (Higgins et al.
2017) weighs the KL by beta, optionally warmed up linearly from 0 over
`kl_warmup_steps` train steps (Bowman et al. 2016). A conditional VAE (Sohn et al. 2015)
gives the label to the encoder and the decoder.

VQ-VAE (van den Oord et al. 2017): the encoder's grid of vectors snaps to the nearest
codes of an EMA-updated codebook (scaler/nn/quantizer.py); the loss is
|x - dec(z_q)|^2 + commitment |z_e - sg(e)|^2 (eq. 3, the codebook term replaced by the
EMA update), with straight-through gradients to the encoder.

The model choice names a pair (`mlp_vae`, `conv_vae`); the family builds two networks
from it, `encoder` and `decoder`, moved by one update with one optimizer each.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from scaler.config import Named, at_least, choice, fraction, one_of, param, positive
from scaler.errors import UserError
from scaler.families.base import FamilyDefaults, LossOut, Update
from scaler.nn.quantizer import VectorQuantizer

LOG_2PI = math.log(2 * math.pi)


def _sigma(x):
  if x == "learned":
    return None
  return None if isinstance(x, (int, float)) and x > 0 else "must be learned or positive"


@dataclasses.dataclass(frozen=True)
class GaussianLikelihood:
  """p(x | z) = N(decoder(z), sigma^2 I); `learned`: one log sigma trained with the
  decoder (Rybkin et al. 2021's sigma-VAE), which balances the terms without tuning."""
  sigma: float | str = param("learned", _sigma)


@dataclasses.dataclass(frozen=True)
class BernoulliLikelihood:
  """Bernoulli-style, for images: pixel intensities in [0, 1] as soft targets of the
  decoder's logits (binary cross-entropy, as usual for MNIST-like digits)."""


LIKELIHOODS = {"gaussian": GaussianLikelihood, "bernoulli": BernoulliLikelihood}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  latent_dim: int = param(16, positive)
  beta: float = param(1.0, at_least(0.0))              # KL weight (beta-VAE); 1 is the ELBO
  kl_warmup_steps: int = param(0, at_least(0))         # linear 0 -> beta over these steps
  likelihood: Named = choice(LIKELIHOODS, "gaussian")
  conditional: bool = False                            # condition on the data's labels
  # What `sample` returns: the decoder's mean, or a draw from p(x | z) (vectors: the
  # data's own noise around the mean; images: noisy or binary pixels).
  sample: str = param("mean", one_of("mean", "draw"))


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  codebook_size: int = param(64, at_least(2))          # K codes
  code_dim: int = param(16, positive)                  # D per code
  commitment: float = param(0.25, at_least(0.0))       # weight of |z_e - sg(e)|^2
  decay: float = param(0.99, fraction)                 # EMA decay of codebook and prior
  dead_below: float = param(1.0, at_least(0.0))        # restart codes used less per step (0: off)


class LearnedScale(nnx.Module):
  """A decoder with a trained log sigma for its Gaussian likelihood: one per feature for
  vectors (standardised features keep different noise levels), one shared by all
  pixels for images (a pixel that is always black would drive its own sigma to 0)."""

  def __init__(self, net, shape):
    self.net = net
    self.log_sigma = nnx.Param(jnp.zeros(shape), out_sharding=(None,) * len(shape))

  def __call__(self, z, label_B=None, train: bool = True):
    return self.net(z, label_B, train)


class VQEncoder(nnx.Module):
  """The encoder network of a VQ-VAE: the pair's encoder and the codebook after it."""

  def __init__(self, net, quantizer: VectorQuantizer):
    self.net, self.quantizer = net, quantizer

  def __call__(self, x, label_B=None, train: bool = True):
    z = self.net(x, label_B, train)
    return z.reshape(z.shape[0], -1, z.shape[-1])     # (B, P, D)


def _check_pair(net_cls, family: str, model_hint: str):
  if not (hasattr(net_cls, "encoder") and hasattr(net_cls, "decoder")):
    raise UserError(f"family {family} needs a model with an encoder and a decoder: "
                    f"{model_hint}")


def _labels(spec, conditional: bool, family: str) -> int:
  if conditional and not spec.num_classes:
    raise UserError(f"family.conditional=true: the data has no labels (family {family} "
                    "conditions on classes; the digits have 10)")
  return spec.num_classes if conditional else 0


def sample_labels(num_classes: int, num: int, label):
  """Class `label` for every sample, or the classes in turn (a balanced draw)."""
  if label is None:
    return jnp.arange(num) % num_classes if num_classes else None
  if not num_classes:
    raise UserError(f"--label {label}: this run is unconditional (it was not trained on "
                    "labels); sample without --label")
  if not 0 <= label < num_classes:
    raise UserError(f"--label {label}: out of range; this run's classes are 0 to "
                    f"{num_classes - 1}")
  return jnp.full((num,), label, jnp.int32)


def _per_example(x):
  return x.reshape(x.shape[0], -1)


class VAEFamily(FamilyDefaults):
  """Networks `encoder` (x -> mean and log-variance, (B, 2L)) and `decoder` (z -> the
  likelihood's mean or logits)."""

  def __init__(self, cfg: VAEConfig, net_cls, net_cfg, spec, precision):
    _check_pair(net_cls, "vae", "mlp_vae or conv_vae")
    self.cfg, self.net_cls, self.net_cfg, self.precision = cfg, net_cls, net_cfg, precision
    self.data_shape = tuple(spec.shape)
    self.num_classes = _labels(spec, cfg.conditional, "vae")
    self.bernoulli = cfg.likelihood.name == "bernoulli"
    if self.bernoulli and spec.kind != "image":
      raise UserError("family.likelihood=bernoulli is for images (intensities as "
                      "probabilities); this data is vectors: use gaussian")
    self.learned_sigma = (not self.bernoulli and cfg.likelihood.cfg.sigma == "learned")
    self.sigma_shape = () if spec.kind == "image" else self.data_shape

  def init(self, rngs):
    kw = dict(precision=self.precision, rngs=rngs)
    latent, k = self.cfg.latent_dim, self.num_classes
    decoder = self.net_cls.decoder(self.net_cfg, (latent,), self.data_shape, k, **kw)
    return {"encoder": self.net_cls.encoder(self.net_cfg, self.data_shape, (2 * latent,), k,
                                            **kw),
            "decoder": LearnedScale(decoder, self.sigma_shape) if self.learned_sigma
                       else decoder}

  @property
  def updates(self):
    return (Update("vae", ("encoder", "decoder"), self.loss),)

  def _log_sigma(self, decoder):
    if self.learned_sigma:
      return decoder.log_sigma[...]
    return jnp.log(jnp.float32(self.cfg.likelihood.cfg.sigma))

  def nll(self, decoder, out, x):
    """-log p(x | z) per example, summed over the data dimensions, in nats."""
    if self.bernoulli:
      p = (x + 1) / 2                                # [-1, 1] -> intensities in [0, 1]
      return jnp.sum(_per_example(jax.nn.softplus(out) - p * out), axis=1)
    log_sigma = self._log_sigma(decoder)
    z = (x - out) * jnp.exp(-log_sigma)
    return jnp.sum(_per_example(0.5 * z ** 2 + log_sigma + 0.5 * LOG_2PI), axis=1)

  def mean(self, out):
    """The likelihood's mean in model space."""
    return jnp.tanh(out / 2) if self.bernoulli else out   # 2 sigmoid(l) - 1 = tanh(l/2)

  def _terms(self, nets, batch, rng):
    """Per-example -log p(x|z), KL(q||p), the reconstruction's squared error."""
    x, label = batch["x"], batch.get("label") if self.num_classes else None
    stats = nets["encoder"](x, label)
    mu_BxL, logvar_BxL = jnp.split(stats, 2, axis=-1)
    eps = jax.random.normal(rng, mu_BxL.shape)
    z_BxL = mu_BxL + jnp.exp(0.5 * logvar_BxL) * eps       # reparameterisation, eq. 10
    out = nets["decoder"](z_BxL, label)
    nll_B = self.nll(nets["decoder"], out, x)
    # KL(N(mu, sigma^2) || N(0, 1)) in closed form (appendix B).
    kl_B = 0.5 * jnp.sum(mu_BxL ** 2 + jnp.exp(logvar_BxL) - 1 - logvar_BxL, axis=-1)
    mse_B = jnp.mean(_per_example(jnp.square(self.mean(out) - x)), axis=1)
    return nll_B, kl_B, mse_B

  def beta(self, step):
    """beta, warmed up linearly over kl_warmup_steps from the step the loss sees."""
    if self.cfg.kl_warmup_steps == 0:
      return jnp.float32(self.cfg.beta)
    ramp = jnp.minimum(step.astype(jnp.float32) / self.cfg.kl_warmup_steps, 1.0)
    return self.cfg.beta * ramp

  def loss(self, nets, extra, batch, rng, step):
    nll_B, kl_B, mse_B = self._terms(nets, batch, rng)
    beta = self.beta(step)
    nll, kl = jnp.mean(nll_B), jnp.mean(kl_B)
    metrics = {"recon": nll, "kl": kl, "elbo": -(nll + kl), "beta": beta,
               "mse": jnp.mean(mse_B)}
    if self.learned_sigma:
      metrics["sigma"] = jnp.mean(jnp.exp(nets["decoder"].log_sigma[...]))
    return LossOut(nll + beta * kl, metrics)

  def evaluate(self, nets, extra, batch, rng):
    nll_B, kl_B, mse_B = self._terms(nets, batch, rng)
    return {"elbo": -(nll_B + kl_B), "recon": nll_B, "kl": kl_B, "mse": mse_B}

  def reconstruct(self, nets, batch, rng):
    """Decoded posterior means of `batch`, in model space."""
    label = batch.get("label") if self.num_classes else None
    mu_BxL, _ = jnp.split(nets["encoder"](batch["x"], label, train=False), 2, axis=-1)
    return self.mean(nets["decoder"](mu_BxL, label, train=False))

  def sample(self, nets, rng, num, label=None, **kw):
    """z ~ N(0, I), then the decoder's mean (or a draw from p(x | z))."""
    z_rng, x_rng = jax.random.split(rng)
    labels = sample_labels(self.num_classes, num, label)
    out = nets["decoder"](jax.random.normal(z_rng, (num, self.cfg.latent_dim)), labels,
                          train=False)
    mean = self.mean(out)
    if self.cfg.sample == "mean":
      return mean
    if self.bernoulli:
      return jnp.where(jax.random.uniform(x_rng, mean.shape) < (mean + 1) / 2, 1.0, -1.0)
    return mean + jnp.exp(self._log_sigma(nets["decoder"])) * jax.random.normal(x_rng, mean.shape)


class VQVAEFamily(FamilyDefaults):
  """Networks `encoder` (the pair's encoder and the codebook) and `decoder`."""

  def __init__(self, cfg: VQVAEConfig, net_cls, net_cfg, spec, precision):
    _check_pair(net_cls, "vqvae", "conv_vae (or mlp_vae)")
    self.cfg, self.net_cls, self.net_cfg, self.precision = cfg, net_cls, net_cfg, precision
    self.data_shape = tuple(spec.shape)
    self.grid = tuple(net_cls.code_grid(net_cfg, self.data_shape))
    self.code_shape = (*self.grid, cfg.code_dim)

  def init(self, rngs):
    kw = dict(precision=self.precision, rngs=rngs)
    c = self.cfg
    quantizer = VectorQuantizer(c.codebook_size, c.code_dim, math.prod(self.grid),
                                decay=c.decay, dead_below=c.dead_below, rngs=rngs)
    encoder = self.net_cls.encoder(self.net_cfg, self.data_shape, self.code_shape, **kw)
    return {"encoder": VQEncoder(encoder, quantizer),
            "decoder": self.net_cls.decoder(self.net_cfg, self.code_shape, self.data_shape,
                                            **kw)}

  @property
  def updates(self):
    return (Update("vqvae", ("encoder", "decoder"), self.loss),)

  def data_init(self, nets, batch, rng):
    """Codes start at random encoder outputs of the first batch, not at random points."""
    z = nets["encoder"](batch["x"], train=False)
    nets["encoder"].quantizer.initialise(z.reshape(-1, z.shape[-1]), rng)

  def _decode(self, decoder, zq_BxPxD, train=True):
    return decoder(zq_BxPxD.reshape(zq_BxPxD.shape[0], *self.code_shape), None, train)

  def loss(self, nets, extra, batch, rng, step):
    x = batch["x"]
    z_BxPxD = nets["encoder"](x)
    zq, _, commit_B, perplexity, restarted = nets["encoder"].quantizer(z_BxPxD, rng,
                                                                       update=True)
    x_hat = self._decode(nets["decoder"], zq)
    mse = jnp.mean(jnp.square(x_hat - x))
    commitment = jnp.mean(commit_B) / math.prod(self.code_shape)
    return LossOut(mse + self.cfg.commitment * commitment,
                   {"mse": mse, "commitment": commitment, "perplexity": perplexity,
                    "restarted": restarted.astype(jnp.float32)})

  def evaluate(self, nets, extra, batch, rng):
    x = batch["x"]
    zq, *_ = nets["encoder"].quantizer(nets["encoder"](x, train=False))
    err = jnp.square(self._decode(nets["decoder"], zq, train=False) - x)
    return {"mse": jnp.mean(_per_example(err), axis=1)}

  def encode(self, nets, x):
    """Code indices (B, P) of `x`."""
    return nets["encoder"].quantizer(nets["encoder"](x, train=False))[1]

  def reconstruct(self, nets, batch, rng):
    zq, *_ = nets["encoder"].quantizer(nets["encoder"](batch["x"], train=False))
    return self._decode(nets["decoder"], zq, train=False)

  def sample(self, nets, rng, num, label=None, **kw):
    """Codes drawn independently per position from their training-set frequencies
    (a stand-in for an autoregressive prior), decoded."""
    sample_labels(0, num, label)   # refuses a label: the VQ-VAE is unconditional
    quantizer = nets["encoder"].quantizer
    e_NxPxD = quantizer.lookup(quantizer.sample_codes(rng, num))
    return self._decode(nets["decoder"], e_NxPxD, train=False)
