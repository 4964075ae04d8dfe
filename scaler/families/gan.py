"""Generative adversarial networks: networks `generator` and `discriminator`, two updates.

One train step is `n_critic` discriminator updates, each on its own slice of the global
batch, then one generator update (`Update(..., repeat=n_critic)`), all in the one jitted
step; each network has its own optimizer (`optimizer: {generator: ..., discriminator:
...}` for the two-time-scale rule) and its schedule counts its own updates.

Losses, with D the discriminator's logit (critic value) and G(z) a generated sample:
  non_saturating (Goodfellow et al. 2014, sec. 3):
      L_D = softplus(-D(x)) + softplus(D(G(z)))     L_G = softplus(-D(G(z)))
  hinge (Lim & Ye 2017; Miyato et al. 2018):
      L_D = relu(1 - D(x)) + relu(1 + D(G(z)))      L_G = -D(G(z))
  wgan_gp (Gulrajani et al. 2017, algorithm 1):
      L_D = D(G(z)) - D(x) + lambda (|grad D(x^)|_2 - 1)^2,  x^ = e x + (1 - e) G(z)
      L_G = -D(G(z))
A conditional GAN feeds the label to the generator (an embedding) and to the
discriminator (projection, Miyato & Koyama 2018). The EMA of `train.ema_decay` covers
the generator only, and `sample` uses it.
"""

import dataclasses

import jax
import jax.numpy as jnp

from scaler.config import Named, at_least, choice, param, positive
from scaler.errors import UserError
from scaler.families.base import FamilyDefaults, LossOut, Update
from scaler.families.vae import sample_labels


@dataclasses.dataclass(frozen=True)
class NonSaturatingLoss:
  """The original GAN's discriminator loss, the generator's non-saturating one."""


@dataclasses.dataclass(frozen=True)
class HingeLoss:
  """Hinge loss for the discriminator, -D(G(z)) for the generator."""


@dataclasses.dataclass(frozen=True)
class WGANGPLoss:
  """Wasserstein critic with the gradient penalty on interpolates."""
  gp_weight: float = param(10.0, at_least(0.0))   # lambda


LOSSES = {"non_saturating": NonSaturatingLoss, "hinge": HingeLoss, "wgan_gp": WGANGPLoss}


@dataclasses.dataclass(frozen=True)
class GANConfig:
  latent_dim: int = param(64, positive)
  loss: Named = choice(LOSSES, "non_saturating")
  n_critic: int = param(1, at_least(1))   # discriminator updates per generator update
  conditional: bool = False               # condition both networks on the data's labels


def gradient_penalty(critic, real_BxX, fake_BxX, rng):
  """E[(|grad_x D(x^)|_2 - 1)^2] on random interpolates x^ (Gulrajani et al. eq. 3).

  `critic` maps a batch to (B,) values with no mixing between examples, so the
  gradient of their sum is each example's own input gradient. This is a gradient
  inside the loss that the step differentiates again: a gradient of a gradient.
  """
  eps_shape = (real_BxX.shape[0],) + (1,) * (real_BxX.ndim - 1)
  eps = jax.random.uniform(rng, eps_shape)
  x_hat = eps * real_BxX + (1 - eps) * fake_BxX
  grad = jax.grad(lambda x: jnp.sum(critic(x)))(x_hat)
  norm_B = jnp.sqrt(jnp.sum(jnp.square(grad.reshape(grad.shape[0], -1)), axis=1) + 1e-12)
  return jnp.mean(jnp.square(norm_B - 1.0))


class GANFamily(FamilyDefaults):
  """The model choice names the pair (`mlp_gan` for vectors, `dcgan` for images)."""

  def __init__(self, cfg: GANConfig, net_cls, net_cfg, spec, precision):
    if not (hasattr(net_cls, "generator") and hasattr(net_cls, "discriminator")):
      raise UserError("family gan needs a model with a generator and a discriminator: "
                      "mlp_gan or dcgan")
    if cfg.conditional and not spec.num_classes:
      raise UserError("family.conditional=true: the data has no labels (family gan "
                      "conditions on classes; the digits have 10)")
    self.cfg, self.net_cls, self.net_cfg, self.precision = cfg, net_cls, net_cfg, precision
    self.data_shape = tuple(spec.shape)
    self.num_classes = spec.num_classes if cfg.conditional else 0
    self.kind = cfg.loss.name
    if self.kind == "wgan_gp" and getattr(net_cfg, "discriminator_norm", None) == "batch":
      raise UserError("model.discriminator_norm=batch with family.loss=wgan_gp: the gradient "
                      "penalty needs each example's own input gradient; use layer or none")

  def init(self, rngs):
    kw = dict(precision=self.precision, rngs=rngs)
    k = self.num_classes
    return {"generator": self.net_cls.generator(self.net_cfg, self.cfg.latent_dim,
                                                self.data_shape, k, **kw),
            "discriminator": self.net_cls.discriminator(self.net_cfg, self.data_shape, k,
                                                        **kw)}

  @property
  def updates(self):
    return (Update("discriminator", ("discriminator",), self.d_loss, repeat=self.cfg.n_critic),
            Update("generator", ("generator",), self.g_loss))

  @property
  def sampled_networks(self):
    return ("generator",)

  def _labels(self, batch):
    return batch["label"] if self.num_classes else None

  def _fake(self, generator, rng, num, label_B):
    z = jax.random.normal(rng, (num, self.cfg.latent_dim))
    return generator(z, label_B)

  def d_loss(self, nets, extra, batch, rng, step):
    x, label = batch["x"], self._labels(batch)
    z_rng, gp_rng = jax.random.split(rng)
    D = nets["discriminator"]
    # The generator is a constant here: no gradient reaches it in this update.
    fake = jax.lax.stop_gradient(self._fake(nets["generator"], z_rng, x.shape[0], label))
    d_real, d_fake = D(x, label), D(fake, label)
    metrics = {"real": jnp.mean(d_real), "fake": jnp.mean(d_fake)}
    if self.kind == "non_saturating":
      loss = jnp.mean(jax.nn.softplus(-d_real) + jax.nn.softplus(d_fake))
    elif self.kind == "hinge":
      loss = jnp.mean(jax.nn.relu(1 - d_real) + jax.nn.relu(1 + d_fake))
    else:
      wasserstein = jnp.mean(d_real) - jnp.mean(d_fake)
      gp = gradient_penalty(lambda v: D(v, label), x, fake, gp_rng)
      loss = -wasserstein + self.cfg.loss.cfg.gp_weight * gp
      metrics.update(gp=gp, wasserstein=wasserstein)
    return LossOut(loss, metrics)

  def g_loss(self, nets, extra, batch, rng, step):
    label = self._labels(batch)
    d_fake = nets["discriminator"](self._fake(nets["generator"], rng, batch["x"].shape[0],
                                              label), label)
    if self.kind == "non_saturating":
      loss = jnp.mean(jax.nn.softplus(-d_fake))
    else:
      loss = -jnp.mean(d_fake)
    return LossOut(loss, {"fake": jnp.mean(d_fake)})

  def sample(self, nets, rng, num, label=None, **kw):
    labels = sample_labels(self.num_classes, num, label)
    z = jax.random.normal(rng, (num, self.cfg.latent_dim))
    return nets["generator"](z, labels, train=False)
