"""A PatchGAN discriminator (pix2pix, Isola et al. 2017) for the autoencoder's adversarial term.

It scores overlapping patches, not whole images, so it judges local texture (the sharpness an L1 loss
alone blurs away) and works at any resolution its strided convolutions leave at least one patch of.
Its inner layers are batch-normalised by default, as in pix2pix and taming-transformers' VQGAN. Spectral norm
(Miyato et al. 2018) on every convolution instead (`norm="spectral"`) shrinks the signal at each layer:
at 64 px the logits of a fresh one spread by about 0.003, the adaptive weight (the ratio of reconstruction
and adversarial gradients) then reaches the hundreds, and the autoencoder, which the adversarial term then
drives alone, kept the discriminator at chance for 600 steps (experiments/runs/autoencoder-64, 2026-12-05).
With `num_classes` it is class-conditional by projection (Miyato & Koyama 2018), patch by patch: each patch's
logit gains the inner product of a learnt class embedding with the patch's last features, so it judges a cell's
texture against real cells of the cell's class. The autoencoder it trains stays unconditional; the labels steer
only what its decoder is pushed towards. (At 64 px that made the decoder worse: training/autoencoder.py.)
Used only while training: it is saved in checkpoints, never in the final model folder.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import spectral_norm

PATCH_NORMS = ("batch", "spectral", "none")


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
        norm: str = "batch",
        num_classes: int = 0,
    ):
        super().__init__()
        if norm not in PATCH_NORMS:
            raise ValueError(f"norm must be one of {', '.join(PATCH_NORMS)}, got {norm!r}")
        sn = spectral_norm if norm == "spectral" else (lambda m: m)
        widths = [base_channels * min(2**i, 8) for i in range(num_layers + 1)]

        def inner(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            if norm == "batch":  # the norm's shift makes a bias redundant
                return [nn.Conv2d(c_in, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            return [sn(nn.Conv2d(c_in, c_out, 4, stride, 1)), nn.LeakyReLU(0.2)]

        layers: list[nn.Module] = [sn(nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        for i in range(1, num_layers):
            layers += inner(widths[i - 1], widths[i], 2)
        layers += inner(widths[num_layers - 1], widths[num_layers], 1)
        layers += [sn(nn.Conv2d(widths[num_layers], 1, 4, padding=1))]
        self.layers = nn.Sequential(*layers)
        self.class_embedding = nn.Embedding(num_classes, widths[num_layers]) if num_classes > 0 else None
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding.weight, std=0.02)

    def forward(self, images: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if (class_labels is None) != (self.class_embedding is None):
            raise ValueError(
                f"this discriminator is {'un' if self.class_embedding is None else ''}conditional: "
                f"class_labels must be {'None' if self.class_embedding is None else 'given'}"
            )
        features = self.layers[:-1](images)
        logits = self.layers[-1](features)
        if self.class_embedding is None:
            return logits
        # the last 4x4 conv (padding 1) maps each 2x2 window of features to one logit: project each window's mean
        window = F.avg_pool2d(features, kernel_size=2, stride=1)
        return logits + (window * self.class_embedding(class_labels)[:, :, None, None]).sum(1, keepdim=True)
