"""Shared fixtures: a tiny synthetic BloodMNIST archive and a tiny saved GAN pipeline.

Unit tests never read ../shared/data; tests that want the real archives are marked `real_data`
and skip when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

from bloodgen_hf.data import CLASS_NAMES, NUM_CLASSES

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPLIT_SIZES = {"train": 48, "val": 16, "test": 16}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state; every test starts (and leaves) without an Accelerator."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def write_fake_bloodmnist(folder: Path, size: int = 28, seed: int = 0) -> Path:
    """A MedMNIST-layout archive whose classes differ in colour, so models can learn something."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in SPLIT_SIZES.items():
        labels = np.arange(n) % NUM_CLASSES
        base = (labels[:, None] * np.array([31, 17, 23]) % 256)[:, None, None, :]
        noise = rng.integers(0, 40, size=(n, size, size, 3))
        arrays[f"{split}_images"] = np.clip(base + noise, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    name = "bloodmnist.npz" if size == 28 else f"bloodmnist_{size}.npz"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, **arrays)
    return folder


@pytest.fixture
def fake_data_dir(tmp_path: Path) -> Path:
    write_fake_bloodmnist(tmp_path / "data", 28)
    return write_fake_bloodmnist(tmp_path / "data", 64)


@pytest.fixture
def real_data_dir() -> Path:
    if not (SHARED_DATA / "bloodmnist.npz").is_file():
        pytest.skip("real BloodMNIST archives not found in ../shared/data")
    return SHARED_DATA


def tiny_gan_pipeline(seed: int = 0):
    from bloodgen_hf.models.gan import ConditionalGenerator
    from bloodgen_hf.pipelines import BloodGANPipeline

    torch.manual_seed(seed)
    gan = ConditionalGenerator(
        resolution=28, latent_dim=16, base_channels=8, embed_dim=8, class_names=list(CLASS_NAMES)
    )
    for m in gan.modules():  # non-trivial batch-norm statistics and class gains
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        for p in gan.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return BloodGANPipeline(gan=gan)


def tiny_ddpm_pipeline(seed: int = 0, resolution: int = 28, scheduler: str = "dpm++"):
    from bloodgen_hf.pipelines import BloodDDPMPipeline
    from bloodgen_hf.pipelines.pipeline_bloodgen_ddpm import make_scheduler
    from bloodgen_hf.training.ddpm import build_noise_scheduler, build_unet

    torch.manual_seed(seed)
    unet = build_unet("tiny", resolution)
    noise_scheduler = build_noise_scheduler("squaredcos_cap_v2", "v_prediction")
    return BloodDDPMPipeline(
        unet=unet, scheduler=make_scheduler(scheduler, noise_scheduler.config), class_names=list(CLASS_NAMES)
    )


