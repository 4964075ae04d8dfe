"""Networks by config name: name -> (config dataclass, module class).

A family with several networks takes one model choice that names the set: `mlp_vae` and
`conv_vae` build an encoder and a decoder, `mlp_gan` and `dcgan` a generator and a
discriminator (the entry is then a class whose attributes build each network).
"""

from scaler.nn.conv import ConvVAE, ConvVAEConfig, DCGAN, DCGANConfig
from scaler.nn.mlp import MLPDenoiser, MLPDenoiserConfig
from scaler.nn.mlp_pair import MLPGAN, MLPVAE, MLPPairConfig
from scaler.nn.unet import UNet, UNetConfig

NETWORKS = {
    "mlp_denoiser": (MLPDenoiserConfig, MLPDenoiser),
    "unet": (UNetConfig, UNet),
    "mlp_vae": (MLPPairConfig, MLPVAE),
    "conv_vae": (ConvVAEConfig, ConvVAE),
    "mlp_gan": (MLPPairConfig, MLPGAN),
    "dcgan": (DCGANConfig, DCGAN),
}
