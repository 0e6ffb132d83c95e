"""A class-conditional VAE in the style of diffusers' AutoencoderKL.

It reuses diffusers' `DiagonalGaussianDistribution` and adds the class label to both halves, which makes it a
conditional VAE (CVAE): q(z | x, y) and p(x | z, y). Two backbones (`backbone` in the config):

- "autoencoder_kl" (v1, the default): diffusers' `Encoder`/`Decoder` unchanged, the class embedding
  concatenated to their inputs as a map. They are ResNets already, but their blocks take no conditioning
  vector, so the class is seen once, at the first convolution of each half.
- "resnet" (v2): the same ResNet layout (conv, ResnetBlock2D levels halving the image, a mid block, GroupNorm/
  SiLU/conv out) assembled from diffusers' DownBlock2D / UNetMidBlock2D / UpDecoderBlock2D, whose residual
  blocks take an embedding: the class embedding scales and shifts every block's normalised features (FiLM,
  `time_embedding_norm="scale_shift"`), so every layer of both halves knows the class. Built from the blocks
  rather than by giving Encoder/Decoder more layers, which could not pass the class to their blocks.

The prior p(z | y) is N(0, I) (`prior_components=0`, v1), or, once fitted after training (training/vae.py), a
Gaussian mixture per class with `prior_components` full-covariance components fitted to the posterior means of
the training images (the ex-post density estimate of Ghosh et al. 2020): it matches the aggregate posterior, so
samples look like reconstructions instead of the blur an N(0, I) draw decodes to. It lives in buffers, so it is
saved in the safetensors file and loads with the model.

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
from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.utils import BaseOutput
from torch import nn

# Kept: this file ships alone in a saved pipeline's vae/ folder, where diffusers' remote-code loader resolves
# neither bloodgen_hf nor a relative import of the root's blood_pipeline_utils.py, so it needs its own class.
try:  # bloodgen_hf's own class where it is installed, so its commands report these as bad input, not as bugs
    from bloodgen_hf.errors import UsageError
except ImportError:  # remote code without bloodgen_hf

    class UsageError(ValueError):
        """The model refuses its settings; the message says why."""


BACKBONES = ("autoencoder_kl", "resnet")
PRIOR_BUFFERS = ("prior_weights", "prior_means", "prior_scale_tril")


@dataclass
class ConditionalAutoencoderKLOutput(BaseOutput):
    """`sample`: the decoded images; `latent_dist`: the posterior q(z | x, y) they were decoded from.

    `latent_dist` has a default, as in diffusers' outputs of several fields, because BaseOutput can then be rebuilt
    from a dict: Accelerate's mixed-precision wrapper rebuilds every output that way, to cast it back to fp32.
    """

    sample: torch.Tensor
    latent_dist: DiagonalGaussianDistribution | None = None


def latent_size(resolution: int, num_blocks: int) -> int:
    """Side of the encoder's output map: every block but the last halves the image (28 -> 14 -> 7)."""
    factor = 2 ** (num_blocks - 1)
    if resolution < factor or resolution % factor:
        raise UsageError(f"resolution {resolution} must be a multiple of {factor} for {num_blocks} encoder blocks")
    return resolution // factor


def film_options(cond_channels: int, norm_num_groups: int) -> dict:
    """diffusers block options that make every residual block scale and shift its features by `cond` (FiLM)."""
    return {
        "temb_channels": cond_channels,
        "resnet_groups": norm_num_groups,
        "resnet_eps": 1e-6,
        "resnet_time_scale_shift": "scale_shift",
    }


class ResNetEncoder(nn.Module):
    """Image -> 2 x `out_channels` moments map: conv, one DownBlock2D per level (all but the last halve the
    image), a mid block, GroupNorm/SiLU/conv; every residual block is FiLM-conditioned on `cond`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        cond_channels: int,
        add_attention: bool,
    ):
        super().__init__()
        film = film_options(cond_channels, norm_num_groups)
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        widths = (block_out_channels[0], *block_out_channels)
        last = len(block_out_channels) - 1
        self.down_blocks = nn.ModuleList(
            DownBlock2D(widths[i], widths[i + 1], num_layers=layers_per_block, add_downsample=i < last, **film)
            for i in range(len(block_out_channels))
        )
        self.mid_block = mid_block(block_out_channels[-1], add_attention, film)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(block_out_channels[-1], 2 * out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h, cond)
        h = self.mid_block(h, cond)
        return self.conv_out(nn.functional.silu(self.conv_norm_out(h)))


class ResNetDecoder(nn.Module):
    """Latent map -> image: conv, a mid block, one UpDecoderBlock2D of `layers_per_block + 1` residual blocks per
    level (all but the last double the image), GroupNorm/SiLU/conv; every residual block FiLM-conditioned."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        cond_channels: int,
        add_attention: bool,
    ):
        super().__init__()
        film = film_options(cond_channels, norm_num_groups)
        widths = tuple(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.mid_block = mid_block(widths[0], add_attention, film)
        last = len(widths) - 1
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                widths[max(i - 1, 0)], widths[i], num_layers=layers_per_block + 1, add_upsample=i < last, **film
            )
            for i in range(len(widths))
        )
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z), cond)
        for block in self.up_blocks:
            h = block(h, cond)
        return self.conv_out(nn.functional.silu(self.conv_norm_out(h)))


