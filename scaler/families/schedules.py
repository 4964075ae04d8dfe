"""DDPM noise schedules: the per-timestep constants of the forward and reverse process.

Index t runs over 0..T-1 and names the step that produces x_{t+1} in the paper's 1-based
notation, so `alphas_cumprod[t]` is the signal share of the noisiest input the denoiser
sees at t. Everything is computed once in float64 with numpy and stored as float32.
"""

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Schedule(NamedTuple):
  """Per-timestep constants, each of shape (T,)."""
  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray                  # abar_t
  alphas_cumprod_prev: jnp.ndarray             # abar_{t-1}, with abar_{-1} = 1
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  sqrt_recip_alphas_cumprod: jnp.ndarray       # 1 / sqrt(abar_t)
  sqrt_recipm1_alphas_cumprod: jnp.ndarray     # sqrt(1 / abar_t - 1)
  posterior_variance: jnp.ndarray              # beta~_t of q(x_{t-1} | x_t, x_0)
  posterior_log_variance_clipped: jnp.ndarray  # log beta~_t, with t=0 taking t=1's value
  posterior_mean_coef1: jnp.ndarray            # multiplies x_0
  posterior_mean_coef2: jnp.ndarray            # multiplies x_t

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def linear_betas(num_timesteps: int, beta_start=1e-4, beta_end=0.02) -> np.ndarray:
  """Ho et al.'s linear betas, rescaled by 1000/T (as in improved DDPM).

  The rescaling keeps abar_{T-1} near zero for any T: unscaled, T=100 would end at
  abar = 0.37, far from the N(0, I) that sampling starts from.
  """
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s=0.008, max_beta=0.999) -> np.ndarray:
  """Nichol & Dhariwal's cosine schedule; betas clipped so the last step is not singular."""
  def abar(u):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  t = np.arange(num_timesteps)
  betas = [1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps) for i in t]
  return np.minimum(np.asarray(betas, np.float64), max_beta)


def from_betas(betas: np.ndarray) -> Schedule:
  """All the derived constants of a beta sequence."""
  betas = np.asarray(betas, np.float64)
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  # beta~_0 is 0; its log takes beta~_1's value so it stays finite (Ho et al.).
  clipped = post_var.copy()
  clipped[0] = post_var[1] if len(betas) > 1 else betas[0]
  arrays = dict(
      betas=betas, alphas=alphas, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
      sqrt_alphas_cumprod=np.sqrt(abar),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
      posterior_variance=post_var,
      posterior_log_variance_clipped=np.log(clipped),
      posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
      posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar))
  return Schedule(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def make(name: str, num_timesteps: int) -> Schedule:
  """The named schedule over `num_timesteps` steps (names: see `SCHEDULES`)."""
  return from_betas(SCHEDULES[name](num_timesteps))
