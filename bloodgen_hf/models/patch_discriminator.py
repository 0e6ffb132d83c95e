"""A PatchGAN discriminator (pix2pix, Isola et al. 2017) for the autoencoder's adversarial term.

It scores overlapping patches, not whole images, so it judges local texture (the sharpness an L1 loss
alone blurs away) and works at any resolution its strided convolutions leave at least one patch of.
Spectral norm on every convolution (Miyato et al. 2018) instead of batch norm keeps it Lipschitz and
its output independent of the rest of the batch. Used only while training (training/autoencoder.py):
it is saved in checkpoints, never in the final AutoencoderKL folder.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn.utils import spectral_norm


def patch_side(resolution: int, num_layers: int) -> int:
    """The side of the patch-score map for a `resolution`-pixel image: `num_layers` 4x4 stride-2 convolutions
    (padding 1) halve it, two 4x4 stride-1 ones (padding 1) each take one off."""
    side = resolution
    for _ in range(num_layers):
        side = (side + 2 - 4) // 2 + 1
    return side - 2


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """Images in [-1, 1] -> [N, 1, h, w] real/fake logits, one per patch (70x70 receptive field at 3 layers)."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        use_spectral_norm: bool = True,
    ):
        super().__init__()
        sn = spectral_norm if use_spectral_norm else (lambda m: m)
        widths = [base_channels * min(2**i, 8) for i in range(num_layers + 1)]
        layers: list[nn.Module] = [sn(nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        for i in range(1, num_layers):
            layers += [sn(nn.Conv2d(widths[i - 1], widths[i], 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        layers += [sn(nn.Conv2d(widths[num_layers - 1], widths[num_layers], 4, padding=1)), nn.LeakyReLU(0.2)]
        layers += [sn(nn.Conv2d(widths[num_layers], 1, 4, padding=1))]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)
