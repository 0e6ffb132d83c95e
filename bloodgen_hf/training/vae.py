"""The conditional VAE as a TrainTask: maximise the ELBO, log p(x | z, y) - beta * KL(q(z | x, y) || N(0, I)).

Both terms are in nats per image. The reconstruction term is a per-pixel Gaussian likelihood whose
standard deviation is either fixed (`--recon mse`: squared error / 2 sigma^2) or the batch's
maximum-likelihood value (`--recon gaussian`, a calibrated decoder as in sigma-VAE, Rybkin et al.
2021), which balances the two terms without tuning. `beta` ramps up linearly over
`--kl-warmup-steps` (KL annealing, Bowman et al. 2016); `--free-bits` stops pushing a latent number's
KL below that many nats (Kingma et al. 2016), two standard guards against posterior collapse.

VAE v2 (issue 33) adds, each off by default so that the defaults train the v1 model:
- `--backbone resnet`: the class embedding conditions every residual block of both halves (models/vae.py).
- `--prior-components K`: after training, a K-component full-covariance Gaussian mixture per class is fitted by
  EM to the posterior means of the training images (Ghosh et al. 2020) and saved in the model as its prior, so
  samples come from where the encoder puts real cells. `--fit-prior MODEL` refits a saved VAE's prior alone.
- `--adv-weight W`: a hinge PatchGAN term on the reconstructions (models/patch_discriminator.py), weighted by W
  times the ratio of the reconstruction and adversarial gradients at the decoder's last layer (Esser et al.
  2021), as training/autoencoder.py does, against the blur of a Gaussian likelihood.
"""

from __future__ import annotations

import argparse
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
    LabelledImages,
    describe_classes,
    load_data,
    same_classes,
    to_model_range,
    to_uint8,
)
from bloodgen_hf.errors import UsageError, explain
from bloodgen_hf.guard import output_lock
from bloodgen_hf.io import atomic_path, labelled_class_grid, make_grid, save_image
from bloodgen_hf.models.patch_discriminator import PatchDiscriminator, patch_side
from bloodgen_hf.models.vae import BACKBONES, ConditionalAutoencoderKL, gaussian_nll, kl_per_dimension
from bloodgen_hf.provenance import portable_provenance
from bloodgen_hf.training.core import (
    BAD_INPUT,
    ErrorExit,
    TrainConfig,
    TrainTask,
    config_from_args,
    run_training,
    train_parser,
)
from bloodgen_hf.training.gan_losses import hinge_discriminator_step, reconstruction_adversarial_term
from bloodgen_hf.training.options import option, options_of, parse_channels
from bloodgen_hf.training.sources import load_training_data

RECON_LOSSES = ("gaussian", "mse")
ADV_WEIGHT_MODES = ("adaptive", "fixed")
MIN_LATENT_SIDE = 7  # default blocks halve the image while it stays even and at least this big
SIGMA_EMA_DECAY = 0.99
PRIOR_REG = 1e-6  # added to each fitted covariance's diagonal (sklearn's reg_covar): no component shrinks to a point
PRIOR_TOLERANCE = 1e-8  # EM stops once the mean log-likelihood per image gains less than this
ENCODE_BATCH = 256
DESCRIPTION = (
    "Train the class-conditional VAE (AutoencoderKL-style CVAE) on BloodMNIST or any labelled images (--dataset)."
)
TRAIN_DEFAULTS = {"output_dir": "runs/vae", "epochs": 7}


