"""The conditional DCGAN as a TrainTask: one discriminator update, then one generator update."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

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
    diff_augment,
    discriminator_loss,
    frozen_scores,
    generator_loss,
    gradient_penalty,
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
        "drove the generator into mode collapse; see model_cards/gan.md)",
    )
    ema_decay: float = option(0.999)
    gp_weight: float = option(10.0, "WGAN-GP penalty weight")


def add_gan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """GANOptions as --flags, for a parser built by hand (run_training adds them itself)."""
    return add_dataclass_arguments(parser, GANOptions)


@dataclass
class GANTask(EMATask):
    options: GANOptions = field(default_factory=GANOptions)

    @classmethod
    def build(cls, config: TrainConfig, num_images: int, class_names: tuple[str, ...] = CLASS_NAMES) -> GANTask:
        """The models get one class per name in the training data (saved with the generator)."""
        o = options_of(GANOptions, config.extra)
        group = o.minibatch_std_group
        if group > 0 and config.batch_size % group:
            message = f"--minibatch-std-group {group} must divide --batch-size {config.batch_size} (0 turns it off)"
            raise UsageError(message)
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
        loss, policy, n = self.options.loss, self.options.diffaugment, images.shape[0]
        z = torch.randn(n, self.options.latent_dim, device=images.device)
        fake = g(z, labels)

        d_inputs, d_labels = [images, fake.detach()], [labels, labels]
        if loss == "wgan-gp":
            alpha = torch.rand(n, 1, 1, 1, device=images.device)
            mixed = (alpha * images + (1 - alpha) * fake.detach()).requires_grad_(True)
            d_inputs, d_labels = d_inputs + [mixed], d_labels + [labels]
        scores = d(torch.cat([diff_augment(x, policy) for x in d_inputs]), torch.cat(d_labels))
        real_scores, fake_scores = scores[:n], scores[n : 2 * n]
        d_loss = discriminator_loss(loss, real_scores, fake_scores)
        if loss == "wgan-gp":
            d_loss = d_loss + self.options.gp_weight * gradient_penalty(scores[2 * n :], mixed)
        accelerator.backward(d_loss)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

        g_loss = generator_loss(loss, frozen_scores(accelerator, d, diff_augment(fake, policy), labels))
        accelerator.backward(g_loss)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        return {
            "loss_d": d_loss.item(),
            "loss_g": g_loss.item(),
            "score_real": real_scores.mean().item(),
            "score_fake": fake_scores.mean().item(),
        }

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


def main(argv: list[str] | None = None) -> Path:
    """Entry point of `train_scripts/train_gan.py` and `bloodgen-hf train gan`."""
    return run_training(
        "Train the conditional DCGAN on BloodMNIST or any labelled image set (--dataset).",
        GANTask.build,
        GANOptions,
        load_training_data,
        argv,
        output_dir="runs/gan",
        epochs=15,
    )
