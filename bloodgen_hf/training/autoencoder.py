"""The first stage of latent diffusion: diffusers' stock `AutoencoderKL` as a TrainTask.

The loss is the one of Stable Diffusion's and MONAI's 2D LDM autoencoders, without the perceptual network
(none can be downloaded here): per-pixel L1 (optionally + `--ssim-weight` x (1 - SSIM)), a small KL term
(`--kl-weight`, 1e-6: the latents stay close to N(0, I) in shape but keep the detail), and after
`--disc-start` optimizer steps a hinge-loss PatchGAN (models/patch_discriminator.py) whose generator term
restores the texture L1 blurs. Its weight is `--disc-weight` (default 0.01, fixed as in MONAI's tutorial), or
with `--disc-weight-mode adaptive` (Esser et al. 2021) that times the ratio of the reconstruction and adversarial
gradients at the decoder's last layer. The discriminator is updated after the autoencoder on the same batch.
`--disc-classes` makes it class-conditional (projection, patch by patch): it then judges each reconstruction's
texture against real cells of its class; the autoencoder itself stays the stock, unconditional class. Measured at
64 px it did not help: BloodNet-64 recognised 10% of the basophil reconstructions, against 62% with the
unconditional critic (experiments/README.md, "Decoders for the basophils").
At 64 px it trains in two stages (experiments/README.md): L1 + KL, then `--init-from` that with the
discriminator and `--freeze-encoder`, which fine-tunes the decoder alone as Stable Diffusion's released decoders
were: the latents stay the first stage's, so the latent model can train on them while the decoder is tuned.

The encoder halves the image `log2(--spatial-factor)` times: at 64 px and the default factor 4, a 64x64x3
cell becomes a 16x16x`--latent-channels` latent. Size presets (`--preset`; `--block-out-channels`,
`--layers-per-block`, `--norm-num-groups` override them), parameters at factor 4:

    tiny    0.24M   channels (16, 32, 32)    tests, quick looks
    small   0.95M   channels (32, 64, 64)    CPU (default): a step of 32 64-px images takes 1.6 s of CPU time
                                             on one thread, 1.9 s once the discriminator is on
    base    3.79M   channels (64, 128, 128)  GPU: MONAI's multipliers (1, 2, 2), about 5x small's compute

The decoder runs once per sampled image in the latent pipeline, so its width also sets sampling speed.

The saved folder (<output-dir>/pipeline) is a plain AutoencoderKL (config.json + safetensors) that
`AutoencoderKL.from_pretrained` loads without bloodgen-hf, and provenance.json, its training data. Its config's
`scaling_factor` is 1 / std of the latents (posterior means) of up to `--scale-images` training images, measured
after training, which is where diffusers keeps the factor a latent model multiplies the latents by.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from bloodgen_hf.data import LabelledImages, to_model_range, to_uint8
from bloodgen_hf.errors import UsageError
from bloodgen_hf.image_quality import ssim
from bloodgen_hf.io import make_grid
from bloodgen_hf.models.patch_discriminator import PATCH_NORMS, PatchDiscriminator, patch_side
from bloodgen_hf.pipelines.blood_pipeline_utils import write_provenance
from bloodgen_hf.training.core import TrainConfig, TrainTask, run_training
from bloodgen_hf.training.gan_losses import hinge_discriminator_step, reconstruction_adversarial_term
from bloodgen_hf.training.options import option, options_of, parse_channels
from bloodgen_hf.training.sources import load_training_data

# preset -> (first level's width, resnet blocks per encoder level, group-norm groups); widths go
# (w, 2w, 2w, ...), one level per halving plus one, as MONAI's (1, 2, 2) channel multipliers.
PRESETS = {"tiny": (16, 1, 8), "small": (32, 1, 16), "base": (64, 1, 32)}
DISC_WEIGHT_MODES = ("adaptive", "fixed")
TRAIN_SPLITS = ("train", "val")  # the test split is where its reconstructions are reported
LATENT_MULTIPLE = 4  # the latent UNet's three-level layout (training/ddpm.py) halves the latent twice
GRID_IMAGES = 32  # real images in the progress grid, each above its reconstruction
GRID_ROW = 8


@dataclass
class AutoencoderOptions:
    """The autoencoder's flags: its shape, its three loss terms, the discriminator and the optimizers."""

    preset: str = option("small", "size preset (see training/autoencoder.py)", choices=tuple(PRESETS))
    block_out_channels: str | None = option(None, "e.g. '32,64,64' (default: the preset's); one level per halving + 1")
    layers_per_block: int | None = option(None, "resnet blocks per encoder level (default: the preset's)")
    norm_num_groups: int | None = option(None, "group-norm groups (default: the preset's)")
    latent_channels: int = option(4, "latent channels (4 or 8 in the ablation)")
    spatial_factor: int = option(4, "image side / latent side, a power of 2: 64 px -> 16x16 latents")
    attention: bool = option(True, "self-attention in the mid blocks (diffusers' default)")
    kl_weight: float = option(1e-6, "weight of the KL term (nats per image)")
    ssim_weight: float = option(0.0, "adds this x (1 - SSIM) to the L1 loss; 0 = L1 only")
    disc_start: int = option(2000, "optimizer steps before the patch discriminator and its loss switch on")
    # The defaults are the bundled ldm-64's stage 2 (MONAI's 2D LDM tutorial): under the adaptive weight the
    # discriminator stayed at chance on 64 px cells (experiments/README.md).
    disc_weight: float = option(0.01, "weight of the adversarial term (adaptive mode: times the gradient ratio)")
    disc_weight_mode: str = option("fixed", "adaptive: scaled by the gradient ratio", choices=DISC_WEIGHT_MODES)
    disc_channels: int = option(32, "the discriminator's first width")
    disc_layers: int = option(3, "the discriminator's stride-2 layers (3: 70x70 patches)")
    disc_norm: str = option(
        "batch", "the discriminator's normalisation (spectral: its logits start too flat at 64 px)", choices=PATCH_NORMS
    )
    disc_classes: bool = option(
        False, "class-conditional discriminator (projection): judges each cell's texture against its class's"
    )
    lr: float = option(2e-4, "the autoencoder's learning rate")
    lr_d: float = option(2e-4, "the discriminator's learning rate")
    beta1: float = option(0.5)
    beta2: float = option(0.9)
    max_grad_norm: float = option(1.0, "the autoencoder's gradient clipping; 0 = none")
    freeze_encoder: bool = option(
        False,
        "train the decoder only, from --init-from (Stable Diffusion's decoder fine-tune): the latents and their "
        "scaling_factor stay the first stage's, so a latent model trained on them fits either decoder",
    )
    scale_images: int = option(2000, "training images whose latents' std sets the saved scaling_factor")


