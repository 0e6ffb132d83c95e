"""A latent pipeline takes a decoder tuned with --freeze-encoder (training/replace_decoder.py), and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bloodgen_hf.errors import UsageError
from bloodgen_hf.pipelines.blood_pipeline_utils import flatten_provenance
from bloodgen_hf.provenance import content_sha256, training_provenance
from bloodgen_hf.registry import load_pipeline, save_pipeline
from bloodgen_hf.training.replace_decoder import replace_decoder
from tests.conftest import tiny_autoencoder, tiny_ldm_pipeline


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def save_autoencoder(vae, folder: Path) -> Path:
    vae.save_pretrained(folder, safe_serialization=True)
    record = training_provenance("bloodmnist", 32, "train", 48)
    (folder / "provenance.json").write_text(json.dumps(flatten_provenance(record)))
    return folder


@pytest.fixture
def ldm_dir(tmp_path: Path) -> Path:
    """A saved tiny LDM whose provenance names its autoencoder, as `train ldm` records it."""
    pipe = tiny_ldm_pipeline()
    entry = {
        "model": "ae-stage-1",
        "sha256": "0" * 64,
        "provenance": training_provenance("bloodmnist", 32, "train", 48),
    }
    pipe.register_to_config(provenance={**training_provenance("bloodmnist", 32, "train", 48), "autoencoder": entry})
    return save_pipeline(pipe, tmp_path / "ldm")


def tuned_decoder(seed: int = 0, **config) -> torch.nn.Module:
    """tiny_ldm_pipeline's autoencoder with its decoder moved, as --freeze-encoder leaves it."""
    vae = tiny_autoencoder(seed, **config)
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(0.5)
    return vae


def draw(pipe, output_type: str = "np"):
    """Two images (or, with output_type="latent", their latents) at fixed seeds and classes."""
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    return pipe(2, class_labels=[0, 5], generator=generators, num_inference_steps=2, output_type=output_type).images


def test_the_new_decoder_decodes_the_same_latents_and_is_recorded(ldm_dir, tmp_path):
    ae = save_autoencoder(tuned_decoder(), tmp_path / "ae-stage-2")
    out = replace_decoder(str(ldm_dir), str(ae), tmp_path / "ldm-2")
    before, after = load_pipeline(str(ldm_dir)), load_pipeline(str(out))
    assert torch.equal(draw(before, "latent"), draw(after, "latent"))  # the UNet and scheduler are unchanged
    assert not np.array_equal(draw(before), draw(after))  # the decoder is the new one
    assert torch.equal(after.vae.decoder.conv_out.weight, tuned_decoder().decoder.conv_out.weight)
    entry = after.config.provenance["autoencoder"]
    assert entry["sha256"] == content_sha256(ae) and entry["replaced"]["model"] == "ae-stage-1"
    assert entry["provenance"]["split"] == "train"  # the leak checks follow the new decoder's data


@pytest.mark.parametrize(
    ("vae", "named"),
    [
        (lambda: tiny_autoencoder(seed=1), "encoder weight"),  # another encoder
        (lambda: tuned_decoder(scaling_factor=2.0), "scaling_factor: 1.7 there, 2.0 here"),
    ],
)
def test_an_autoencoder_that_makes_other_latents_is_refused(ldm_dir, tmp_path, vae, named):
    ae = save_autoencoder(vae(), tmp_path / "other")
    with pytest.raises(UsageError, match="makes other latents") as err:
        replace_decoder(str(ldm_dir), str(ae), tmp_path / "out")
    assert named in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_kept_without_overwrite(ldm_dir, tmp_path):
    ae = save_autoencoder(tuned_decoder(), tmp_path / "ae")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        replace_decoder(str(ldm_dir), str(ae), out)
    assert (out / "keep.txt").read_text() == "mine"
    replace_decoder(str(ldm_dir), str(ae), out, overwrite=True)
    assert (out / "model_index.json").is_file() and not (out / "keep.txt").exists()


def test_the_cli_writes_it_and_refuses_another_encoder_in_one_line(ldm_dir, tmp_path):
    from typer.testing import CliRunner

    from bloodgen_hf.cli import app

    good = save_autoencoder(tuned_decoder(), tmp_path / "ae")
    result = CliRunner().invoke(app, ["replace-decoder", str(ldm_dir), str(good), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    bad = save_autoencoder(tiny_autoencoder(seed=1), tmp_path / "other")
    result = CliRunner().invoke(app, ["replace-decoder", str(ldm_dir), str(bad), "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and not (tmp_path / "b").exists()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "makes other latents" in lines[0]
