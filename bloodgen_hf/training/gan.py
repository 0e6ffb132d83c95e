"""The conditional DCGAN as a TrainTask: one discriminator update, then one generator update.

Its discriminator is already BigGAN's projection discriminator (spectral norm, global sum pooling, a linear
score plus <embed(y), features>). GAN v2's options (issue 33), each off by default so that older runs resume
as they were: R1 on real images with lazy regularisation (`--r1-gamma`, `--r1-every`) and adaptive
discriminator augmentation (`--ada-target`, `--ada-policy`, `--ada-kimg`). Class-balanced batches are the
shared `--balanced-batches` (core.epoch_batches), and the EMA generator is what grids sample and what is saved.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from diffusers.training_utils import EMAModel

from bloodgen_hf.data import CLASS_NAMES, to_uint8
from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import make_grid
from bloodgen_hf.models.gan import ConditionalDiscriminator, ConditionalGenerator
from bloodgen_hf.training.core import EMATask, TrainConfig, run_training
from bloodgen_hf.training.gan_losses import (
    GAN_LOSSES,
    ada_adjust,
    adaptive_augment,
    augment_names,
    diff_augment,
    discriminator_loss,
    frozen_scores,
    generator_loss,
    gradient_penalty,
    r1_penalty,
)
from bloodgen_hf.training.options import add_dataclass_arguments, option, options_of
from bloodgen_hf.training.sources import load_training_data


@dataclass
class GANOptions:
    """The conditional DCGAN's flags: losses, widths, TTUR learning rates, discriminator tricks, EMA."""

    loss: str = option("hinge", choices=GAN_LOSSES)
    latent_dim: int = option(128)
    base_channels: int = option(64)
    lr_g: float = option(2e-4, "TTUR: generator learning rate")
    lr_d: float = option(4e-4, "TTUR: discriminator learning rate")
    beta1: float = option(0.0)
    beta2: float = option(0.9)
    spectral_norm: bool = option(True)
    minibatch_std_group: int = option(
        4,
        "discriminator sees the feature spread of groups of this many images (0: off); must divide the batch",
        absent=0,  # runs from before it existed had none
    )
    diffaugment: str = option(
        "",
        "DiffAugment policy, e.g. 'color,translation,cutout' (default none: on all 17k BloodMNIST images it "
        "drove the generator into mode collapse; see model_cards/gan-v1.md)",
    )
    ema_decay: float = option(0.999)
    gp_weight: float = option(10.0, "WGAN-GP penalty weight")
    r1_gamma: float = option(
        0.0,
        "R1 penalty on real images, gamma/2 * E||grad_x D(x)||^2, with this gamma (0: off). Lazy: see --r1-every",
    )
    r1_every: int = option(
        16, "lazy R1 (StyleGAN2): the penalty on every K-th discriminator step only, multiplied by K (1: every step)"
    )
    ada_target: float = option(
        0.0,
        "adaptive discriminator augmentation (ADA): every 4 steps the probability p of each --ada-policy operation "
        "rises while r_t = E[sign(D(real))] is above this target and falls while below (StyleGAN2-ADA: 0.6; "
        "0: off). p is kept in the checkpoints",
    )
    ada_policy: str = option("color,translation,cutout", "ADA's operations (DiffAugment's), each applied with p")
    ada_kimg: float = option(100.0, "ADA's speed: p can move from 0 to 1 in this many thousand real images")


ADA_INTERVAL = 4  # optimizer steps between ADA's updates of p (StyleGAN2-ADA's ada_interval)
# GANTask's counters that a checkpoint holds (under "gan" in its extra state), for exact resume
RESUMED_COUNTERS = ("d_steps", "ada_p", "ada_rt", "ada_signs", "ada_count")


