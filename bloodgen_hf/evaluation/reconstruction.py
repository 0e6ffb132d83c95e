"""How well an autoencoder (diffusers' AutoencoderKL, or the class-conditional VAE) reproduces real images: PSNR,
SSIM, and the FD of its reconstructions against the originals.

That FD is the floor a latent model on this autoencoder can reach: its samples are decoded by the same
decoder, so they cannot look more real than the decoder's reconstructions of real cells. Report it on the
test split, which the autoencoder never trained on (training/autoencoder.py refuses it).

Reconstructions use the posterior mean (no sampling) and are rounded to uint8 as saved images are; PSNR
and SSIM compare them with the originals in [0, 1] (image_quality.py), per image, then averaged.
The k-NN recall of the reconstructions against the originals guides a latent model's recall the same way: a kind
of cell the decoder cannot draw is one its samples cannot cover (a guide, not a bound: k-NN recall also depends
on how the samples spread).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch

from bloodgen_hf.data import DEFAULT_DATASET, load_data, to_uint8
from bloodgen_hf.errors import UsageError
from bloodgen_hf.evaluation.features import FeatureExtractor
from bloodgen_hf.evaluation.metrics import fd_from_features, precision_recall_density_coverage
from bloodgen_hf.evaluation.protocol import Protocol
from bloodgen_hf.image_quality import psnr, ssim
from bloodgen_hf.training.autoencoder import ENCODER_PREFIXES, posterior_mean_reconstructions, posterior_means


def reconstruct(vae, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 NHWC reconstructions of uint8 NHWC `images`: decode(posterior mean of encode(x)), as training's grids."""
    images_uint8 = torch.from_numpy(np.ascontiguousarray(images))
    return posterior_mean_reconstructions(vae, images_uint8, batch_size).numpy()