# --- shapes ------------------------------------------------------------------------------------------


def num_halvings(spatial_factor: int) -> int:
    """log2 of the spatial factor, refusing one that is not a power of 2 from 2 up."""
    if spatial_factor < 2 or spatial_factor & (spatial_factor - 1):
        raise UsageError(f"--spatial-factor must be a power of 2 (2, 4, 8, ...), got {spatial_factor}")
    return spatial_factor.bit_length() - 1


def latent_shape(resolution: int, spatial_factor: int = 4, latent_channels: int = 4) -> tuple[int, int, int]:
    """(channels, side, side) of the latents of `resolution`-pixel images, or one UsageError line saying why
    the combination cannot feed a latent model: the encoder must halve the image into whole pixels, and the
    latent UNet (the DDPM's three-level layout) halves the latent twice more."""
    num_halvings(spatial_factor)
    if latent_channels < 1:
        raise UsageError(f"--latent-channels must be at least 1, got {latent_channels}")
    if resolution % spatial_factor:
        raise UsageError(f"--resolution {resolution} is not divisible by --spatial-factor {spatial_factor}")
    side = resolution // spatial_factor
    if side % LATENT_MULTIPLE:
        raise UsageError(
            f"--resolution {resolution} / --spatial-factor {spatial_factor} gives a {side}x{side} latent; the latent "
            f"UNet needs a side that is a multiple of {LATENT_MULTIPLE} (e.g. --resolution 64 -> 16x16)"
        )
    return latent_channels, side, side


def architecture(o: AutoencoderOptions) -> tuple[tuple[int, ...], int, int]:
    """(block_out_channels, layers_per_block, norm_num_groups): the preset's, with the flags' overrides."""
    width, layers, groups = PRESETS[o.preset]
    levels = num_halvings(o.spatial_factor) + 1
    channels = parse_channels(o.block_out_channels, "--block-out-channels") or (width, *[2 * width] * (levels - 1))
    layers = layers if o.layers_per_block is None else o.layers_per_block
    groups = groups if o.norm_num_groups is None else o.norm_num_groups
    if len(channels) != levels:
        raise UsageError(
            f"--block-out-channels {','.join(map(str, channels))} has {len(channels)} levels, which halve the image "
            f"{len(channels) - 1} times; --spatial-factor {o.spatial_factor} needs {levels}"
        )
    if groups < 1 or any(c % groups for c in channels):
        raise UsageError(f"--block-out-channels {list(channels)} must be multiples of --norm-num-groups {groups}")
    if layers < 1:
        raise UsageError(f"--layers-per-block must be at least 1, got {layers}")
    return channels, layers, groups