def check_options(o: GANOptions, batch_size: int) -> None:
    """Refuse nonsensical settings with one line before any work is done."""
    group = o.minibatch_std_group
    if group > 0 and batch_size % group:
        raise UsageError(f"--minibatch-std-group {group} must divide --batch-size {batch_size} (0 turns it off)")
    if not (math.isfinite(o.r1_gamma) and o.r1_gamma >= 0):
        raise UsageError(f"--r1-gamma must be >= 0 (0 turns R1 off), got {o.r1_gamma}")
    if o.r1_every < 1:
        raise UsageError(f"--r1-every must be at least 1 (1: R1 on every step), got {o.r1_every}")
    if not 0 <= o.ada_target < 1:
        raise UsageError(f"--ada-target must be in [0, 1) (0: ADA off; StyleGAN2-ADA uses 0.6), got {o.ada_target}")
    if not (math.isfinite(o.ada_kimg) and o.ada_kimg > 0):
        raise UsageError(f"--ada-kimg must be positive, got {o.ada_kimg}")
    augment_names(o.diffaugment)
    if o.ada_target > 0:
        if not augment_names(o.ada_policy, "--ada-policy operation"):
            raise UsageError("--ada-policy names no operation; ADA needs at least one (e.g. color,translation)")
        if o.diffaugment:
            raise UsageError("--ada-target and --diffaugment both augment D's inputs; choose one")


def add_gan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """GANOptions as --flags, for a parser built by hand (run_training adds them itself)."""
    return add_dataclass_arguments(parser, GANOptions)


