"""A class-conditional VAE in the style of diffusers' AutoencoderKL.

It reuses diffusers' `Encoder`, `Decoder` and `DiagonalGaussianDistribution` unchanged and adds the
class label to both halves, which makes it a conditional VAE (CVAE): q(z | x, y) and p(x | z, y).

This file imports only torch and diffusers on purpose (and bloodgen_hf's UsageError where it is
installed): it is copied next to the weights when a pipeline is saved, so that
`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` can rebuild the model without
bloodgen_hf installed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, DecoderOutput, DiagonalGaussianDistribution, Encoder
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

try:  # bloodgen_hf's own class where it is installed, so its commands report these as bad input, not as bugs
    from bloodgen_hf.errors import UsageError
except ImportError:  # remote code without bloodgen_hf

    class UsageError(ValueError):
        """The model refuses its settings; the message says why."""


@dataclass
class ConditionalAutoencoderKLOutput(BaseOutput):
    """`sample`: the decoded images; `latent_dist`: the posterior q(z | x, y) they were decoded from."""

    sample: torch.Tensor
    latent_dist: DiagonalGaussianDistribution


def latent_size(resolution: int, num_blocks: int) -> int:
    """Side of the encoder's output map: every block but the last halves the image (28 -> 14 -> 7)."""
    factor = 2 ** (num_blocks - 1)
    if resolution < factor or resolution % factor:
        raise UsageError(f"resolution {resolution} must be a multiple of {factor} for {num_blocks} encoder blocks")
    return resolution // factor


class ConditionalAutoencoderKL(ModelMixin, ConfigMixin):
    """Image + class label -> diagonal Gaussian posterior over z; z + class label -> image.

    The class embedding is broadcast to a map and concatenated to the image before the encoder and
    to the latent map before the decoder. The latent is a vector of `latent_dim` numbers (reached
    through a linear layer from the encoder's map; the better choice for sampling from the prior)
    or, with `latent_dim=None`, AutoencoderKL's spatial latent of `latent_channels` x h x w.
    `decoder_sigma` is the standard deviation of the Gaussian likelihood p(x | z, y) in [-1, 1]
    pixel units, written by training; it turns reconstruction errors into nats (see `negative_elbo`).
    """

    @register_to_config
    def __init__(
        self,
        resolution: int = 28,
        in_channels: int = 3,
        num_classes: int = 8,
        class_embed_dim: int = 16,
        block_out_channels: tuple[int, ...] = (16, 32, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        latent_channels: int = 4,
        latent_dim: int | None = 64,
        mid_block_add_attention: bool = False,
        decoder_sigma: float = 0.1,
        class_names: tuple[str, ...] | list[str] | None = None,
    ):
        super().__init__()
        blocks = len(block_out_channels)
        side = latent_size(resolution, blocks)
        if any(c % norm_num_groups for c in block_out_channels):
            raise UsageError(f"block_out_channels {tuple(block_out_channels)} must be multiples of {norm_num_groups}")
        if class_names is not None and len(class_names) != num_classes:
            raise UsageError(f"got {len(class_names)} class names for {num_classes} classes")
        self.class_embedding = nn.Embedding(num_classes, class_embed_dim)
        self.encoder = Encoder(
            in_channels=in_channels + class_embed_dim,
            out_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            double_z=True,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.decoder = Decoder(
            in_channels=latent_channels + class_embed_dim,
            out_channels=in_channels,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=mid_block_add_attention,
        )
        map_size = latent_channels * side * side
        if latent_dim is None:  # AutoencoderKL's 1x1 convolutions on the moments and on z
            self.quant = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
            self.post_quant = nn.Conv2d(latent_channels, latent_channels, 1)
        else:
            self.quant = nn.Linear(2 * map_size, 2 * latent_dim)
            self.post_quant = nn.Linear(latent_dim, map_size)
        self._side = side

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' loader, then every weight moved out of the file's buffer into memory of its own.

        Tensors adopted from a safetensors buffer can be misaligned, and CPU matmul kernels round
        differently on misaligned memory: without this a loaded model would not reproduce the saved
        one's images bit for bit.
        """
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                tensor.data = tensor.data.clone()
        return loaded

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one z (without the batch): (latent_dim, 1, 1) or (latent_channels, h, w)."""
        if self.config.latent_dim is None:
            return (self.config.latent_channels, self._side, self._side)
        return (self.config.latent_dim, 1, 1)

    def class_map(
        self, size: int, class_labels: torch.Tensor | None = None, class_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, class_embed_dim, size, size]: the labels' embeddings (or given embeddings) spread over a map."""
        if (class_labels is None) == (class_embeds is None):
            raise ValueError("pass exactly one of class_labels and class_embeds")
        embeds = self.class_embedding(class_labels) if class_embeds is None else class_embeds
        return embeds[:, :, None, None].expand(-1, -1, size, size)

    def encode(self, sample: torch.Tensor, class_labels: torch.Tensor, return_dict: bool = True):
        """Images in [-1, 1] and their labels -> q(z | x, y) as a DiagonalGaussianDistribution."""
        h = self.encoder(torch.cat([sample, self.class_map(sample.shape[-1], class_labels)], dim=1))
        if self.config.latent_dim is None:
            moments = self.quant(h)
        else:
            moments = self.quant(h.flatten(1))[:, :, None, None]
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(
        self,
        z: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        class_embeds: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """z (shaped [B, *latent_shape]) and labels, or class embeddings, -> the mean image in [-1, 1]."""
        if self.config.latent_dim is None:
            h = self.post_quant(z)
        else:
            h = self.post_quant(z.flatten(1)).view(z.shape[0], self.config.latent_channels, self._side, self._side)
        h = torch.cat([h, self.class_map(self._side, class_labels, class_embeds).to(h.dtype)], dim=1)
        dec = self.decoder(h)
        return DecoderOutput(sample=dec) if return_dict else (dec,)

    def forward(
        self,
        sample: torch.Tensor,
        class_labels: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """Encode, take z (a posterior sample, or its mean), decode: one call, as DDP training needs."""
        posterior = self.encode(sample, class_labels).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        dec = self.decode(z, class_labels).sample
        return ConditionalAutoencoderKLOutput(sample=dec, latent_dist=posterior) if return_dict else (dec, posterior)

    @torch.no_grad()
    def negative_elbo(self, sample: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """-ELBO in nats per image, with z at the posterior mean (a deterministic, one-point estimate)."""
        out = self(sample, class_labels)
        return gaussian_nll(sample, out.sample, self.config.decoder_sigma) + out.latent_dist.kl()


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """-log N(target; mean, sigma^2) summed over pixels: nats per image (a continuous density)."""
    sigma = torch.as_tensor(sigma, dtype=mean.dtype, device=mean.device)
    squared = (target - mean).pow(2).flatten(1).sum(dim=1)
    pixels = target[0].numel()
    return squared / (2 * sigma**2) + pixels * (torch.log(sigma) + 0.5 * math.log(2 * math.pi))


def kl_per_dimension(posterior: DiagonalGaussianDistribution) -> torch.Tensor:
    """KL(q(z_i | x) || N(0, 1)) for every latent number: [B, *latent_shape]; sums to posterior.kl()."""
    return 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar)