def check_options(o: AutoencoderOptions, resolution: int) -> None:
    """Every refusal that needs no data, so a bad command stops before the images are read."""
    latent_shape(resolution, o.spatial_factor, o.latent_channels)
    architecture(o)
    for name in ("kl_weight", "ssim_weight", "disc_weight", "disc_start", "max_grad_norm"):
        if (value := getattr(o, name)) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    for name in ("lr", "lr_d"):
        if not (value := getattr(o, name)) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if o.scale_images < 2:
        raise UsageError(f"--scale-images must be at least 2 (a standard deviation), got {o.scale_images}")
    if o.disc_channels < 1 or o.disc_layers < 1 or patch_side(resolution, o.disc_layers) < 1:
        raise UsageError(
            f"--disc-layers {o.disc_layers} and --disc-channels {o.disc_channels} leave no patch to score "
            f"in a {resolution}-pixel image"
        )


def check_split(split: str) -> None:
    if split not in TRAIN_SPLITS:
        raise UsageError(
            f"the autoencoder trains on --split train (or val), not {split!r}: its reconstructions are "
            "scored on the test split"
        )


def build_autoencoder(o: AutoencoderOptions, resolution: int) -> TrainingAutoencoderKL:
    channels, layers, groups = architecture(o)
    return TrainingAutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=layers,
        norm_num_groups=groups,
        latent_channels=o.latent_channels,
        sample_size=resolution,
        mid_block_add_attention=o.attention,
    )


ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # the weights that make the latents; freeze_encoder stops them


def freeze_encoder(vae: AutoencoderKL) -> None:
    """Stop the weights that make the latents (ENCODER_PREFIXES) learning: no gradient, so no optimizer state."""
    for name, parameter in vae.named_parameters():
        if name.startswith(ENCODER_PREFIXES):
            parameter.requires_grad_(False)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class TrainingAutoencoderKL(AutoencoderKL):
    """The stock AutoencoderKL whose forward also gives each image's KL, so one forward (one DDP forward
    with several processes) yields the whole loss. Its weights are the stock class's; it is saved as that."""

    def forward(self, sample: torch.Tensor, generator: torch.Generator | None = None):
        posterior = self.encode(sample).latent_dist
        return self.decode(posterior.sample(generator=generator)).sample, posterior.kl()


def stock_autoencoder(model: AutoencoderKL, scaling_factor: float) -> AutoencoderKL:
    """A plain diffusers AutoencoderKL with `model`'s weights and the measured latent scale."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    stock = AutoencoderKL.from_config({**config, "scaling_factor": float(scaling_factor)})
    stock.load_state_dict(model.state_dict())
    return stock.to(model.device).eval()


def pretrained_scaling_factor(source: str) -> float:
    """The scaling_factor saved with the autoencoder `source` (--init-from). A frozen encoder makes that
    autoencoder's latents, so a decoder tuned on them keeps its factor exactly: measured again, on another CPU,
    it moves in the ninth digit, and a latent model takes a new decoder only with the same latents to the bit
    (training/replace_decoder.py)."""
    from bloodgen_hf.registry import load_pretrained_component  # lazily, as core.init_from_pretrained does

    return float(load_pretrained_component(source, "", AutoencoderKL).config.scaling_factor)


@torch.no_grad()
def posterior_means(
    vae: AutoencoderKL,
    images_uint8: torch.Tensor,
    batch_size: int,
    flip_dims: tuple[int, ...] = (),
    progress: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """The posterior means (modes) [N, C, h, w] of uint8 NHWC images, flipped along `flip_dims` of NCHW if any,
    encoded `batch_size` at a time on the autoencoder's device, as float32 on the CPU: the one encode loop of the
    scale measured here and of the latent model's training latents (training/latent.py). The mode depends on no
    seed; `progress` gets each batch's image count."""
    device = next(vae.parameters()).device
    means = []
    for start in range(0, len(images_uint8), batch_size):
        x = to_model_range(images_uint8[start : start + batch_size]).to(device)
        means.append(vae.encode(x.flip(flip_dims) if flip_dims else x).latent_dist.mode().float().cpu())
        if progress is not None:
            progress(len(x))
    return torch.cat(means)