@dataclass
class GANTask(EMATask):
    options: GANOptions = field(default_factory=GANOptions)
    d_steps: int = 0  # discriminator (= optimizer) steps taken: lazy R1 and ADA count them
    ada_p: float = 0.0  # ADA's augmentation probability
    ada_rt: float | None = None  # E[sign(D(real))] over ADA's last interval (None before its first update)
    ada_signs: float = 0.0  # sum of sign(D(real)) since p's last update, over all processes
    ada_count: int = 0  # real images those signs came from

    @classmethod
    def build(cls, config: TrainConfig, num_images: int, class_names: tuple[str, ...] = CLASS_NAMES) -> GANTask:
        """The models get one class per name in the training data (saved with the generator)."""
        o = options_of(GANOptions, config.extra)
        check_options(o, config.batch_size)
        group = o.minibatch_std_group
        generator = ConditionalGenerator(
            resolution=config.resolution,
            latent_dim=o.latent_dim,
            num_classes=len(class_names),
            base_channels=o.base_channels,
            class_names=list(class_names),
        )
        discriminator = ConditionalDiscriminator(
            resolution=config.resolution,
            num_classes=len(class_names),
            base_channels=o.base_channels,
            use_spectral_norm=o.spectral_norm,
            minibatch_std_group=group,
        )
        betas = (o.beta1, o.beta2)
        ema = EMAModel(generator.parameters(), decay=o.ema_decay)
        ema.to(PartialState().device)  # the live weights move there in accelerator.prepare
        return cls(
            init_components={"generator": "gan"},
            models={"generator": generator, "discriminator": discriminator},
            optimizers={
                "generator": torch.optim.Adam(generator.parameters(), lr=o.lr_g, betas=betas),
                "discriminator": torch.optim.Adam(discriminator.parameters(), lr=o.lr_d, betas=betas),
            },
            ema=ema,
            ema_of="generator",
            options=o,
        )

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, accelerator: Accelerator) -> dict[str, float]:
        """One D update on real + fake (a single forward, which DDP needs), then one G update."""
        g, d = self.models["generator"], self.models["discriminator"]
        opt_g, opt_d = self.optimizers["generator"], self.optimizers["discriminator"]
        o, n = self.options, images.shape[0]
        z = torch.randn(n, o.latent_dim, device=images.device)
        fake = g(z, labels)

        with_r1 = o.r1_gamma > 0 and self.d_steps % o.r1_every == 0
        reals = images.detach().requires_grad_(True) if with_r1 else images
        d_inputs, d_labels = [reals, fake.detach()], [labels, labels]
        if o.loss == "wgan-gp":
            alpha = torch.rand(n, 1, 1, 1, device=images.device)
            mixed = (alpha * images + (1 - alpha) * fake.detach()).requires_grad_(True)
            d_inputs, d_labels = d_inputs + [mixed], d_labels + [labels]
        scores = d(torch.cat([self.augment(x) for x in d_inputs]), torch.cat(d_labels))
        real_scores, fake_scores = scores[:n], scores[n : 2 * n]
        d_loss = discriminator_loss(o.loss, real_scores, fake_scores)
        if o.loss == "wgan-gp":
            d_loss = d_loss + o.gp_weight * gradient_penalty(scores[2 * n :], mixed)
        extra: dict[str, float] = {}
        if with_r1:  # lazy: the penalty of K steps at once
            penalty = r1_penalty(real_scores, reals)
            d_loss = d_loss + o.r1_gamma / 2 * o.r1_every * penalty
            extra["r1_penalty"] = penalty.item()
        if o.ada_target > 0:
            self.observe_reals(real_scores, accelerator)
            extra["ada_p"] = self.ada_p
            if self.ada_rt is not None:
                extra["ada_rt"] = self.ada_rt
        accelerator.backward(d_loss)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

        g_loss = generator_loss(o.loss, frozen_scores(accelerator, d, self.augment(fake), labels))
        accelerator.backward(g_loss)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        return {
            "loss_d": d_loss.item(),
            "loss_g": g_loss.item(),
            "score_real": real_scores.mean().item(),
            "score_fake": fake_scores.mean().item(),
            **extra,
        }

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """What D sees of real and fake images alike: DiffAugment's fixed policy, or ADA's at probability p."""
        if self.options.ada_target > 0:
            return adaptive_augment(images, self.options.ada_policy, self.ada_p)
        return diff_augment(images, self.options.diffaugment)

    def observe_reals(self, real_scores: torch.Tensor, accelerator: Accelerator) -> None:
        """Add this batch's sign(D(real)) to ADA's interval, summed over the processes (so all keep one p)."""
        count = torch.tensor(float(len(real_scores)), device=real_scores.device)
        stats = torch.stack([real_scores.detach().sign().sum(), count])
        if accelerator.num_processes > 1:
            stats = accelerator.reduce(stats, reduction="sum")
        signs, count = stats.tolist()
        self.ada_signs += signs
        self.ada_count += int(count)

    def after_optimizer_step(self) -> None:
        """The EMA step; every ADA_INTERVAL steps, ADA's new p from the interval's r_t."""
        super().after_optimizer_step()
        self.d_steps += 1
        if self.options.ada_target > 0 and self.d_steps % ADA_INTERVAL == 0 and self.ada_count:
            self.ada_rt = self.ada_signs / self.ada_count
            o = self.options
            self.ada_p = ada_adjust(self.ada_p, self.ada_rt, o.ada_target, self.ada_count, o.ada_kimg)
            self.ada_signs, self.ada_count = 0.0, 0

    def extra_state(self) -> dict[str, Any]:
        """The EMA, and the step count and ADA state that exact resume needs."""
        return {**super().extra_state(), "gan": {k: getattr(self, k) for k in RESUMED_COUNTERS}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Checkpoints from before GAN v2 hold the EMA only: their counters start at zero (R1 and ADA were off)."""
        super().load_extra_state(state)
        saved = state.get("gan", {})
        for key in RESUMED_COUNTERS:
            setattr(self, key, saved.get(key, getattr(type(self), key)))

    def ema_generator(self, accelerator: Accelerator) -> ConditionalGenerator:
        return self.ema_model(accelerator)

    def sample_grid(self, accelerator: Accelerator) -> torch.Tensor:
        g = self.ema_generator(accelerator)
        per_class = 10
        labels = torch.arange(g.config.num_classes).repeat_interleave(per_class).to(accelerator.device)
        z = torch.randn(len(labels), g.config.latent_dim, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            images = to_uint8(g(z.to(accelerator.device), labels)).cpu().numpy()
        return make_grid(images, nrow=per_class)

    def save_pipeline(self, accelerator: Accelerator, path: Path) -> None:
        from bloodgen_hf.pipelines import BloodGANPipeline
        from bloodgen_hf.registry import save_pipeline

        save_pipeline(BloodGANPipeline(gan=self.ema_generator(accelerator), provenance=self.provenance), path)


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    """Entry point of `train_scripts/train_gan.py` and `bloodgen-hf train gan`."""
    return run_training(
        "Train the conditional DCGAN on BloodMNIST or any labelled image set (--dataset).",
        GANTask.build,
        GANOptions,
        load_training_data,
        argv,
        prog,
        output_dir="runs/gan",
        epochs=15,
    )
