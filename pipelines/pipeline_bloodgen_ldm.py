"""BloodLDMPipeline: class-conditional blood-cell images by latent diffusion, a UNet2DModel denoising the latents of
a stock diffusers AutoencoderKL, with classifier-free guidance."""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL, UNet2DModel

# Both modules are imported here by name: diffusers copies a local folder's remote code by the relative imports
# of the pipeline's own file only, so the DDPM module's helper must be named here too.
from .blood_pipeline_utils import UsageError
from .pipeline_bloodgen_ddpm import BloodDDPMPipeline


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """How many pixels one latent covers along each side: 2 per downsampling level of the autoencoder."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_latent_shape(vae: AutoencoderKL, unet: UNet2DModel) -> None:
    """The UNet must denoise the autoencoder's latents: as many channels in and out as the latents have, and a
    positive finite latent scale (`scaling_factor`, 1/std of the training latents) to undo before decoding."""
    channels = vae.config.latent_channels
    if unet.config.in_channels != channels or unet.config.out_channels != channels:
        raise UsageError(
            f"BloodLDMPipeline needs a UNet with {channels} channels in and out, the autoencoder's latent channels; "
            f"got in_channels={unet.config.in_channels}, out_channels={unet.config.out_channels}"
        )
    scale = vae.config.scaling_factor
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise UsageError(f"the autoencoder's scaling_factor must be a positive number, got {scale!r}")


class BloodLDMPipeline(BloodDDPMPipeline):
    """BloodDDPMPipeline in the latent space of `vae`: the same call (`class_labels`, `num_images`, per-image
    generators, `guidance_scale`, `num_inference_steps`, `output_type` pil/np/pt), the same schedulers
    (`with_scheduler`) and class names; the UNet denoises latents of shape (latent channels, sample_size,
    sample_size), which are decoded at the end as `vae.decode(latents / scaling_factor + shift_factor)`.

    The UNet was trained on latents scaled to unit variance: `vae.config.scaling_factor` is 1/std of the training
    latents (and `shift_factor`, if set, their mean), as in diffusers' Stable Diffusion pipelines. Images come out at
    sample_size x `vae_scale_factor` pixels. The same seed gives the same image in any batch: the starting noise
    comes from each image's generator, and the decoder treats every image on its own.
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DModel,
        scheduler,
        class_names: list[str] | None = None,
        default_guidance_scale: float = 1.0,
        default_num_inference_steps: int = 10,
        provenance: dict | None = None,
        default_guidance_interval: list[float] | None = None,
    ):
        check_latent_shape(vae, unet)
        super().__init__(
            unet=unet,
            scheduler=scheduler,
            class_names=class_names,
            default_guidance_scale=default_guidance_scale,
            default_num_inference_steps=default_num_inference_steps,
            provenance=provenance,
            default_guidance_interval=default_guidance_interval,
        )
        self.register_modules(vae=vae)

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent covers along each side (see the module's vae_scale_factor)."""
        return vae_scale_factor(self.vae)

    @property
    def resolution(self) -> int:
        """The side in pixels of the decoded images, known without sampling: the latent side times the
        autoencoder's scale factor."""
        return super().resolution * self.vae_scale_factor

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Denoised latents (scaled to unit variance) -> [-1, 1] images, through the autoencoder's decoder."""
        config = self.vae.config
        latents = samples / config.scaling_factor + (config.shift_factor or 0.0)
        self.vae.eval()
        return self.vae.decode(latents.to(next(self.vae.parameters()).dtype)).sample
