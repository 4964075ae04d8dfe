"""Families by config name: name -> (config dataclass, family class)."""

from scaler.families.autoregressive import AutoregressiveConfig, AutoregressiveFamily
from scaler.families.diffusion import DiffusionConfig, DiffusionFamily
from scaler.families.ebm import EBMConfig, EBMFamily
from scaler.families.flow import FlowConfig, FlowFamily

FAMILIES = {
    "diffusion": (DiffusionConfig, DiffusionFamily),
    "flow": (FlowConfig, FlowFamily),
    "autoregressive": (AutoregressiveConfig, AutoregressiveFamily),
    "ebm": (EBMConfig, EBMFamily),
}
