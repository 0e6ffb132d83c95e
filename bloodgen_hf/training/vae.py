"""The conditional VAE as a TrainTask: maximise the ELBO, log p(x | z, y) - beta * KL(q(z | x, y) || N(0, I)).

Both terms are in nats per image. The reconstruction term is a per-pixel Gaussian likelihood whose
standard deviation is either fixed (`--recon mse`: squared error / 2 sigma^2) or the batch's
maximum-likelihood value (`--recon gaussian`, a calibrated decoder as in sigma-VAE, Rybkin et al.
2021), which balances the two terms without tuning. `beta` ramps up linearly over
`--kl-warmup-steps` (KL annealing, Bowman et al. 2016); `--free-bits` stops pushing a latent number's
KL below that many nats (Kingma et al. 2016), two standard guards against posterior collapse.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from bloodgen_hf.data import (
    CLASS_NAMES,
    DEFAULT_DATASET,
    describe_classes,
    load_data,
    same_classes,
    to_model_range,
    to_uint8,
)
from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import atomic_path, labelled_class_grid, make_grid, save_image
from bloodgen_hf.models.vae import ConditionalAutoencoderKL, gaussian_nll, kl_per_dimension
from bloodgen_hf.training.core import TrainConfig, TrainTask, run_training
from bloodgen_hf.training.options import option, options_of
from bloodgen_hf.training.sources import load_training_data

RECON_LOSSES = ("gaussian", "mse")
MIN_LATENT_SIDE = 7  # default blocks halve the image while it stays even and at least this big
SIGMA_EMA_DECAY = 0.99


@dataclass
class VAEOptions:
    """The conditional VAE's flags: its shape, its likelihood and KL terms, the optimizer."""

    block_out_channels: str | None = option(None, "e.g. '16,32,64' (default: by resolution)")
    layers_per_block: int = option(1)
    norm_num_groups: int = option(8)
    class_embed_dim: int = option(16)
    attention: bool = option(False, "self-attention in the mid blocks")
    latent_dim: int = option(64, "vector latent size; 0 = spatial latent")
    latent_channels: int = option(4)
    recon: str = option("gaussian", choices=RECON_LOSSES)
    recon_sigma: float = option(0.1, "--recon mse: fixed sigma, [-1, 1] units")
    beta: float = option(1.0, "KL weight after warm-up")
    kl_warmup_steps: int = option(500, "linear beta ramp; 0 = none")
    free_bits: float = option(0.0, "nats per latent number; 0 = off")
    lr: float = option(1e-3)
    max_grad_norm: float = option(1.0, "0 = no clipping")


def parse_blocks(text: str | None, resolution: int) -> tuple[int, ...]:
    if not text:
        return default_blocks(resolution)
    try:
        blocks = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise UsageError(f"--block-out-channels must be comma-separated integers, got {text!r}") from None
    if not blocks or min(blocks) < 1:
        raise UsageError(f"--block-out-channels must be positive, got {text!r}")
    return blocks


def default_blocks(resolution: int) -> tuple[int, ...]:
    """Encoder/decoder widths 16, 32, 64, 64, ...: one block more per halving of the image while it stays
    even and at least MIN_LATENT_SIDE (28 -> 7: (16, 32, 64); 64 -> 8: (16, 32, 64, 64); 128 -> 8: 5 blocks)."""
    side, blocks = resolution, 1
    while side % 2 == 0 and side // 2 >= MIN_LATENT_SIDE:
        side, blocks = side // 2, blocks + 1
    return (16, 32, 64, *([64] * max(0, blocks - 3)))[:blocks]