def latent_scaling_factor(vae: AutoencoderKL, images_uint8: torch.Tensor, batch_size: int = 256) -> float:
    """1 / std of the posterior means of `images_uint8` (NHWC), over every latent number: the factor that
    gives a latent model unit-variance inputs (Rombach et al. 2022, as diffusers' `scaling_factor`)."""
    return float(1.0 / posterior_means(vae, images_uint8, batch_size).double().std())


@torch.no_grad()
def posterior_mean_reconstructions(
    vae: AutoencoderKL, images_uint8: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """uint8 NHWC decode(posterior mean of encode(x)) of uint8 NHWC images, `batch_size` at a time on the
    autoencoder's device, on the CPU: no random numbers drawn, so a progress grid never shifts the training RNG,
    and the same reconstructions the evaluation scores (evaluation/reconstruction.py)."""
    device = next(vae.parameters()).device
    out = []
    for start in range(0, len(images_uint8), batch_size):
        x = to_model_range(images_uint8[start : start + batch_size]).to(device)
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample.float()).cpu())
    return torch.cat(out) if out else torch.zeros_like(images_uint8)


# --- the loss -----------------------------------------------------------------------------------------


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@dataclass
class AutoencoderTask(TrainTask):
    options: AutoencoderOptions = field(default_factory=AutoencoderOptions)
    step: int = 0  # optimizer steps taken: the discriminator switches on at --disc-start
    grid_images: torch.Tensor | None = None  # uint8 NHWC, fixed real images for the progress grid
    scale_source: torch.Tensor | None = None  # uint8 NHWC training images that set scaling_factor
    kept_scaling_factor: float | None = None  # --freeze-encoder: the --init-from autoencoder's, saved unchanged

    @classmethod
    def build(cls, config: TrainConfig, dataset: LabelledImages) -> AutoencoderTask:
        o = options_of(AutoencoderOptions, config.extra)
        check_options(o, config.resolution)
        vae = build_autoencoder(o, config.resolution)
        if o.freeze_encoder:
            freeze_encoder(vae)
        disc = PatchDiscriminator(
            base_channels=o.disc_channels,
            num_layers=o.disc_layers,
            norm=o.disc_norm,
            num_classes=len(dataset.class_names) if o.disc_classes else 0,
        )
        betas = (o.beta1, o.beta2)
        return cls(
            models={"autoencoder": vae, "discriminator": disc},
            init_components={"autoencoder": ""},  # --init-from a saved AutoencoderKL folder (e.g. an L1-only run's)
            optimizers={
                "autoencoder": torch.optim.Adam(trainable(vae), lr=o.lr, betas=betas),
                "discriminator": torch.optim.Adam(disc.parameters(), lr=o.lr_d, betas=betas),
            },
            options=o,
            grid_images=grid_images(dataset),
            scale_source=scale_images(dataset, o.scale_images, config.seed),
            kept_scaling_factor=pretrained_scaling_factor(config.init_from) if o.freeze_encoder else None,
        )

    @property
    def disc_active(self) -> bool:
        return self.step >= self.options.disc_start

    def reconstruction_loss(self, images: torch.Tensor, decoded: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """L1, plus --ssim-weight x (1 - SSIM) when set; and what to log of them."""
        l1 = (decoded - images).abs().mean()
        if self.options.ssim_weight <= 0:
            return l1, {"l1": l1.item()}
        similarity = ssim(decoded, images, data_range=2.0).mean()
        return l1 + self.options.ssim_weight * (1 - similarity), {"l1": l1.item(), "ssim": similarity.item()}

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, accelerator: Accelerator) -> dict[str, float]:
        """One autoencoder update (reconstruction + KL [+ adversarial]), then, once on, one discriminator update."""
        vae, optimizer, o = self.models["autoencoder"], self.optimizers["autoencoder"], self.options
        decoded, kl = vae(images)
        rec, logged = self.reconstruction_loss(images, decoded)
        kl = kl.mean()
        loss = rec + o.kl_weight * kl
        if self.disc_active:
            adv, weight = self.adversarial_term(rec, images, decoded, labels, accelerator)
            loss = loss + weight * adv
            logged |= {"loss_adv": adv.item(), "adv_weight": float(weight)}
        accelerator.backward(loss)
        if accelerator.sync_gradients and o.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable(vae), o.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mse = (decoded - images).detach().pow(2).mean().item()
        logged |= {"loss": loss.item(), "kl": kl.item(), "psnr": psnr_of_mse(mse)}
        if self.disc_active:
            logged |= self.discriminator_step(images, decoded.detach(), labels, accelerator)
        return logged

    def critic_labels(self, labels: torch.Tensor) -> torch.Tensor | None:
        """What the discriminator is told of the batch: its classes under --disc-classes, else nothing."""
        return labels if self.options.disc_classes else None

    def adversarial_term(
        self,
        rec: torch.Tensor,
        images: torch.Tensor,
        decoded: torch.Tensor,
        labels: torch.Tensor,
        accelerator: Accelerator,
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The hinge generator loss on the reconstructions (gan_losses.reconstruction_adversarial_term)."""
        last_layer = accelerator.unwrap_model(self.models["autoencoder"]).decoder.conv_out.weight
        o = self.options
        return reconstruction_adversarial_term(
            accelerator, self.models["discriminator"], last_layer, rec, images, decoded, o.disc_weight,
            o.disc_weight_mode == "adaptive", self.critic_labels(labels),
        )  # fmt: skip

    def discriminator_step(
        self, images: torch.Tensor, decoded: torch.Tensor, labels: torch.Tensor, accelerator: Accelerator
    ) -> dict:
        """Hinge loss on real and reconstructed patches, in one forward (which DDP needs)."""
        disc, opt_d = self.models["discriminator"], self.optimizers["discriminator"]
        return hinge_discriminator_step(accelerator, disc, opt_d, images, decoded, self.critic_labels(labels))

    def after_optimizer_step(self) -> None:
        self.step += 1

    def extra_state(self) -> dict:
        return {"step": self.step}

    def load_extra_state(self, state: dict) -> None:
        self.step = state["step"]

    def sample_grid(self, accelerator: Accelerator) -> torch.Tensor:
        """Rows of GRID_ROW real training images, each row above its reconstructions."""
        vae = accelerator.unwrap_model(self.models["autoencoder"])
        real, recon = self.grid_images, posterior_mean_reconstructions(vae, self.grid_images)
        rows = [part[i : i + GRID_ROW] for i in range(0, len(real), GRID_ROW) for part in (real, recon)]
        return make_grid(torch.cat(rows).numpy(), nrow=GRID_ROW)

    def save_pipeline(self, accelerator: Accelerator, path: Path) -> None:
        """A stock AutoencoderKL (safetensors) with the measured scaling_factor (under --freeze-encoder, the first
        stage's), and provenance.json."""
        live = accelerator.unwrap_model(self.models["autoencoder"])
        scale = self.kept_scaling_factor
        if scale is None:
            scale = latent_scaling_factor(live, self.scale_source)
        vae = stock_autoencoder(live, scale)
        vae.save_pretrained(path, safe_serialization=True)
        write_provenance(self.provenance, path)


def grid_images(dataset: LabelledImages) -> torch.Tensor:
    """Up to GRID_IMAGES training images spread evenly over the class-sorted set (whole rows of GRID_ROW when
    there are enough), the same in every grid."""
    count = min(GRID_IMAGES, len(dataset) // GRID_ROW * GRID_ROW) or len(dataset)
    order = torch.argsort(dataset.labels, stable=True)
    return dataset.images[order[torch.linspace(0, len(order) - 1, count).long()]]


def scale_images(dataset: LabelledImages, count: int, seed: int) -> torch.Tensor:
    """A seeded random `count` of the training images (all of them if fewer), without flips."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return dataset.images[order[:count].sort().values]


def load_data(config: TrainConfig) -> tuple[LabelledImages, dict]:
    """Refuse a bad shape or split before reading any image, then the training images (sources.py)."""
    check_split(config.split)
    options = options_of(AutoencoderOptions, config.extra)
    check_options(options, config.resolution)
    if options.freeze_encoder and not config.init_from:
        raise UsageError("--freeze-encoder needs --init-from <a trained AutoencoderKL folder>: it keeps that encoder")
    return load_training_data(config)


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    """Entry point of `train_scripts/train_autoencoder.py` and `bloodgen-hf train autoencoder`."""
    loaded: dict[str, LabelledImages] = {}

    def load(config: TrainConfig) -> tuple[LabelledImages, dict]:
        dataset, provenance = load_data(config)
        loaded["dataset"] = dataset  # the task keeps fixed grid images and the scale sample from it
        return dataset, provenance

    def build(config: TrainConfig, num_images: int, class_names: tuple[str, ...]) -> AutoencoderTask:
        return AutoencoderTask.build(config, loaded["dataset"])

    return run_training(
        "Train diffusers' AutoencoderKL (the first stage of latent diffusion) on BloodMNIST or any image set.",
        build,
        AutoencoderOptions,
        load,
        argv,
        prog,
        output_dir="runs/autoencoder",
        resolution=64,
        split="train",
        batch_size=32,
        epochs=10,
    )