def tiny_autoencoder(seed: int = 0, scaling_factor: float = 1.7, shift_factor: float | None = None):
    """A stock diffusers AutoencoderKL, 4x downsampling: 32x32 RGB <-> 4x8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def tiny_ldm_pipeline(seed: int = 0, scaling_factor: float = 1.7):
    """A BloodLDMPipeline of random weights: tiny_autoencoder and a tiny flow UNet on its 4x8x8 latents."""
    from bloodgen_hf.pipelines import BloodLDMPipeline
    from bloodgen_hf.pipelines.pipeline_bloodgen_ddpm import make_scheduler
    from bloodgen_hf.training.ddpm import build_noise_scheduler, build_unet

    vae = tiny_autoencoder(seed, scaling_factor)
    unet = build_unet("tiny", 8, in_channels=4)
    noise_scheduler = build_noise_scheduler("squaredcos_cap_v2", "flow")
    return BloodLDMPipeline(
        vae=vae, unet=unet, scheduler=make_scheduler("dpm++", noise_scheduler.config), class_names=list(CLASS_NAMES)
    )


# --- evaluation at 64 px: a tiny 64 px LDM, a tiny 64 px BloodNet, evaluate's options with them --------------

SMALL_EVAL = ["--runs", "1", "--n", "20", "--memorization-n", "10", "--batch-size", "10"]  # 20 of the 80 fake images


def tiny_ldm_64():
    """A BloodLDMPipeline of random weights that makes 64 px images: tiny_autoencoder (4x) on 4x16x16 latents, two
    sampling steps by default."""
    from bloodgen_hf.pipelines import BloodLDMPipeline
    from bloodgen_hf.pipelines.pipeline_bloodgen_ddpm import make_scheduler
    from bloodgen_hf.training.ddpm import build_noise_scheduler, build_unet

    vae = tiny_autoencoder(0)
    unet = build_unet("tiny", 16, in_channels=4)
    scheduler = make_scheduler("dpm++", build_noise_scheduler("squaredcos_cap_v2", "flow").config)
    return BloodLDMPipeline(
        vae=vae, unet=unet, scheduler=scheduler, class_names=list(CLASS_NAMES), default_num_inference_steps=2
    )


def saved_bloodnet(folder: Path, resolution: int) -> Path:
    """A tiny BloodNet of random weights for `resolution` px, saved as <folder>/classifier."""
    from bloodgen_hf.evaluation.bloodnet import BloodNet

    torch.manual_seed(0)
    net = BloodNet(resolution=resolution, channels=[4, 8], blocks_per_stage=1, class_names=list(CLASS_NAMES))
    net.save_pretrained(folder / "classifier")
    return folder


@pytest.fixture
def ldm_64_dir(tmp_path: Path) -> Path:
    from bloodgen_hf.registry import save_pipeline

    return save_pipeline(tiny_ldm_64(), tmp_path / "ldm-64")


@pytest.fixture
def args_64(fake_data_dir, tmp_path) -> list:
    """Evaluation options with a BloodNet trained at 64 px (extractor and classifier)."""
    bloodnet = saved_bloodnet(tmp_path / "bloodnet-64", 64)
    return [
        "--extractor", "bloodnet", "--bloodnet", bloodnet, "--data-dir", fake_data_dir,
        "--cache-dir", tmp_path / "cache", "--device", "cpu",
    ]  # fmt: skip


def one_error_line(result, code: int = 2) -> str:
    """The one `error:` line a CLI refusal prints (typer's CliRunner result), after checking its exit code."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def tiny_vae(seed: int = 0, resolution: int = 28, latent_dim: int | None = 8, backbone: str = "autoencoder_kl"):
    """A ConditionalAutoencoderKL of random weights, v1's backbone or v2's ("resnet"), 2x downsampling."""
    from bloodgen_hf.models.vae import ConditionalAutoencoderKL

    torch.manual_seed(seed)
    vae = ConditionalAutoencoderKL(
        resolution=resolution,
        class_embed_dim=4,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        latent_channels=2,
        latent_dim=latent_dim,
        decoder_sigma=0.2,
        class_names=list(CLASS_NAMES),
        backbone=backbone,
    )
    with torch.no_grad():  # livelier than the initialisation: larger class embeddings and posterior spread
        vae.class_embedding.weight.mul_(3.0)
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def tiny_vae_pipeline(
    seed: int = 0, resolution: int = 28, latent_dim: int | None = 8, backbone: str = "autoencoder_kl"
):
    from bloodgen_hf.pipelines import BloodVAEPipeline

    return BloodVAEPipeline(vae=tiny_vae(seed, resolution, latent_dim, backbone))


def seeded(*seeds: int) -> list[torch.Generator]:
    """One generator per image, as the pipelines take them."""
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture
def tiny_gan_dir(tmp_path: Path) -> Path:
    from bloodgen_hf.registry import save_pipeline

    return save_pipeline(tiny_gan_pipeline(), tmp_path / "tiny_gan")


@pytest.fixture(autouse=True)
def _quiet_and_small(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("BLOODGEN_DATA_DIR", raising=False)
    monkeypatch.delenv("BLOODGEN_DEBUG", raising=False)  # tests that want tracebacks set it themselves
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pixel_fingerprint(images: torch.Tensor) -> tuple[float, float]:
    """Two weighted sums of every pixel (fixed random weights in [0.5, 1.5)): a change to any image moves them,
    while the last-bit differences between CPUs' kernels (AVX2 or AVX-512, one thread or two) do not. A hash
    of the rounded pixels did: a value at a rounding boundary flips on another CPU."""
    flat = images.double().flatten()
    weights = torch.rand((2, flat.numel()), generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    return tuple(float(v) for v in (weights + 0.5) @ flat)