@dataclass
class VAEOptions:
    """The conditional VAE's flags: its shape, its likelihood and KL terms, the optimizer; and v2's backbone,
    mixture prior and adversarial term (each off by default: the defaults train the v1 model)."""

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
    backbone: str = option(
        "autoencoder_kl", "autoencoder_kl (v1) or resnet: the class conditions every residual block", choices=BACKBONES
    )
    prior_components: int = option(
        0, "Gaussians per class in the prior fitted after training to the posterior means; 0 = N(0, I)"
    )
    prior_iterations: int = option(100, "EM iterations of the prior fit at most (it stops once converged)")
    adv_weight: float = option(0.0, "weight of a hinge PatchGAN term on the reconstructions; 0 = off")
    adv_start: int = option(0, "optimizer steps before the adversarial term switches on")
    adv_weight_mode: str = option("adaptive", "adaptive: times the gradient ratio", choices=ADV_WEIGHT_MODES)
    disc_channels: int = option(32, "the discriminator's first width")
    disc_layers: int = option(2, "the discriminator's stride-2 layers (2: 5x5 patches at 28 px)")
    lr_d: float = option(2e-4, "the discriminator's learning rate")
    fit_prior: str | None = option(
        None,
        "trains nothing: refit the prior of this saved VAE (folder or bundled name) with --prior-components on "
        "--split's images and save it as --output-dir/pipeline",
        metavar="MODEL",
    )


def parse_blocks(text: str | None, resolution: int) -> tuple[int, ...]:
    """--block-out-channels' widths, or the resolution's default when not given (or given empty)."""
    return parse_channels(text or None, "--block-out-channels") or default_blocks(resolution)


def default_blocks(resolution: int) -> tuple[int, ...]:
    """Encoder/decoder widths 16, 32, 64, 64, ...: one block more per halving of the image while it stays
    even and at least MIN_LATENT_SIDE (28 -> 7: (16, 32, 64); 64 -> 8: (16, 32, 64, 64); 128 -> 8: 5 blocks)."""
    side, blocks = resolution, 1
    while side % 2 == 0 and side // 2 >= MIN_LATENT_SIDE:
        side, blocks = side // 2, blocks + 1
    return (16, 32, 64, *([64] * max(0, blocks - 3)))[:blocks]


def check_options(o: VAEOptions, resolution: int = 28) -> None:
    """Every refusal of the VAE's own flags that needs no data, each in one line naming the flag."""
    at_least_zero = ("beta", "free_bits", "kl_warmup_steps", "max_grad_norm", "prior_components", "adv_weight")
    for name in (*at_least_zero, "adv_start"):
        if (value := getattr(o, name)) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    for name in ("lr", "recon_sigma", "lr_d"):
        if not (value := getattr(o, name)) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if o.prior_iterations < 1:
        raise UsageError(f"--prior-iterations must be at least 1, got {o.prior_iterations}")
    if o.adv_weight > 0 and (o.disc_channels < 1 or o.disc_layers < 1 or patch_side(resolution, o.disc_layers) < 1):
        raise UsageError(
            f"--disc-layers {o.disc_layers} and --disc-channels {o.disc_channels} leave no patch to score "
            f"in a {resolution}-pixel image"
        )


