"""Networks by config name: name -> (config dataclass, module class).

A denoiser is built as `cls(cfg, data_shape, num_classes=K, precision=..., rngs=...)`
and called as `net(x, t_B)` or, when K > 0, `net(x, t_B, y_B)` with labels in 0..K
(K is the null label of classifier-free guidance). A family with several networks takes
one model choice that names the set: `mlp_vae` and `conv_vae` build an encoder and a
decoder, `mlp_gan` and `dcgan` a generator and a discriminator (the entry is then a class
whose attributes build each network).
"""

from scaler.nn.conv import ConvVAE, ConvVAEConfig, DCGAN, DCGANConfig
from scaler.nn.dit import DiT, DiTConfig
from scaler.nn.energy import EnergyConv, EnergyConvConfig, EnergyMLP, EnergyMLPConfig
from scaler.nn.flow_nets import FLOWS
from scaler.nn.mlp import MLPDenoiser, MLPDenoiserConfig
from scaler.nn.mlp_pair import MLPGAN, MLPVAE, MLPPairConfig
from scaler.nn.pixelcnn import PixelCNN, PixelCNNConfig
from scaler.nn.transformer import Transformer, TransformerConfig
from scaler.nn.unet import UNet, UNetConfig

NETWORKS = {
    "mlp_denoiser": (MLPDenoiserConfig, MLPDenoiser),
    "unet": (UNetConfig, UNet),
    "dit": (DiTConfig, DiT),
    # Flows (family flow) and autoregressive networks (family autoregressive) are built
    # by their families, with the arguments their families give.
    **FLOWS,
    "pixelcnn": (PixelCNNConfig, PixelCNN),
    "transformer": (TransformerConfig, Transformer),
    "energy_mlp": (EnergyMLPConfig, EnergyMLP),
    "energy_conv": (EnergyConvConfig, EnergyConv),
    "mlp_vae": (MLPPairConfig, MLPVAE),
    "conv_vae": (ConvVAEConfig, ConvVAE),
    "mlp_gan": (MLPPairConfig, MLPGAN),
    "dcgan": (DCGANConfig, DCGAN),
}
