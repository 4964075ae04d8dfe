"""Networks by config name: name -> (config dataclass, module class)."""

from scaler.nn.energy import EnergyConv, EnergyConvConfig, EnergyMLP, EnergyMLPConfig
from scaler.nn.mlp import MLPDenoiser, MLPDenoiserConfig
from scaler.nn.unet import UNet, UNetConfig

NETWORKS = {
    "mlp_denoiser": (MLPDenoiserConfig, MLPDenoiser),
    "unet": (UNetConfig, UNet),
    "energy_mlp": (EnergyMLPConfig, EnergyMLP),
    "energy_conv": (EnergyConvConfig, EnergyConv),
}
