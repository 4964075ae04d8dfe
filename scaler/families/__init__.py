"""Families by config name: name -> (config dataclass, family class)."""

from scaler.families.autoregressive import AutoregressiveConfig, AutoregressiveFamily
from scaler.families.diffusion import DiffusionConfig, DiffusionFamily
from scaler.families.ebm import EBMConfig, EBMFamily
from scaler.families.flow import FlowConfig, FlowFamily
from scaler.families.gan import GANConfig, GANFamily
from scaler.families.vae import VAEConfig, VAEFamily, VQVAEConfig, VQVAEFamily

FAMILIES = {
    "diffusion": (DiffusionConfig, DiffusionFamily),
    "vae": (VAEConfig, VAEFamily),
    "vqvae": (VQVAEConfig, VQVAEFamily),
    "gan": (GANConfig, GANFamily),
    "flow": (FlowConfig, FlowFamily),
    "autoregressive": (AutoregressiveConfig, AutoregressiveFamily),
    "ebm": (EBMConfig, EBMFamily),
}