def kl_term(kl_dims: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Sum of the batch-mean KL of each latent number, each floored at `free_bits` nats when > 0."""
    return kl_dims.clamp(min=free_bits).sum() if free_bits > 0 else kl_dims.sum()


def beta_at(step: int, beta: float, warmup_steps: int) -> float:
    """KL weight for optimizer step `step` (0-based): a linear ramp reaching `beta` after warm-up."""
    return beta if warmup_steps <= 0 else beta * min(1.0, (step + 1) / warmup_steps)


@dataclass
class VAETask(TrainTask):
    options: VAEOptions = field(default_factory=VAEOptions)
    step: int = 0  # optimizer steps taken: drives the KL warm-up and switches the adversarial term on
    sigma_ema: float | None = None  # running maximum-likelihood decoder sigma (--recon gaussian)
    config: TrainConfig | None = None  # the run's: the prior fit at the end reads its training images again

    @classmethod
    def build(cls, config: TrainConfig, num_images: int, class_names: tuple[str, ...] = CLASS_NAMES) -> VAETask:
        """The model gets one class per name in the training data (saved in its config); with --adv-weight, a
        patch discriminator and its optimizer too."""
        o = options_of(VAEOptions, config.extra)
        check_options(o, config.resolution)
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
            backbone=o.backbone,
            prior_components=o.prior_components,
        )
        models, optimizers = {"vae": vae}, {"vae": torch.optim.Adam(vae.parameters(), lr=o.lr)}
        if o.adv_weight > 0:
            disc = PatchDiscriminator(base_channels=o.disc_channels, num_layers=o.disc_layers)
            models["discriminator"] = disc
            optimizers["discriminator"] = torch.optim.Adam(disc.parameters(), lr=o.lr_d, betas=(0.5, 0.9))
        return cls(models=models, optimizers=optimizers, init_components={"vae": "vae"}, options=o, config=config)

    @property
    def adversarial_on(self) -> bool:
        return self.options.adv_weight > 0 and self.step >= self.options.adv_start

    def recon_sigma(self, images: torch.Tensor, decoded: torch.Tensor) -> float:
        """The likelihood's sigma for this batch: fixed, or the maximum-likelihood sqrt(mean squared error)."""
        if self.options.recon == "mse":
            return self.options.recon_sigma
        sigma = max(math.sqrt((images - decoded).detach().pow(2).mean().item()), 1e-3)
        decay = SIGMA_EMA_DECAY if self.sigma_ema is not None else 0.0
        self.sigma_ema = decay * (self.sigma_ema or 0.0) + (1 - decay) * sigma
        return sigma

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, accelerator: Accelerator) -> dict[str, float]:
        """One VAE update on the -ELBO (+ the adversarial term once on), then, once on, one discriminator update."""
        vae, optimizer, o = self.models["vae"], self.optimizers["vae"], self.options
        out = vae(images, labels, sample_posterior=True)
        sigma = self.recon_sigma(images, out.sample)
        recon = gaussian_nll(images, out.sample, sigma).mean()
        kl_dims = kl_per_dimension(out.latent_dist).mean(dim=0)
        beta = beta_at(self.step, o.beta, o.kl_warmup_steps)
        loss = recon + beta * kl_term(kl_dims, o.free_bits)
        logged = {}
        if self.adversarial_on:
            adv, weight = self.adversarial_term(recon, images, out.sample, accelerator)
            loss = loss + weight * adv
            logged = {"loss_adv": adv.item(), "adv_weight": float(weight)}
        accelerator.backward(loss)
        if accelerator.sync_gradients and o.max_grad_norm > 0:
            accelerator.clip_grad_norm_(vae.parameters(), o.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.adversarial_on:
            disc, opt_d = self.models["discriminator"], self.optimizers["discriminator"]
            logged |= hinge_discriminator_step(accelerator, disc, opt_d, images, out.sample.detach())
        return {
            "loss": loss.item(),
            "loss_recon": recon.item(),
            "loss_kl": kl_dims.sum().item(),
            "beta": beta,
            "mse": (images - out.sample).detach().pow(2).mean().item(),
            "recon_sigma": sigma,
            **logged,
        }

    def adversarial_term(
        self, recon: torch.Tensor, images: torch.Tensor, decoded: torch.Tensor, accelerator: Accelerator
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The hinge generator loss on the reconstructions (gan_losses.reconstruction_adversarial_term)."""
        last_layer = accelerator.unwrap_model(self.models["vae"]).decoder.conv_out.weight
        o = self.options
        return reconstruction_adversarial_term(
            accelerator, self.models["discriminator"], last_layer, recon, images, decoded, o.adv_weight,
            o.adv_weight_mode == "adaptive",
        )  # fmt: skip

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
        """One row per class of prior samples at temperature 1, from fixed noise (no global RNG use). Before the
        prior is fitted (at the end of the run) a mixture prior is N(0, I) in every component."""
        per_class = 10
        pipe = self.pipeline(accelerator)
        labels = torch.arange(pipe.vae.config.num_classes).repeat_interleave(per_class).tolist()
        images = pipe(len(labels), labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
        pipe.vae.train()  # the pipeline switched the live model to eval mode
        return make_grid(to_uint8(images * 2 - 1).numpy(), nrow=per_class)

    def save_pipeline(self, accelerator: Accelerator, path: Path) -> None:
        """The pipeline, its prior (with --prior-components) fitted first to the run's training images."""
        from bloodgen_hf.registry import save_pipeline

        pipe = self.pipeline(accelerator)
        if self.options.prior_components:
            dataset, _ = load_training_data(self.config)
            fit_prior(pipe.vae, dataset, self.options.prior_components, self.options.prior_iterations, self.config.seed)
        save_pipeline(pipe, path)


# --- the prior: a Gaussian mixture per class, fitted to the posterior means -------------------------------


@torch.no_grad()
def posterior_means(vae: ConditionalAutoencoderKL, images_uint8: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, D] float64: the mean of q(z | x, y) of each uint8 NHWC image with its label, flattened."""
    device, was_training = next(vae.parameters()).device, vae.training
    vae.eval()
    means = []
    for start in range(0, len(images_uint8), ENCODE_BATCH):
        x = to_model_range(images_uint8[start : start + ENCODE_BATCH]).to(device)
        y = labels[start : start + ENCODE_BATCH].to(device)
        means.append(vae.encode(x, y).latent_dist.mean.flatten(1).double().cpu())
    vae.train(was_training)
    return torch.cat(means)


def fit_prior(
    vae: ConditionalAutoencoderKL, dataset: LabelledImages, components: int, iterations: int, seed: int
) -> None:
    """Fit `vae`'s class-conditional mixture prior to the posterior means of `dataset` (its images, unflipped,
    with their labels) and store it in the model (`set_prior`)."""
    latents = posterior_means(vae, dataset.images, dataset.labels)
    names = vae.config.class_names or [str(c) for c in range(vae.config.num_classes)]
    vae.set_prior(*fit_class_mixtures(latents, dataset.labels, names, components, iterations, seed))


def fit_class_mixtures(
    latents: torch.Tensor, labels: torch.Tensor, class_names, components: int, iterations: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [C, K], means [C, K, D], scale_tril [C, K, D, D]): one mixture per class, fitted by EM with one
    seeded generator drawing every class's starting means in turn."""
    check_class_counts(labels, class_names, components)
    generator = torch.Generator().manual_seed(seed)
    fits = [
        fit_gaussian_mixture(latents[labels == c], components, iterations, generator) for c in range(len(class_names))
    ]
    return tuple(torch.stack(parts) for parts in zip(*fits))


def check_class_counts(labels: torch.Tensor, class_names, components: int) -> None:
    """Refuse a mixture of more components than a class has images (checked before training, too)."""
    counts = torch.bincount(labels, minlength=len(class_names)).tolist()
    for name, count in zip(class_names, counts):
        if count < components:
            raise UsageError(f"class {name!r} has {count} training images, fewer than --prior-components {components}")


def fit_gaussian_mixture(
    x: torch.Tensor, components: int, iterations: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EM for a full-covariance Gaussian mixture on [N, D] points: (weights [K], means [K, D], scale_tril
    [K, D, D]), the covariances' Cholesky factors. Starts from K distinct random points and the data's covariance;
    every covariance gets PRIOR_REG on its diagonal. It ends on an M-step, after which the mixture's mean and
    covariance are the data's exactly (K = 1: the sample mean and the maximum-likelihood covariance)."""
    x = x.double()
    means = x[torch.randperm(len(x), generator=generator)[:components]]
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    cov = (torch.cov(x.T, correction=0) + PRIOR_REG * eye).expand(components, -1, -1)
    weights, tril = torch.full((components,), 1 / components, dtype=x.dtype), torch.linalg.cholesky(cov)
    previous = -math.inf
    for _ in range(iterations):
        log_joint = component_log_density(x, means, tril) + weights.log()
        likelihood = torch.logsumexp(log_joint, dim=1)
        weights, means, cov = m_step(x, (log_joint - likelihood[:, None]).exp())
        tril = torch.linalg.cholesky(cov + PRIOR_REG * eye)
        if likelihood.mean().item() - previous < PRIOR_TOLERANCE:
            break
        previous = likelihood.mean().item()
    return weights, means, tril


def component_log_density(x: torch.Tensor, means: torch.Tensor, tril: torch.Tensor) -> torch.Tensor:
    """[N, K]: log N(x_n; mean_k, L_k L_k^T) of every point under every component."""
    diff = (x[None] - means[:, None]).transpose(1, 2)  # [K, D, N]
    solved = torch.linalg.solve_triangular(tril, diff, upper=False)
    log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)
    return (-0.5 * solved.pow(2).sum(dim=1) - log_det[:, None] - 0.5 * x.shape[1] * math.log(2 * math.pi)).T


def m_step(x: torch.Tensor, resp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, means and (unregularised) covariances that maximise the likelihood given responsibilities [N, K]."""
    counts = resp.sum(dim=0).clamp(min=10 * torch.finfo(x.dtype).eps)
    means = resp.T @ x / counts[:, None]
    diff = x[None] - means[:, None]  # [K, N, D]
    cov = torch.einsum("nk,knd,kne->kde", resp, diff, diff) / counts[:, None, None]
    return counts / len(x), means, cov


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


def load_vae_data(config: TrainConfig) -> tuple[LabelledImages, dict]:
    """The training images (sources.py), after refusing bad options, and a prior the data cannot fit, before
    training rather than at its end."""
    o = options_of(VAEOptions, config.extra)
    check_options(o, config.resolution)
    dataset, provenance = load_training_data(config)
    if o.prior_components:
        check_class_counts(dataset.labels, dataset.class_names, o.prior_components)
    return dataset, provenance


# --- the standalone refit: --fit-prior MODEL ------------------------------------------------------------


def refit_prior(config: TrainConfig) -> Path:
    """Refit the prior of the saved VAE `--fit-prior` names on the images of --dataset/--split (the model's own
    resolution) and save the pipeline atomically as <output-dir>/pipeline. Its provenance records those images,
    starting from that model (its own record kept under `init_from`)."""
    from bloodgen_hf.registry import load_pipeline, save_pipeline

    o = options_of(VAEOptions, config.extra)
    check_options(o, config.resolution)
    if o.prior_components < 1:
        raise UsageError("--fit-prior needs --prior-components K >= 1, the Gaussians per class to fit")
    out = Path(config.output_dir)
    folder = out / "pipeline"
    if folder.exists() and not config.overwrite:
        raise FileExistsError(f"{folder} already exists; pass --overwrite to replace it")
    pipe = load_pipeline(o.fit_prior)
    if not isinstance(getattr(pipe, "vae", None), ConditionalAutoencoderKL):
        raise UsageError(f"--fit-prior {o.fit_prior} is a {type(pipe).__name__}, not a VAE pipeline")
    config.resolution, config.init_from = pipe.vae.config.resolution, o.fit_prior
    dataset, provenance = load_training_data(config)
    if not same_classes(dataset.class_names, pipe.class_names or dataset.class_names):
        theirs = describe_classes(pipe.class_names)
        raise UsageError(f"{config.dataset} has other classes ({describe_classes(dataset.class_names)}) than {theirs}")
    fit_prior(pipe.vae, dataset, o.prior_components, o.prior_iterations, config.seed)
    pipe.register_to_config(provenance=portable_provenance(provenance))
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out), atomic_path(folder, is_dir=True, overwrite=config.overwrite) as tmp:
        save_pipeline(pipe, tmp)
    return folder


def refit_main(args: argparse.Namespace) -> Path:
    """`--fit-prior MODEL`: the refit, ending as a training run does, with one `error:` line on a refusal."""
    debug = vars(args).pop("debug")
    try:
        folder = refit_prior(config_from_args(args, VAEOptions))
    except Exception as err:
        from bloodgen_hf.registry import ModelLoadError

        code, message = explain(err, (*BAD_INPUT, ModelLoadError), debug=debug)
        raise ErrorExit(message, code) from None
    print(f"saved pipeline to {folder}")
    return folder


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    """Entry point of `train_scripts/train_vae.py` and `bloodgen-hf train vae`: trains, or with --fit-prior
    refits a saved VAE's prior."""
    args = train_parser(DESCRIPTION, VAEOptions, prog, **TRAIN_DEFAULTS).parse_args(argv)
    if args.fit_prior is not None:
        return refit_main(args)
    return run_training(DESCRIPTION, VAETask.build, VAEOptions, load_vae_data, argv, prog, **TRAIN_DEFAULTS)
