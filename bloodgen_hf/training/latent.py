"""The class-conditional latent flow model as a TrainTask: the DDPM v2 recipe on the latents of a frozen AutoencoderKL.

Everything but the data is DDPMTask's (bloodgen_hf/training/ddpm.py): flow matching (`--prediction-type flow`, the
default here), classifier-free-guidance dropout, EMA, AdamW with warmup + cosine, the presets and `--channels`, and
class-balanced batches (`--balanced-batches`, on by default here). What differs:

- The data are latents. `--autoencoder` names the folder of a saved diffusers AutoencoderKL (stock class, from
  `save_pretrained`), loaded frozen. Each training image is encoded once, up front, and the latents are held in
  memory: z = (posterior mode - shift_factor) * scaling_factor, with the scale and shift (None: 0) read from the
  autoencoder's config, where its trainer recorded scaling_factor = 1/std of the training latents. The posterior's
  mode (its mean) is deterministic, so the latents depend on no seed and a resumed run re-encodes the same ones; at
  the KL weights of latent-diffusion autoencoders (~1e-6) the posterior's spread is small beside the mean.
- Flips: with `--flip` (the default) every image is encoded in its four flips (none, horizontal, vertical, both;
  4x the encoding, exact, where flipping the latents would only approximate the encoder), and each batch picks one
  per image at random, as LabelledImages does for pixels.
- The UNet is built for the latent shape: `in_channels` = the latent channels, `sample_size` = --resolution / the
  autoencoder's downsampling factor (2 per level after the first). 64 px images through a 4x autoencoder give
  16x16 latents, which take build_unet's three-level layout (16 -> 8 -> 4); `small` is then 1.19M parameters at
  4 latent channels (1.20M at 8), `tiny` 0.30M. Resolutions the autoencoder or the UNet cannot take are refused in
  one line before any image is encoded.
- It saves a BloodLDMPipeline (autoencoder + EMA UNet + the chosen sampler), whose provenance names the
  autoencoder under `autoencoder`: the folder, its content hash, its own training record (its folder's
  provenance.json, else the train_config.json of the run that saved it beside it; none found = not recorded,
  which the leak checks refuse), its scaling and the latent shape.

Encoding costs one autoencoder pass per image and flip (each process encodes the whole split; the latents of the
11,959 train images at 16x16x4 with flips take 196 MB).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator, PartialState
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from bloodgen_hf.data import CLASS_NAMES
from bloodgen_hf.errors import UsageError
from bloodgen_hf.pipelines import BloodLDMPipeline
from bloodgen_hf.pipelines.blood_pipeline_utils import PROVENANCE_NAME, read_provenance_file
from bloodgen_hf.pipelines.pipeline_bloodgen_ldm import vae_scale_factor
from bloodgen_hf.provenance import content_sha256
from bloodgen_hf.registry import ModelLoadError, load_component
from bloodgen_hf.training.autoencoder import posterior_means
from bloodgen_hf.training.core import TrainConfig, run_training
from bloodgen_hf.training.ddpm import (
    PREDICTION_TYPES,
    DDPMOptions,
    DDPMTask,
    check_options,
    unet_layout,
)
from bloodgen_hf.training.options import option, options_of, parse_channels
from bloodgen_hf.training.sources import load_training_data

ENCODE_BATCH = 64  # images per autoencoder pass while encoding (fixed: the latents must not depend on a setting)
FLIPS = ((), (-1,), (-2,), (-1, -2))  # index h + 2 v: none, horizontal, vertical, both (LabelledImages' two draws)


@dataclass
class LatentOptions(DDPMOptions):
    """The DDPM's flags, with flow matching by default, and the autoencoder whose latents the UNet learns."""

    prediction_type: str = option("flow", choices=PREDICTION_TYPES)
    autoencoder: str | None = option(
        None,
        "folder of a saved diffusers AutoencoderKL (config.json + safetensors), frozen; its config's scaling_factor "
        "(1/std of the training latents) scales the latents (required)",
    )


class LatentImages:
    """Scaled latents of labelled images, held in memory; `batch(indices)` as LabelledImages gives images.

    `latents` is [F, N, C, h, w]: F = 4 encoded flips (FLIPS) when `flip`, else 1."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, flip: bool, class_names=CLASS_NAMES):
        if flip and len(latents) != len(FLIPS):
            raise ValueError(f"flipped batches need the latents of all {len(FLIPS)} flips, got {len(latents)}")
        self.latents, self.labels = latents, labels
        self.flip = flip
        self.class_names = tuple(class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents of one of each image's flips, drawn from the global RNG (restored on resume)."""
        flips = torch.zeros(len(indices), dtype=torch.long)
        if self.flip:
            horizontal, vertical = torch.rand(len(indices)) < 0.5, torch.rand(len(indices)) < 0.5
            flips = horizontal.long() + 2 * vertical.long()
        return self.latents[flips, indices], self.labels[indices]


def load_autoencoder(path: str | None) -> AutoencoderKL:
    """The frozen AutoencoderKL saved in folder `path` (safetensors only); one clear line for anything else."""
    if not path:
        raise UsageError(
            "--autoencoder is required: the folder of a saved diffusers AutoencoderKL (config.json and "
            "diffusion_pytorch_model.safetensors, as its save_pretrained writes them)"
        )
    folder = Path(path).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{config_file} is missing: --autoencoder {path} is not a saved AutoencoderKL folder")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ModelLoadError(f"cannot read {config_file}: {err}") from None
    if class_name != AutoencoderKL.__name__:
        raise ModelLoadError(f"{config_file} is the config of a {class_name}, not of an AutoencoderKL")
    vae = load_component(AutoencoderKL, folder)
    if vae.config.in_channels != 3:
        raise UsageError(f"--autoencoder {path} takes {vae.config.in_channels}-channel images, not RGB")
    return vae.requires_grad_(False).eval()