def check_options(o: VAEOptions) -> None:
    for name in ("beta", "free_bits", "kl_warmup_steps", "max_grad_norm"):
        if (value := getattr(o, name)) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    for name in ("lr", "recon_sigma"):
        if not (value := getattr(o, name)) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def kl_term(kl_dims: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Sum of the batch-mean KL of each latent number, each floored at `free_bits` nats when > 0."""
    return kl_dims.clamp(min=free_bits).sum() if free_bits > 0 else kl_dims.sum()


def beta_at(step: int, beta: float, warmup_steps: int) -> float:
    """KL weight for optimizer step `step` (0-based): a linear ramp reaching `beta` after warm-up."""
    return beta if warmup_steps <= 0 else beta * min(1.0, (step + 1) / warmup_steps)


@dataclass
class VAETask(TrainTask):
    options: VAEOptions = field(default_factory=VAEOptions)
    step: int = 0  # optimizer steps taken: drives the KL warm-up
    sigma_ema: float | None = None  # running maximum-likelihood decoder sigma (--recon gaussian)

    @classmethod
    def build(cls, config: TrainConfig, num_images: int, class_names: tuple[str, ...] = CLASS_NAMES) -> VAETask:
        """The model gets one class per name in the training data (saved in its config)."""
        o = options_of(VAEOptions, config.extra)
        check_options(o)
        vae = ConditionalAutoencoderKL(
            resolution=config.resolution,
            num_classes=len(class_names),
            class_embed_dim=o.class_embed_dim,
            block_out_channels=parse_blocks(o.block_out_channels, config.resolution),
            layers_per_block=o.layers_per_block,
            norm_num_groups=o.norm_num_groups,
            mid_block_add_attention=o.attention,
            latent_channels=o.latent_channels,
            latent_dim=o.latent_dim or None,
            decoder_sigma=o.recon_sigma,
            class_names=list(class_names),
        )
        return cls(
            models={"vae": vae},
            optimizers={"vae": torch.optim.Adam(vae.parameters(), lr=o.lr)},
            init_components={"vae": "vae"},
            options=o,
        )

    def recon_sigma(self, images: torch.Tensor, decoded: torch.Tensor) -> float:
        """The likelihood's sigma for this batch: fixed, or the maximum-likelihood sqrt(mean squared error)."""
        if self.options.recon == "mse":
            return self.options.recon_sigma
        sigma = max(math.sqrt((images - decoded).detach().pow(2).mean().item()), 1e-3)
        decay = SIGMA_EMA_DECAY if self.sigma_ema is not None else 0.0
        self.sigma_ema = decay * (self.sigma_ema or 0.0) + (1 - decay) * sigma
        return sigma

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, accelerator: Accelerator) -> dict[str, float]:
        vae, optimizer, o = self.models["vae"], self.optimizers["vae"], self.options
        out = vae(images, labels, sample_posterior=True)
        sigma = self.recon_sigma(images, out.sample)
        recon = gaussian_nll(images, out.sample, sigma).mean()
        kl_dims = kl_per_dimension(out.latent_dist).mean(dim=0)
        beta = beta_at(self.step, o.beta, o.kl_warmup_steps)
        loss = recon + beta * kl_term(kl_dims, o.free_bits)
        accelerator.backward(loss)
        if accelerator.sync_gradients and o.max_grad_norm > 0:
            accelerator.clip_grad_norm_(vae.parameters(), o.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss.item(),
            "loss_recon": recon.item(),
            "loss_kl": kl_dims.sum().item(),
            "beta": beta,
            "mse": (images - out.sample).detach().pow(2).mean().item(),
            "recon_sigma": sigma,
        }

    def after_optimizer_step(self) -> None:
        self.step += 1

    def extra_state(self) -> dict:
        return {"step": self.step, "sigma_ema": self.sigma_ema}

    def load_extra_state(self, state: dict) -> None:
        self.step, self.sigma_ema = state["step"], state["sigma_ema"]

    def pipeline(self, accelerator: Accelerator):
        """The live model in a BloodVAEPipeline, its likelihood sigma set to what training used."""
        from bloodgen_hf.pipelines import BloodVAEPipeline

        vae = accelerator.unwrap_model(self.models["vae"])
        if self.options.recon == "gaussian" and self.sigma_ema is not None:
            vae.register_to_config(decoder_sigma=self.sigma_ema)
        return BloodVAEPipeline(vae=vae, provenance=self.provenance)

    def sample_grid(self, accelerator: Accelerator) -> torch.Tensor:
        """One row per class of prior samples at temperature 1, from fixed noise (no global RNG use)."""
        per_class = 10
        pipe = self.pipeline(accelerator)
        labels = torch.arange(pipe.vae.config.num_classes).repeat_interleave(per_class).tolist()
        images = pipe(len(labels), labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
        pipe.vae.train()  # the pipeline switched the live model to eval mode
        return make_grid(to_uint8(images * 2 - 1).numpy(), nrow=per_class)

    def save_pipeline(self, accelerator: Accelerator, path: Path) -> None:
        from bloodgen_hf.registry import save_pipeline

        save_pipeline(self.pipeline(accelerator), path)


SWEEP_TEMPERATURES = (0.0, 0.5, 0.8, 1.0, 1.2)


@torch.no_grad()
def write_model_figures(
    model: str,
    data_dir: str | None,
    out: str | Path,
    split: str = "test",
    per_class: int = 2,
    seed: int = 0,
    dataset: str = DEFAULT_DATASET,
) -> dict[str, float]:
    """Model-card material for a trained VAE, written atomically into `out`.

    reconstructions.png (real `split` images over their reconstructions), samples.png (one row
    per class, temperature 1), temperature_sweep.png (one row per temperature in
    SWEEP_TEMPERATURES, the same noise in each column), and metrics.json: the whole split's
    -ELBO, KL and reconstruction error, with one seeded posterior sample per image.
    """
    from bloodgen_hf.registry import load_pipeline

    pipe = load_pipeline(model)
    vae, size = pipe.vae.eval(), pipe.vae.config.resolution
    images, labels, names, _ = load_data(dataset, split, size, data_dir)
    if not same_classes(names, pipe.class_names or names):
        theirs = describe_classes(pipe.class_names)
        raise UsageError(f"{dataset} has other classes ({describe_classes(names)}) than the VAE ({theirs})")
    num_classes = len(names)
    x_all, y_all = to_model_range(torch.from_numpy(images)), torch.from_numpy(labels)
    scale = max(1, 96 // size)
    out = Path(out)

    picks = torch.cat([torch.nonzero(y_all == c).flatten()[:per_class] for c in range(num_classes)])
    recon = pipe.reconstruct(x_all[picks], class_labels=y_all[picks].tolist(), output_type="pt").images
    pairs = np.stack([images[picks.numpy()], to_uint8(recon * 2 - 1).numpy()])
    save_image(labelled_class_grid(pairs, ["real", "reconstruction"], scale), out / "reconstructions.png")

    classes = torch.arange(num_classes).repeat_interleave(10).tolist()
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(classes))]
    samples = to_uint8(pipe(len(classes), classes, generator=generators, output_type="pt").images * 2 - 1)
    grid = labelled_class_grid(samples.numpy().reshape(num_classes, 10, size, size, 3), list(names), scale)
    save_image(grid, out / "samples.png")

    sweep_classes = torch.arange(num_classes).repeat_interleave(per_class).tolist()
    rows = []
    for temperature in SWEEP_TEMPERATURES:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(sweep_classes))]
        row = pipe(len(sweep_classes), sweep_classes, generator=generators, temperature=temperature, output_type="pt")
        rows.append(to_uint8(row.images * 2 - 1).numpy())
    names = [f"T = {t}" for t in SWEEP_TEMPERATURES]
    save_image(labelled_class_grid(np.stack(rows), names, scale), out / "temperature_sweep.png")

    totals, generator = {"neg_elbo": 0.0, "kl": 0.0, "mse": 0.0}, torch.Generator().manual_seed(seed)
    for start in range(0, len(x_all), 256):
        x, y = x_all[start : start + 256], y_all[start : start + 256]
        result = vae(x, y, sample_posterior=True, generator=generator)
        kl = result.latent_dist.kl()
        totals["neg_elbo"] += (gaussian_nll(x, result.sample, vae.config.decoder_sigma) + kl).sum().item()
        totals["kl"] += kl.sum().item()
        totals["mse"] += (x - result.sample).pow(2).flatten(1).mean(1).sum().item()
    metrics = {f"{split}_{k}": v / len(x_all) for k, v in totals.items()}
    metrics[f"{split}_psnr_db"] = 10 * math.log10(4.0 / metrics[f"{split}_mse"])  # [-1, 1] range: peak-to-peak 2
    metrics |= {"decoder_sigma": vae.config.decoder_sigma, "num_images": len(x_all)}
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> Path:
    """Entry point of `train_scripts/train_vae.py` and `bloodgen-hf train vae`."""
    return run_training(
        "Train the class-conditional VAE (AutoencoderKL-style CVAE) on BloodMNIST or any labelled images (--dataset).",
        VAETask.build,
        VAEOptions,
        load_training_data,
        argv,
        output_dir="runs/vae",
        epochs=7,
    )
