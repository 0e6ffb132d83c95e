"""Every bloodgen pipeline knows the side of its images (`resolution`) from its components' configs, so evaluation
settles the scoring resolution without drawing an image: the DDPM's UNet sample_size, the GAN's and the VAE's
configured size, the LDM's latent side times its autoencoder's scale factor. On the tiny test pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from bloodgen_hf.errors import UsageError
from bloodgen_hf.evaluation.runner import evaluate_to_folder
from bloodgen_hf.pipelines import BloodDDPMPipeline, BloodGANPipeline, BloodLDMPipeline
from bloodgen_hf.registry import load_pipeline, save_pipeline
from tests.conftest import tiny_ddpm_pipeline, tiny_gan_pipeline, tiny_ldm_pipeline, tiny_vae_pipeline

PIPELINES = {
    "gan-28": (tiny_gan_pipeline, 28),
    "ddpm-28": (tiny_ddpm_pipeline, 28),
    "ddpm-32": (lambda: tiny_ddpm_pipeline(resolution=32), 32),
    "vae-28": (tiny_vae_pipeline, 28),
    "vae-32": (lambda: tiny_vae_pipeline(resolution=32), 32),
    "ldm-32": (tiny_ldm_pipeline, 32),  # 8x8 latents, 4x autoencoder
}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared, busy CPU two threads wait on each other; results are the same."""
    torch.set_num_threads(1)


def draw(pipe) -> np.ndarray:
    """Two images (uint8 NHWC side lengths are what matters), with as few sampler steps as the family takes."""
    steps = {"num_inference_steps": 2} if isinstance(pipe, BloodDDPMPipeline) else {}
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    return pipe(class_labels=[0, 3], generator=generators, output_type="np", **steps).images


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_resolution_is_the_side_of_the_images_the_pipeline_makes(name):
    build, side = PIPELINES[name]
    pipe = build()
    assert type(pipe.resolution) is int and pipe.resolution == side
    assert draw(pipe).shape == (2, side, side, 3)


def test_resolution_is_read_only():
    pipe = tiny_gan_pipeline()
    with pytest.raises(AttributeError):
        pipe.resolution = 64


def test_the_ldm_resolution_is_the_latent_side_times_the_autoencoder_factor():
    pipe = tiny_ldm_pipeline()
    assert pipe.unet.config.sample_size == 8 and pipe.vae_scale_factor == 4
    assert pipe.resolution == 32 == pipe.vae.config.sample_size


def test_a_saved_pipeline_loads_with_the_same_resolution(tmp_path):
    """The size comes from the saved configs alone: the LDM's from two components, its UNet and autoencoder."""
    loaded = load_pipeline(str(save_pipeline(tiny_ldm_pipeline(), tmp_path / "ldm")))
    assert isinstance(loaded, BloodLDMPipeline) and loaded.resolution == 32


def test_a_unet_that_is_not_square_has_no_resolution():
    pipe = tiny_ddpm_pipeline()
    unet = UNet2DModel.from_config({**pipe.unet.config, "sample_size": [28, 32]})
    wide = BloodDDPMPipeline(unet=unet, scheduler=pipe.scheduler, class_names=pipe.class_names)
    with pytest.raises(UsageError, match="not square"):
        wide.resolution  # noqa: B018


def test_evaluation_settles_the_size_without_drawing_an_image(monkeypatch, tmp_path):
    """A 28 px model at --resolution 64 without --upsample is refused from its config, before any sampling (which
    here would fail) and before the real data or the evaluator are needed."""

    def no_sampling(self, *args, **kwargs):
        raise AssertionError("the pipeline was asked for images")

    monkeypatch.setattr(BloodGANPipeline, "__call__", no_sampling)
    with pytest.raises(UsageError, match="makes 28 px images, not 64 px"):
        evaluate_to_folder(
            tiny_gan_pipeline(), "gan", tmp_path / "out", None, None, None, data_dir=tmp_path, resolution=64
        )
