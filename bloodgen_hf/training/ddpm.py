"""The class-conditional DDPM as a TrainTask: a diffusers UNet2DModel, classifier-free guidance, EMA.

One training step: noise the images at random timesteps (DDPMScheduler.add_noise), replace a
fraction `--cfg-dropout` of the labels by the null class (so one network learns the conditional
and the unconditional model, which classifier-free guidance mixes), regress the noise (epsilon)
or the velocity (v_prediction) with MSE, clip gradients, step AdamW and the warmup/cosine LR.
An EMA of the weights (diffusers EMAModel, with warmup) is what samples and what is saved.

Size presets (`--preset`), parameters at 28x28 / 64x64 (checked by tests/test_ddpm.py):

    tiny   0.30M / 0.33M   channels (16, 32, 32) / (16, 16, 32, 32), 1 resnet per level: tests
    small  1.19M / 1.32M   channels (32, 64, 64) / (32, 32, 64, 64), 1 resnet per level: CPU
    base  16.77M / 27.66M  channels (64, 128, 256) / (64, 128, 256, 256), 2 resnets per level,
                           attention at the two lowest levels: GPU

28x28 images use three levels (28 -> 14 -> 7) and 64x64 four (64 -> 32 -> 16 -> 8), so both
train at their native size; self-attention runs at the lowest level (and the mid block). A latent model's
16x16 latents (bloodgen_hf/training/latent.py, `in_channels` = the latent channels) take the three-level layout
(16 -> 8 -> 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr

from bloodgen_hf.data import CLASS_NAMES, NUM_CLASSES, to_uint8
from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import make_grid
from bloodgen_hf.pipelines.pipeline_bloodgen_ddpm import FLOW_SCHEDULERS, SCHEDULERS, BloodDDPMPipeline, make_scheduler
from bloodgen_hf.training.core import EMATask, TrainConfig, run_training, total_optimizer_steps
from bloodgen_hf.training.options import option, options_of, parse_channels
from bloodgen_hf.training.sources import load_training_data


@dataclass(frozen=True)
class UNetPreset:
    channels: dict[int, tuple[int, ...]]  # resolution -> channels per level, highest resolution first
    layers_per_block: int
    attention_levels: int  # how many of the lowest-resolution levels have self-attention
    norm_num_groups: int
    attention_head_dim: int


PRESETS = {
    "tiny": UNetPreset({28: (16, 32, 32), 64: (16, 16, 32, 32)}, 1, 1, 8, 8),
    "small": UNetPreset({28: (32, 64, 64), 64: (32, 32, 64, 64)}, 1, 1, 8, 32),
    "base": UNetPreset({28: (64, 128, 256), 64: (64, 128, 256, 256)}, 2, 2, 32, 32),
}
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")  # flow: rectified-flow velocity, noise - image


def build_unet(
    preset: str,
    resolution: int,
    num_classes: int = NUM_CLASSES,
    dropout: float = 0.0,
    channels: tuple[int, ...] | None = None,
    layers_per_block: int | None = None,
    attention_levels: int | None = None,
    in_channels: int = 3,
) -> UNet2DModel:
    """A UNet2DModel with one class-embedding row per class plus the null class of guidance.

    `channels`, `layers_per_block` and `attention_levels` override the preset (the ablation's knobs);
    `in_channels` (= out_channels) is 3 for RGB images, an autoencoder's latent channels for a latent model."""
    channels, layers_per_block, attention_levels = unet_layout(
        preset, resolution, channels, layers_per_block, attention_levels
    )
    p = PRESETS[preset]
    attention = [i >= len(channels) - attention_levels for i in range(len(channels))]
    unet = UNet2DModel(
        sample_size=resolution,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        norm_num_groups=p.norm_num_groups,
        attention_head_dim=p.attention_head_dim,
        resnet_time_scale_shift="scale_shift",
        dropout=dropout,
        num_class_embeds=num_classes + 1,
    )
    # diffusers would silently drop class_labels in a UNet without class embeddings.
    assert unet.class_embedding is not None and unet.class_embedding.num_embeddings == num_classes + 1
    return unet


def unet_layout(
    preset: str,
    resolution: int,
    channels: tuple[int, ...] | None = None,
    layers_per_block: int | None = None,
    attention_levels: int | None = None,
) -> tuple[tuple[int, ...], int, int]:
    """The checked (channels per level, resnets per level, attention levels) of `preset` with its overrides, for
    samples of `resolution` px: what build_unet builds, refused in one line before anything is built."""
    if preset not in PRESETS:
        raise UsageError(f"unknown UNet preset {preset!r}; choose from: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    channels = tuple(channels or preset_channels(p, resolution))
    layers_per_block = p.layers_per_block if layers_per_block is None else layers_per_block
    attention_levels = p.attention_levels if attention_levels is None else attention_levels
    check_unet_shape(channels, resolution, layers_per_block, attention_levels, p.norm_num_groups)
    return channels, layers_per_block, attention_levels


def preset_channels(p: UNetPreset, resolution: int) -> tuple[int, ...]:
    """The preset's widths for `resolution`: its own entry, else the 64 px layout (4 levels) for sizes from
    64 that halve 3 times, else the 28 px layout (3 levels) for any multiple of 4."""
    if resolution in p.channels:
        return p.channels[resolution]
    if resolution >= 64 and resolution % 8 == 0:
        return p.channels[64]
    if resolution % 4 == 0:
        return p.channels[28]
    raise UsageError(f"the DDPM's UNet needs a resolution that is a multiple of 4, not {resolution}")


def check_unet_shape(channels, resolution: int, layers: int, attention_levels: int, groups: int) -> None:
    if len(channels) < 2 or any(c < 1 or c % groups for c in channels):
        raise UsageError(f"--channels needs at least 2 levels, each a multiple of {groups}; got {list(channels)}")
    if resolution % 2 ** (len(channels) - 1):
        raise UsageError(f"{len(channels)} UNet levels halve {resolution} pixels {len(channels) - 1} times: not whole")
    if layers < 1:
        raise UsageError(f"--layers-per-block must be at least 1, got {layers}")
    if not 0 <= attention_levels <= len(channels):
        raise UsageError(f"--attention-levels must be between 0 and {len(channels)}, got {attention_levels}")


def build_noise_scheduler(
    beta_schedule: str, prediction_type: str, num_train_timesteps: int = 1000
) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training noise schedule; "trailing" spacing makes few-step samplers start at pure noise (t = T-1).

    Flow matching has no betas: x_t = (1 - t) x + t noise for t in [0, 1], which the UNet sees as 1000 t."""
    if beta_schedule not in BETA_SCHEDULES:
        raise UsageError(f"unknown beta schedule {beta_schedule!r}; choose from: {', '.join(BETA_SCHEDULES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise UsageError(f"unknown prediction type {prediction_type!r}; choose from: {', '.join(PREDICTION_TYPES)}")
    if prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
    )


@dataclass
class UNetOptimization:
    """The optimizer, schedule and EMA options that `unet_optimization` reads (the DDPM's and the student's)."""

    lr: float = option(3e-4, "AdamW peak learning rate")
    weight_decay: float = option(0.01)
    adam_beta1: float = option(0.9)
    adam_beta2: float = option(0.999)
    lr_schedule: str = option("cosine", choices=("cosine", "constant"))
    lr_warmup_steps: int = option(200)
    max_grad_norm: float = option(1.0, "gradient clipping; 0 disables it")
    ema_max_decay: float = option(0.9999)
    ema_power: float = option(0.75, "EMA warmup: decay = 1 - (1 + step)^-power")


@dataclass
class DDPMOptions(UNetOptimization):
    """The DDPM's own flags (after UNetOptimization's)."""

    preset: str = option(
        "small",
        "UNet size at 28x28: tiny 0.30M (tests), small 1.19M parameters (CPU), base 16.77M (GPU); see "
        "bloodgen_hf/training/ddpm.py",
        choices=tuple(PRESETS),
    )
    channels: str | None = option(None, "UNet channels per level, e.g. 64,128,128 (default: preset)")
    layers_per_block: int | None = option(None, "resnets per UNet level (default: preset)")
    attention_levels: int | None = option(None, "lowest-resolution levels with self-attention (default: preset)")
    dropout: float = option(0.0, "dropout inside the UNet's resnets")
    snr_gamma: float = option(0.0, "min-SNR-gamma loss weighting (Hang et al. 2023; 5 is usual); 0 = plain MSE")
    cfg_dropout: float = option(0.1, "share of labels replaced by the null class")
    beta_schedule: str = option("squaredcos_cap_v2", choices=BETA_SCHEDULES)
    prediction_type: str = option("v_prediction", choices=PREDICTION_TYPES)
    num_train_timesteps: int = option(1000)
    sampler: str = option("dpm++", "saved pipeline's scheduler", choices=SCHEDULERS)
    sampler_steps: int = option(
        10,
        "saved pipeline's default steps: 10k images in 12 min on 2 CPU cores, about 11%% of a new sample's "
        "distance from DDIM-1000 (bench_ddpm.py measures both)",
    )
    guidance_scale: float = option(1.0, "saved pipeline's default guidance")
    grid_per_class: int = option(8, "images per class row in sample grids")


def planned_steps(config: TrainConfig, num_images: int) -> int:
    """The optimizer steps `core.train` will run, which the cosine schedule spans (`core.check_whole_batch`
    refuses a run with none)."""
    return total_optimizer_steps(config, num_images, PartialState().num_processes)


def unet_optimization(unet: UNet2DModel, o: UNetOptimization, config: TrainConfig, num_images: int):
    """(AdamW, warmup + cosine or constant LR schedule, EMA with warmup) for a UNet, from the options."""
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay
    )
    if o.lr_schedule == "cosine":
        lr_scheduler = get_cosine_schedule_with_warmup(optimizer, o.lr_warmup_steps, planned_steps(config, num_images))
    else:
        lr_scheduler = get_constant_schedule_with_warmup(optimizer, o.lr_warmup_steps)
    ema = EMAModel(unet.parameters(), decay=o.ema_max_decay, use_ema_warmup=True, power=o.ema_power)
    ema.to(PartialState().device)  # the live weights move there in accelerator.prepare
    return optimizer, lr_scheduler, ema


@dataclass
class DDPMTask(EMATask):
    noise_scheduler: DDPMScheduler | None = None
    options: DDPMOptions = field(default_factory=DDPMOptions)
    class_names: tuple[str, ...] = CLASS_NAMES  # of the training data; index len(class_names) is the null class
    # The saved pipeline's sampler and default guidance, and the shift of its flow sigmas (a student's own)
    sampler: str = "dpm++"
    guidance_scale: float = 1.0
    sampler_shift: float = 1.0
    pipeline_class: ClassVar[type[BloodDDPMPipeline]] = BloodDDPMPipeline  # what it saves (a latent task's: LDM)

    @classmethod
    def build(cls, config: TrainConfig, num_images: int, class_names: tuple[str, ...] = CLASS_NAMES) -> DDPMTask:
        o = options_of(DDPMOptions, config.extra)
        check_options(o)
        return cls.from_options(o, config, num_images, class_names, config.resolution)

    @classmethod
    def from_options(
        cls,
        o: DDPMOptions,
        config: TrainConfig,
        num_images: int,
        class_names: tuple[str, ...],
        sample_size: int,
        in_channels: int = 3,
        **fields,
    ) -> DDPMTask:
        """The task of checked options: a UNet for `sample_size` px samples of `in_channels` channels (images, or a
        latent task's latents), its optimizer, LR schedule and EMA; `fields` are a subclass's own."""
        unet = build_unet(
            o.preset,
            sample_size,
            num_classes=len(class_names),
            dropout=o.dropout,
            channels=parse_channels(o.channels),
            layers_per_block=o.layers_per_block,
            attention_levels=o.attention_levels,
            in_channels=in_channels,
        )
        optimizer, lr_scheduler, ema = unet_optimization(unet, o, config, num_images)
        return cls(
            init_components={"unet": "unet"},
            models={"unet": unet},
            optimizers={"unet": optimizer},
            schedulers={"lr": lr_scheduler},
            noise_scheduler=build_noise_scheduler(o.beta_schedule, o.prediction_type, o.num_train_timesteps),
            ema=ema,
            ema_of="unet",
            options=o,
            class_names=tuple(class_names),
            sampler=o.sampler,
            guidance_scale=o.guidance_scale,
            **fields,
        )

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, accelerator: Accelerator) -> dict[str, float]:
        n, device = images.shape[0], images.device
        noise = torch.randn_like(images)
        dropped = torch.rand(n, device=device) < self.options.cfg_dropout
        labels = torch.where(dropped, torch.full_like(labels, len(self.class_names)), labels)
        noisy, timesteps, target, weights = self.noised_batch(images, noise)
        prediction = self.models["unet"](noisy, timesteps, class_labels=labels).sample
        per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return self.optimize((per_image * weights).mean(), accelerator)

    def optimize(self, loss: torch.Tensor, accelerator: Accelerator) -> dict[str, float]:
        """Backward, clip (--max-grad-norm), AdamW step: the end of every UNet objective's step."""
        unet, optimizer = self.models["unet"], self.optimizers["unet"]
        accelerator.backward(loss)
        metrics = {"loss": loss.item(), "lr": self.schedulers["lr"].get_last_lr()[0]}
        if accelerator.sync_gradients and self.options.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(unet.parameters(), self.options.max_grad_norm)
            metrics["grad_norm"] = float(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return metrics

    def noised_batch(self, images: torch.Tensor, noise: torch.Tensor):
        """(noisy images, UNet timesteps, regression target, per-image loss weights) for one batch."""
        n, device = images.shape[0], images.device
        scheduler, prediction_type = self.noise_scheduler, self.options.prediction_type
        if prediction_type == "flow":
            t = torch.rand(n, device=device)
            noisy = (1 - t.view(-1, 1, 1, 1)) * images + t.view(-1, 1, 1, 1) * noise
            return noisy, t * scheduler.config.num_train_timesteps, noise - images, torch.ones(n, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), device=device)
        noisy = scheduler.add_noise(images, noise, timesteps)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(images, noise, timesteps)
        return (
            noisy,
            timesteps,
            target,
            min_snr_weights(scheduler, timesteps, prediction_type, self.options.snr_gamma),
        )

    def after_optimizer_step(self) -> None:
        self.schedulers["lr"].step()
        super().after_optimizer_step()

    def ema_unet(self, accelerator: Accelerator) -> UNet2DModel:
        return self.ema_model(accelerator)

    def pipeline(self, accelerator: Accelerator) -> BloodDDPMPipeline:
        """The EMA UNet with the chosen sampler and defaults: what is saved, and what draws the grids."""
        pipe = self.pipeline_class(
            **self.pipeline_components(accelerator),
            scheduler=make_scheduler(self.sampler, self.sampler_config()),
            class_names=list(self.class_names),
            default_guidance_scale=self.guidance_scale,
            default_num_inference_steps=self.options.sampler_steps,
            provenance=self.provenance,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_components(self, accelerator: Accelerator) -> dict[str, torch.nn.Module]:
        """The pipeline's models: the EMA UNet (a latent task adds its autoencoder)."""
        return {"unet": self.ema_unet(accelerator)}

    def sampler_config(self) -> dict:
        """The noise schedule the saved sampler reads; a student may shift its flow sigmas (--sampler-shift)."""
        shift = self.sampler_shift
        return {**self.noise_scheduler.config, "flow_shift": shift} if shift != 1.0 else self.noise_scheduler.config

    def sample_grid(self, accelerator: Accelerator) -> torch.Tensor:
        """One row per class, from fixed per-image seeds (so grids of successive epochs compare, and the
        global RNG, which exact resume depends on, is left alone)."""
        per_class = self.options.grid_per_class
        labels = torch.arange(len(self.class_names)).repeat_interleave(per_class)
        generators = [torch.Generator(accelerator.device).manual_seed(i) for i in range(len(labels))]
        images = self.pipeline(accelerator)(
            len(labels), class_labels=labels.tolist(), generator=generators, output_type="pt"
        ).images
        return make_grid(to_uint8(images * 2 - 1).numpy(), nrow=per_class)

    def save_pipeline(self, accelerator: Accelerator, path: Path) -> None:
        from bloodgen_hf.registry import save_pipeline

        save_pipeline(self.pipeline(accelerator), path)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, prediction_type: str, gamma: float):
    """min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v targets: both weight
    the implied image-space error by min(SNR, gamma), so nearly clean timesteps stop dominating the loss."""
    if not gamma:
        return torch.ones(len(timesteps), device=timesteps.device)
    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


def check_options(o: DDPMOptions) -> None:
    """Refuse nonsensical settings before any work is done."""
    if o.snr_gamma < 0 or not math.isfinite(o.snr_gamma):
        raise UsageError(f"--snr-gamma must be >= 0 (0 turns it off), got {o.snr_gamma}")
    if o.snr_gamma and o.prediction_type == "flow":
        raise UsageError("--snr-gamma weights the DDPM targets (epsilon, v_prediction), not --prediction-type flow")
    if not 0 <= o.cfg_dropout < 1:
        raise UsageError(f"--cfg-dropout must be in [0, 1), got {o.cfg_dropout}")
    if o.sampler_steps < 1:
        raise UsageError(f"--sampler-steps must be at least 1, got {o.sampler_steps}")
    if o.prediction_type == "flow" and o.sampler not in FLOW_SCHEDULERS:  # refused now, not at the first grid
        flow_samplers = ", ".join(FLOW_SCHEDULERS)
        raise UsageError(f"--sampler {o.sampler} cannot sample flow matching; choose from: {flow_samplers}")
    if not (math.isfinite(o.guidance_scale) and o.guidance_scale >= 0):
        raise UsageError(f"--guidance-scale must be >= 0, got {o.guidance_scale}")
    if o.guidance_scale != 1 and o.cfg_dropout == 0:
        raise UsageError("--guidance-scale other than 1 needs a trained null class: set --cfg-dropout above 0")
    if o.grid_per_class < 1:
        raise UsageError(f"--grid-per-class must be at least 1, got {o.grid_per_class}")


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    """Entry point of `train_scripts/train_ddpm.py` and `bloodgen-hf train ddpm`."""
    return run_training(
        "Train the class-conditional DDPM (UNet2DModel + classifier-free guidance) on BloodMNIST.",
        DDPMTask.build,
        DDPMOptions,
        load_training_data,
        argv,
        prog,
        output_dir="runs/ddpm",
        epochs=10,
        batch_size=64,
    )