def mid_block(channels: int, add_attention: bool, film: dict) -> UNetMidBlock2D:
    """Two FiLM-conditioned residual blocks at the smallest size, with self-attention between them if asked."""
    groups = film["resnet_groups"]
    return UNetMidBlock2D(
        channels, attention_head_dim=channels, attn_groups=groups, add_attention=add_attention, **film
    )


class ConditionalAutoencoderKL(ModelMixin, ConfigMixin):
    """Image + class label -> diagonal Gaussian posterior over z; z + class label -> image.

    `backbone` picks the encoder/decoder (see the module docstring). The latent is a vector of `latent_dim`
    numbers (reached through a linear layer from the encoder's map; the better choice for sampling from the
    prior) or, with `latent_dim=None`, AutoencoderKL's spatial latent of `latent_channels` x h x w.
    `decoder_sigma` is the standard deviation of the Gaussian likelihood p(x | z, y) in [-1, 1]
    pixel units, written by training; it turns reconstruction errors into nats (see `negative_elbo`).
    `prior_components` > 0 holds a class-conditional Gaussian mixture prior in buffers (`set_prior`); 0 is
    N(0, I). Every default is the first (v1) model's, so its saved config loads as it was.
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
        backbone: str = "autoencoder_kl",
        prior_components: int = 0,
    ):
        super().__init__()
        blocks = len(block_out_channels)
        side = latent_size(resolution, blocks)
        if any(c % norm_num_groups for c in block_out_channels):
            raise UsageError(f"block_out_channels {tuple(block_out_channels)} must be multiples of {norm_num_groups}")
        if class_names is not None and len(class_names) != num_classes:
            raise UsageError(f"got {len(class_names)} class names for {num_classes} classes")
        if backbone not in BACKBONES:
            raise UsageError(f"unknown backbone {backbone!r}; choose from: {', '.join(BACKBONES)}")
        if isinstance(prior_components, bool) or not isinstance(prior_components, int) or prior_components < 0:
            raise UsageError(f"prior_components must be an integer >= 0, got {prior_components!r}")
        self.class_embedding = nn.Embedding(num_classes, class_embed_dim)
        if backbone == "autoencoder_kl":
            self.encoder, self.decoder = autoencoder_kl_halves(
                in_channels,
                class_embed_dim,
                tuple(block_out_channels),
                layers_per_block,
                norm_num_groups,
                latent_channels,
                mid_block_add_attention,
            )
        else:
            shape = (tuple(block_out_channels), layers_per_block, norm_num_groups, class_embed_dim)
            self.encoder = ResNetEncoder(in_channels, latent_channels, *shape, mid_block_add_attention)
            self.decoder = ResNetDecoder(latent_channels, in_channels, *shape, mid_block_add_attention)
        map_size = latent_channels * side * side
        if latent_dim is None:  # AutoencoderKL's 1x1 convolutions on the moments and on z
            self.quant = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
            self.post_quant = nn.Conv2d(latent_channels, latent_channels, 1)
        else:
            self.quant = nn.Linear(2 * map_size, 2 * latent_dim)
            self.post_quant = nn.Linear(latent_dim, map_size)
        self._side = side
        if prior_components:  # N(0, I) in every component until `set_prior` writes the fitted mixture
            dims = latent_dim or map_size
            eye = torch.eye(dims).expand(num_classes, prior_components, dims, dims)
            self.register_buffer("prior_weights", torch.full((num_classes, prior_components), 1 / prior_components))
            self.register_buffer("prior_means", torch.zeros(num_classes, prior_components, dims))
            self.register_buffer("prior_scale_tril", eye.clone())

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
        return self.class_vector(class_labels, class_embeds)[:, :, None, None].expand(-1, -1, size, size)

    def class_vector(
        self, class_labels: torch.Tensor | None = None, class_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, class_embed_dim]: the labels' embeddings, or the given ones (interpolations pass mixtures)."""
        if (class_labels is None) == (class_embeds is None):
            raise ValueError("pass exactly one of class_labels and class_embeds")
        return self.class_embedding(class_labels) if class_embeds is None else class_embeds

    def encode(self, sample: torch.Tensor, class_labels: torch.Tensor, return_dict: bool = True):
        """Images in [-1, 1] and their labels -> q(z | x, y) as a DiagonalGaussianDistribution."""
        if self.config.backbone == "autoencoder_kl":
            h = self.encoder(torch.cat([sample, self.class_map(sample.shape[-1], class_labels)], dim=1))
        else:
            h = self.encoder(sample, self.class_embedding(class_labels))
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
        if self.config.backbone == "autoencoder_kl":
            dec = self.decoder(torch.cat([h, self.class_map(self._side, class_labels, class_embeds).to(h.dtype)], 1))
        else:
            dec = self.decoder(h, self.class_vector(class_labels, class_embeds).to(h.dtype))
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

    def set_prior(self, weights: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor) -> None:
        """Hold a fitted class-conditional Gaussian mixture as the prior p(z | y): `weights` [classes, K] (each
        row sums to 1), `means` [classes, K, D] and lower-triangular covariance factors `scale_tril`
        [classes, K, D, D], D the numbers in one z. Sets `prior_components` to K in the config."""
        classes, dims = self.config.num_classes, math.prod(self.latent_shape)
        k = weights.shape[-1] if weights.ndim == 2 else -1
        shapes = (tuple(weights.shape), tuple(means.shape), tuple(scale_tril.shape))
        if shapes != ((classes, k), (classes, k, dims), (classes, k, dims, dims)):
            raise UsageError(
                f"a prior for {classes} classes and {dims} latent numbers needs weights [C, K], means [C, K, D] and "
                f"scale_tril [C, K, D, D]; got {', '.join(map(str, shapes))}"
            )
        param = next(self.parameters())
        for name, tensor in zip(PRIOR_BUFFERS, (weights, means, scale_tril)):
            self.register_buffer(name, tensor.detach().to(device=param.device, dtype=param.dtype).contiguous())
        self.register_to_config(prior_components=int(k))

    def prior_sample(
        self, class_labels: torch.Tensor, noise: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        """z from the class's mixture: the component whose cumulative weight `uniforms` (one in [0, 1) per image)
        falls in, its mean plus `temperature` x its covariance factor times `noise` (standard normal,
        [B, *latent_shape]). Temperature 0 gives the component's mean."""
        if not self.config.prior_components:
            raise UsageError("this VAE's prior is N(0, I): it holds no mixture to sample (prior_components is 0)")
        cdf = self.prior_weights[class_labels].cumsum(dim=1)
        picks = torch.searchsorted(cdf, (uniforms.to(cdf.dtype) * cdf[:, -1])[:, None]).squeeze(1)
        picks = picks.clamp(max=self.config.prior_components - 1)
        mean = self.prior_means[class_labels, picks]
        spread = (self.prior_scale_tril[class_labels, picks] @ noise.flatten(1).to(mean.dtype)[:, :, None]).squeeze(2)
        return (mean + temperature * spread).view(noise.shape)

    @torch.no_grad()
    def negative_elbo(self, sample: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """-ELBO in nats per image, with z at the posterior mean (a deterministic, one-point estimate)."""
        out = self(sample, class_labels)
        return gaussian_nll(sample, out.sample, self.config.decoder_sigma) + out.latent_dist.kl()


def autoencoder_kl_halves(
    in_channels: int,
    class_embed_dim: int,
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    norm_num_groups: int,
    latent_channels: int,
    add_attention: bool,
) -> tuple[Encoder, Decoder]:
    """diffusers' Encoder and Decoder, each taking the class map as extra input channels (the v1 backbone)."""
    blocks = len(block_out_channels)
    encoder = Encoder(
        in_channels=in_channels + class_embed_dim,
        out_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        double_z=True,
        mid_block_add_attention=add_attention,
    )
    decoder = Decoder(
        in_channels=latent_channels + class_embed_dim,
        out_channels=in_channels,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        mid_block_add_attention=add_attention,
    )
    return encoder, decoder


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """-log N(target; mean, sigma^2) summed over pixels: nats per image (a continuous density)."""
    sigma = torch.as_tensor(sigma, dtype=mean.dtype, device=mean.device)
    squared = (target - mean).pow(2).flatten(1).sum(dim=1)
    pixels = target[0].numel()
    return squared / (2 * sigma**2) + pixels * (torch.log(sigma) + 0.5 * math.log(2 * math.pi))


def kl_per_dimension(posterior: DiagonalGaussianDistribution) -> torch.Tensor:
    """KL(q(z_i | x) || N(0, 1)) for every latent number: [B, *latent_shape]; sums to posterior.kl()."""
    return 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar)