def latent_shape(vae: AutoencoderKL, resolution: int) -> tuple[int, int, int]:
    """(channels, size, size) of the latents of `resolution` px images; a size the encoder cannot halve whole is
    refused (its latents would not decode back to `resolution` px)."""
    factor = vae_scale_factor(vae)
    if resolution % factor:
        raise UsageError(
            f"--resolution {resolution} is not a multiple of {factor}, the autoencoder's downsampling factor: "
            f"its latents would not decode back to {resolution} px"
        )
    return vae.config.latent_channels, resolution // factor, resolution // factor


def check_latent_unet(o: LatentOptions, shape: tuple[int, int, int], resolution: int) -> None:
    """Refuse, before any encoding, a UNet that cannot take these latents, in one line naming both."""
    channels, size, _ = shape
    try:
        unet_layout(o.preset, size, parse_channels(o.channels), o.layers_per_block, o.attention_levels)
    except UsageError as err:
        raise UsageError(
            f"--resolution {resolution} gives {channels}x{size}x{size} latents, which the UNet cannot take: {err}"
        ) from None


def scale_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Posterior latents as the UNet learns them: (z - shift_factor) * scaling_factor (BloodLDMPipeline undoes it)."""
    return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def encode_images(vae: AutoencoderKL, images: torch.Tensor, flip: bool, device: torch.device) -> torch.Tensor:
    """Scaled posterior modes [F, N, C, h, w] of uint8 NHWC `images`, for each of FLIPS (F = 4) or unflipped (1)."""
    flips = FLIPS if flip else FLIPS[:1]
    vae = vae.to(device)
    with tqdm(total=len(flips) * len(images), desc="encode", disable=not PartialState().is_local_main_process) as bar:
        return torch.stack(
            [scale_latents(vae, posterior_means(vae, images, ENCODE_BATCH, dims, bar.update)) for dims in flips]
        )


def autoencoder_provenance(folder: Path) -> dict[str, Any] | None:
    """What the autoencoder was trained on: its folder's provenance.json (the pipelines' format), else the record
    of the run that saved it (train_config.json beside the folder, as `core.train` writes one per run); None when
    neither is there."""
    own = folder / PROVENANCE_NAME
    if own.is_file():
        try:
            return read_provenance_file(own)
        except ValueError as err:
            raise ModelLoadError(str(err)) from None
    run = folder.parent / "train_config.json"
    if run.is_file():
        try:
            record = json.loads(run.read_text()).get("provenance")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ModelLoadError(f"cannot read {run}: {err}") from None
        return record if isinstance(record, dict) else None
    return None


def autoencoder_origin(path: str, vae: AutoencoderKL, latents: torch.Tensor) -> dict[str, Any]:
    """The `autoencoder` entry of the provenance: which autoencoder (folder and content hash), what it was trained
    on, and how its latents were scaled (`latent_std`: of the unflipped scaled latents, near 1 when scaling_factor
    was measured on these images)."""
    folder = Path(path).expanduser()
    return {
        "model": str(path),
        "sha256": content_sha256(folder),
        "provenance": autoencoder_provenance(folder),
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": vae.config.shift_factor,
        "latent_shape": list(latents.shape[2:]),
        "latent_std": round(float(latents[0].std()), 4),
    }


def load_latent_data(config: TrainConfig) -> tuple[LatentImages, dict[str, Any]]:
    """The real images of --dataset/--split (or its subset), encoded by the autoencoder, and their provenance with
    the autoencoder's entry; every refusal comes before the encoding."""
    o = options_of(LatentOptions, config.extra)
    check_options(o)
    vae = load_autoencoder(o.autoencoder)
    check_latent_unet(o, latent_shape(vae, config.resolution), config.resolution)
    images, provenance = load_training_data(config)
    latents = encode_images(vae, images.images, config.flip, PartialState().device)
    data = LatentImages(latents, images.labels, config.flip, images.class_names)
    return data, {**provenance, "autoencoder": autoencoder_origin(o.autoencoder, vae, latents)}


@dataclass
class LatentTask(DDPMTask):
    options: LatentOptions = field(default_factory=LatentOptions)
    vae: AutoencoderKL | None = None  # frozen: not trained, not checkpointed, saved in the pipeline
    pipeline_class: ClassVar[type[BloodLDMPipeline]] = BloodLDMPipeline

    @classmethod
    def build(cls, config: TrainConfig, num_images: int, class_names: tuple[str, ...] = CLASS_NAMES) -> LatentTask:
        o = options_of(LatentOptions, config.extra)
        check_options(o)
        vae = load_autoencoder(o.autoencoder).to(PartialState().device)
        channels, size, _ = latent_shape(vae, config.resolution)
        return cls.from_options(o, config, num_images, class_names, size, channels, vae=vae)

    def pipeline_components(self, accelerator: Accelerator) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae, **super().pipeline_components(accelerator)}


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    """Entry point of `train_scripts/train_ldm.py` and `bloodgen-hf train ldm`."""
    return run_training(
        "Train the class-conditional latent flow model (UNet2DModel on the latents of a frozen AutoencoderKL, "
        "classifier-free guidance) on BloodMNIST.",
        LatentTask.build,
        LatentOptions,
        load_latent_data,
        argv,
        prog,
        output_dir="runs/ldm",
        resolution=64,
        split="train",
        balanced_batches=True,
        epochs=10,
        batch_size=64,
    )
