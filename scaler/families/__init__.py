"""Families by config name: name -> (config dataclass, family class)."""

from scaler.families.diffusion import DiffusionConfig, DiffusionFamily

FAMILIES = {
    "diffusion": (DiffusionConfig, DiffusionFamily),
}
