"""GAN losses, R1, DiffAugment (Zhao et al. 2020) and its adaptive form (ADA, Karras et al. 2020).

DiffAugment: differentiable augmentation applied to real and fake images alike, so a discriminator on ~17k
images cannot simply memorise them. ADA applies the same operations, each to an image with probability p,
and moves p with the discriminator's overfitting signal r_t = E[sign(D(real))]: augmentation only as
strong as the discriminator's overfitting calls for (always-on DiffAugment once collapsed this GAN)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bloodgen_hf.errors import UsageError

GAN_LOSSES = ("bce", "hinge", "wgan-gp")


def discriminator_loss(kind: str, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    if kind == "bce":
        return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()
    if kind == "hinge":
        return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()
    if kind == "wgan-gp":
        return fake_scores.mean() - real_scores.mean()
    raise UsageError(f"unknown GAN loss {kind!r}; choose from: {', '.join(GAN_LOSSES)}")


def generator_loss(kind: str, fake_scores: torch.Tensor) -> torch.Tensor:
    if kind == "bce":  # the non-saturating loss of the original GAN paper
        return F.softplus(-fake_scores).mean()
    if kind in ("hinge", "wgan-gp"):
        return -fake_scores.mean()
    raise UsageError(f"unknown GAN loss {kind!r}; choose from: {', '.join(GAN_LOSSES)}")


@contextlib.contextmanager
def frozen(accelerator, discriminator: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The bare discriminator (no DDP bookkeeping, so not a second D forward) with its weights frozen while a
    generator's loss is built through it, so that loss's backward leaves no gradient in D (its weights are not
    in the graph, so they may require gradients again at once)."""
    critic = accelerator.unwrap_model(discriminator).requires_grad_(False)
    try:
        yield critic
    finally:
        critic.requires_grad_(True)


def frozen_scores(accelerator, discriminator, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The class-conditional discriminator's scores for the generator's loss (see `frozen`)."""
    with frozen(accelerator, discriminator) as critic:
        return critic(images, labels)


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d rec / d W|| / ||d adv / d W|| at the decoder's last weights W (VQGAN's balance), clamped to [0, 1e4]."""
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (adv_grad,) = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def reconstruction_adversarial_term(
    accelerator,
    discriminator: torch.nn.Module,
    decoder_last_layer: torch.Tensor,
    rec_loss: torch.Tensor,
    real: torch.Tensor,
    decoded: torch.Tensor,
    weight: float,
    adaptive: bool,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """An autoencoder's hinge generator loss on its reconstructions, and its weight (times the adaptive gradient
    ratio at the decoder's last layer when `adaptive`). `labels` (the batch's classes) go to a class-conditional
    discriminator.

    The frozen discriminator scores the same real + reconstructed batch as in its own step
    (`hinge_discriminator_step`): a batch-normalised one judges a batch of reconstructions alone on other
    statistics. The 64 px autoencoder's first batch-norm run did, from step 2,000 to 2,400: its generator loss
    stayed near 0 while the discriminator's step scored the reconstructions at -5."""
    with frozen(accelerator, discriminator) as critic:
        adv = generator_loss("hinge", critic(torch.cat([real, decoded]), *doubled(labels))[real.shape[0] :])
    if adaptive:
        return adv, weight * adaptive_weight(rec_loss, adv, decoder_last_layer)
    return adv, weight


def doubled(labels: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The extra arguments of a discriminator scoring real and fake halves of one batch: none, or their labels."""
    return () if labels is None else (torch.cat([labels, labels]),)


def hinge_discriminator_step(
    accelerator,
    discriminator: torch.nn.Module,
    optimizer,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """One update of a (patch) discriminator on real and detached fake images with the hinge loss, in one forward
    (which DDP needs); `labels` (of the real images, which the fakes reconstruct) for a class-conditional one.
    Returns what to log."""
    n = real.shape[0]
    scores = discriminator(torch.cat([real, fake]), *doubled(labels))
    d_loss = discriminator_loss("hinge", scores[:n], scores[n:])
    accelerator.backward(d_loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss_d": d_loss.item(), "score_real": scores[:n].mean().item(), "score_fake": scores[n:].mean().item()}


def gradient_penalty(scores: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: (||d scores / d inputs|| - 1)^2, for D's scores on real/fake interpolates."""
    (grads,) = torch.autograd.grad(scores.sum(), inputs, create_graph=True)
    return (grads.flatten(1).norm(dim=1) - 1).pow(2).mean()


def r1_penalty(real_scores: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): E||d D(real) / d real||^2, the squared gradient norm on real images (the
    caller weighs it by gamma / 2); `real_images` must require gradients and have produced `real_scores`."""
    (grads,) = torch.autograd.grad(real_scores.sum(), real_images, create_graph=True)
    return grads.flatten(1).pow(2).sum(dim=1).mean()


def augment_names(policy: str, flag: str = "DiffAugment policy") -> list[str]:
    """The operations of a comma-separated policy ('' = none), refusing an unknown one by name."""
    names = [p.strip() for p in policy.split(",") if p.strip()]
    for name in names:
        if name not in _AUGMENTS:
            raise UsageError(f"unknown {flag} {name!r}; choose from: {', '.join(_AUGMENTS)}")
    return names


def diff_augment(x: torch.Tensor, policy: str = "color,translation,cutout") -> torch.Tensor:
    """Apply the comma-separated augmentations in `policy` ('' = none), each differentiable."""
    for name in augment_names(policy):
        x = _AUGMENTS[name](x)
    return x.contiguous()


def adaptive_augment(x: torch.Tensor, policy: str, p: float) -> torch.Tensor:
    """ADA: each operation of `policy` applied to each image with probability `p` (nothing drawn at p = 0)."""
    if p <= 0:
        return x
    for name in augment_names(policy, "--ada-policy operation"):
        chosen = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p
        x = torch.where(chosen, _AUGMENTS[name](x), x)
    return x.contiguous()


def ada_adjust(p: float, overfit: float, target: float, images: int, kimg: float) -> float:
    """ADA's update of p: up when r_t = E[sign(D(real))] (`overfit`) is above `target`, down when below, by
    `images` / (kimg * 1000), so p can cross [0, 1] in `kimg` thousand images; clipped to [0, 1]."""
    step = images / (kimg * 1000)
    direction = (overfit > target) - (overfit < target)
    return min(1.0, max(0.0, p + direction * step))


def _color(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    x = x + (torch.rand(n, 1, 1, 1, device=x.device) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device) + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gy = (gy[None] + dy + 1).clamp(0, h + 1)
    gx = (gx[None] + dx + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    flat = padded.permute(0, 2, 3, 1)[torch.arange(n, device=x.device)[:, None, None], gy, gx]
    return flat.permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    inside = ((gy[None] - cy).abs() < ch // 2) & ((gx[None] - cx).abs() < cw // 2)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_AUGMENTS = {"color": _color, "translation": _translation, "cutout": _cutout}