def reconstruct_conditional(pipe, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 NHWC reconstructions by a class-conditional VAE pipeline (`BloodVAEPipeline`), each image through its
    own class: its `reconstruct` with the labels given, `batch_size` at a time. The samples' floor: they are decoded
    by the same decoder from the prior fitted to these posterior means."""
    if len(images) != len(labels):
        raise UsageError(f"{len(images)} images but {len(labels)} labels")
    out = []
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start : start + batch_size])
        classes = np.asarray(labels[start : start + batch_size]).tolist()
        decoded = pipe.reconstruct(batch, class_labels=classes, output_type="pt")
        out.append(to_uint8(decoded.images.float().cpu() * 2 - 1).numpy())
    return np.concatenate(out) if out else np.zeros_like(images)


def unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float64 NCHW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double() / 255.0


def quality(real: np.ndarray, reconstructed: np.ndarray, batch_size: int = 256) -> dict[str, float]:
    """Mean per-image PSNR (dB; inf if any image is reproduced exactly), SSIM, MSE and L1 in [0, 1] units."""
    if real.shape != reconstructed.shape:
        raise UsageError(f"{real.shape} real images against {reconstructed.shape} reconstructions")
    psnrs, ssims, squared, absolute = [], [], 0.0, 0.0
    for start in range(0, len(real), batch_size):
        a, b = unit_range(real[start : start + batch_size]), unit_range(reconstructed[start : start + batch_size])
        psnrs.append(psnr(b, a))
        ssims.append(ssim(b, a))
        squared += (a - b).pow(2).flatten(1).mean(1).sum().item()
        absolute += (a - b).abs().flatten(1).mean(1).sum().item()
    n = len(real)
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "mse": squared / n,
        "l1": absolute / n,
        "psnr_of_mean_mse": 10 * math.log10(n / squared) if squared > 0 else math.inf,
    }


def accuracy_by_class(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{class index (as a JSON key): share of that class's images predicted as it}, for the classes present. The
    decoder can keep one class's look far worse than the average shows (basophils' granules at 64 px)."""
    return {str(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels).tolist()}


def encoder_fingerprint(vae) -> str:
    """sha256 of the weights that make the latents (an AutoencoderKL's `encoder.*` and `quant_conv.*`): equal for a
    stage-2 decoder trained with `--freeze-encoder` and its stage 1, whose latents are the same, so one latent
    probe serves both."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(ENCODER_PREFIXES):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def latent_probe(
    vae,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 256,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> dict:
    """What the latents alone keep of each cell's class, with no decoder: a linear softmax classifier fitted on the
    flattened posterior means of `train_images` (standardised with their statistics; full-batch L-BFGS, L2
    `weight_decay`), scored on those of `images`. Beside the reconstructions' class accuracy it tells the encoder's
    losses from the decoder's: a class the probe finds and the reconstructions lose is lost in the decoder. Linear,
    so a lower bound of what the latents hold. No random numbers: the same inputs give the same scores."""
    if len(train_images) != len(train_labels) or len(images) != len(labels):
        raise UsageError("latent_probe: every image needs a label")

    def latents(x: np.ndarray) -> torch.Tensor:
        return posterior_means(vae, torch.from_numpy(np.ascontiguousarray(x)), batch_size).flatten(1).double()

    labels = np.asarray(labels)
    train, test = latents(train_images), latents(images)
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    train, test = (train - mean) / std, (test - mean) / std
    targets = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    num_classes = int(max(targets.max().item(), labels.max())) + 1
    weight = torch.zeros(train.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train @ weight + bias, targets) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # L-BFGS runs the closure with gradients on, even under torch.no_grad()
    predicted = (test @ weight + bias).argmax(1).numpy()
    return {
        "probe_accuracy": float((predicted == labels).mean()),
        "probe_accuracy_by_class": accuracy_by_class(predicted, labels),
    }


def reconstruction_report(
    vae,
    images: np.ndarray,
    extractor: FeatureExtractor | None = None,
    batch_size: int = 256,
    reconstructions: np.ndarray | None = None,
    real_features: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    nearest_k: int = Protocol.nearest_k,
) -> dict[str, float]:
    """PSNR and SSIM of `vae`'s reconstructions of uint8 NHWC `images`, and with an `extractor` (e.g.
    BloodNetExtractor.load()) the FD between the reconstructions' and the originals' features, keyed
    `fd_<extractor.name>`; with `labels` too, and an extractor that classifies, the share of reconstructions
    it puts in their image's class (`class_accuracy`: the ceiling for a latent model's class accuracy, to
    compare with the extractor's accuracy on the originals), and that share class by class
    (`class_accuracy_by_class`). With more than `nearest_k` images, the k-NN `precision` and `recall` of the
    reconstructions' features against the originals' (as `evaluate --metrics pr` with the same k and as many
    images). Pass `reconstructions` (from `reconstruct`) to
    score ones already made, and `real_features` (the extractor's of `images`) when several autoencoders are
    scored on the same images."""
    if len(images) < 2:
        raise UsageError(f"a reconstruction report needs at least 2 images, got {len(images)}")
    if reconstructions is None:
        reconstructions = reconstruct(vae, images, batch_size)
    report: dict[str, float] = {"num_images": len(images), **quality(images, reconstructions, batch_size)}
    if extractor is not None:
        real = real_features
        if real is None:
            real = extractor.extract(images, progress=False, desc="real").features
        fake = extractor.extract(reconstructions, progress=False, desc="reconstructions")
        report[f"fd_{extractor.name}"] = fd_from_features(real, fake.features)
        if len(images) > nearest_k:
            manifold = precision_recall_density_coverage(real, fake.features, nearest_k)
            report.update(precision=manifold["precision"], recall=manifold["recall"])
        if labels is not None and fake.probs is not None:
            predicted, labels = fake.probs.argmax(1), np.asarray(labels)
            report["class_accuracy"] = float((predicted == labels).mean())
            report["class_accuracy_by_class"] = accuracy_by_class(predicted, labels)
    return report


def evaluate_autoencoder(
    model: str | os.PathLike,
    split: str = "test",
    data_dir: str | os.PathLike | None = None,
    dataset: str = DEFAULT_DATASET,
    extractor: FeatureExtractor | None = None,
    max_images: int | None = None,
) -> tuple[dict, np.ndarray]:
    """The report of a saved AutoencoderKL folder on a split at its own resolution (`sample_size`), with the
    split's name; and the reconstructions, for pictures or further metrics."""
    from diffusers import AutoencoderKL

    from bloodgen_hf.registry import load_component

    vae = load_component(AutoencoderKL, Path(model)).eval()  # errors name the file
    resolution = int(vae.config.sample_size)
    data = load_data(dataset, split, resolution, data_dir)
    images, labels = data.images[:max_images], data.labels[:max_images]
    reconstructions = reconstruct(vae, images)
    report = reconstruction_report(vae, images, extractor, reconstructions=reconstructions, labels=labels)
    return {"split": split, "resolution": resolution, **report}, reconstructions
