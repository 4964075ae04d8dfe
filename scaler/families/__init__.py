"""Families by config name: name -> (config dataclass, family class)."""

from scaler.families.diffusion import DiffusionConfig, DiffusionFamily
from scaler.families.ebm import EBMConfig, EBMFamily

FAMILIES = {
    "diffusion": (DiffusionConfig, DiffusionFamily),
    "ebm": (EBMConfig, EBMFamily),
}
