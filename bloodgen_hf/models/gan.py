"""Conditional DCGAN: a class-conditional generator and a projection discriminator.

This file imports only torch and diffusers on purpose (and bloodgen_hf's UsageError where it is
installed): it is copied next to the weights when a pipeline is saved, so that
`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` can rebuild the models without
bloodgen_hf installed.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn.utils import spectral_norm

try:  # bloodgen_hf's own class where it is installed, so its commands report these as bad input, not as bugs
    from bloodgen_hf.errors import UsageError
except ImportError:  # remote code without bloodgen_hf

    class UsageError(ValueError):
        """The model refuses its settings; the message says why."""


def _num_doublings(resolution: int) -> tuple[int, int]:
    """28 -> (7, 2 doublings), 64 -> (4, 4): halve while even and above 4."""
    base, steps = resolution, 0
    while base % 2 == 0 and base > 4:
        base, steps = base // 2, steps + 1
    if steps == 0:
        raise UsageError(f"resolution {resolution} must be a multiple of 2 above 4")
    return base, steps


class ConditionalGenerator(ModelMixin, ConfigMixin):
    """z ~ N(0, I) and a class label -> image in [-1, 1].

    The class enters twice: its embedding is concatenated to z, and every upsampling block uses
    class-conditional batch norm (per-class gain and bias), which keeps cell types apart.
    """

    @register_to_config
    def __init__(
        self,
        resolution: int = 28,
        latent_dim: int = 128,
        num_classes: int = 8,
        embed_dim: int = 64,
        base_channels: int = 64,
        out_channels: int = 3,
        class_names: tuple[str, ...] | list[str] | None = None,
    ):
        super().__init__()
        base, steps = _num_doublings(resolution)
        widths = [base_channels * 2 ** (steps - i) for i in range(steps + 1)]  # e.g. 256,128,64
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.project = nn.Linear(latent_dim + embed_dim, widths[0] * base * base)
        self.norm0 = _ClassBatchNorm(widths[0], num_classes)
        self.blocks = nn.ModuleList(_UpBlock(widths[i], widths[i + 1], num_classes) for i in range(steps))
        self.to_rgb = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        self._base = base

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(class_labels)], dim=1))
        h = h.view(z.shape[0], -1, self._base, self._base)
        h = torch.relu(self.norm0(h, class_labels))
        for block in self.blocks:
            h = block(h, class_labels)
        return torch.tanh(self.to_rgb(h))


class ConditionalDiscriminator(ModelMixin, ConfigMixin):
    """Image and class label -> realness score, with a projection term <embed(y), features>.

    With `minibatch_std_group` g > 0, the last feature map also gets the feature spread of each group
    of g consecutive images (ProGAN's minibatch standard deviation): a generator that collapses to
    one image per class then looks different from real batches. Groups are consecutive, so a batch
    of real images followed by as many fakes never mixes the two when g divides their count.
    """

    @register_to_config
    def __init__(
        self,
        resolution: int = 28,
        num_classes: int = 8,
        base_channels: int = 64,
        in_channels: int = 3,
        use_spectral_norm: bool = True,
        minibatch_std_group: int = 0,
    ):
        super().__init__()
        sn = spectral_norm if use_spectral_norm else (lambda m: m)
        _, steps = _num_doublings(resolution)
        widths = [base_channels * 2**i for i in range(steps + 1)]  # e.g. 64,128,256
        layers: list[nn.Module] = [sn(nn.Conv2d(in_channels, widths[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        for i in range(steps):
            layers += [sn(nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        if minibatch_std_group > 0:
            layers += [_MinibatchStd(minibatch_std_group), sn(nn.Conv2d(widths[-1] + 1, widths[-1], 3, padding=1))]
            layers += [nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.linear = sn(nn.Linear(widths[-1], 1))
        self.embed = sn(nn.Embedding(num_classes, widths[-1]))

    def forward(self, images: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        h = self.features(images).sum(dim=(2, 3))  # global sum pooling
        return self.linear(h).squeeze(1) + (self.embed(class_labels) * h).sum(dim=1)


class _MinibatchStd(nn.Module):
    """Appends one channel: the mean standard deviation of the features over each group of images."""

    def __init__(self, group: int):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group, n)
        if n % g:
            raise ValueError(f"minibatch-std groups of {g} images need a batch divisible by {g}, got {n}")
        spread = x.view(n // g, g, c, h, w).var(dim=1, unbiased=False).add(1e-8).sqrt().mean(dim=(1, 2, 3))
        return torch.cat([x, spread.repeat_interleave(g)[:, None, None, None].expand(n, 1, h, w)], dim=1)


class _ClassBatchNorm(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class _UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_classes: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
        self.norm = _ClassBatchNorm(c_out, num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.up(x), y))
