"""A latent pipeline with a fine-tuned decoder.

Stage 2 of the 64 px autoencoder (`bloodgen-hf train autoencoder --init-from <stage 1> --freeze-encoder`) tunes
the decoder alone: its encoder, quant_conv, scaling_factor and shift_factor stay stage 1's, so the latents a latent
model learnt are exactly the same and the model fits the new decoder unchanged, as Stable Diffusion's fine-tuned
decoders drop into its pipelines. `replace_decoder` writes the pipeline with the new autoencoder once it has checked
that the latents are the same, and records the new autoencoder in the provenance's `autoencoder` entry (every image
comes out of that decoder, so the leak checks follow its training data), with the one it replaced under `replaced`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import atomic_path
from bloodgen_hf.pipelines import BloodLDMPipeline
from bloodgen_hf.provenance import content_sha256, pipeline_provenance, portable_provenance
from bloodgen_hf.registry import load_pipeline, save_pipeline
from bloodgen_hf.training.autoencoder import ENCODER_PREFIXES
from bloodgen_hf.training.latent import autoencoder_provenance, load_autoencoder

LATENT_CONFIG = (
    "in_channels",
    "latent_channels",
    "block_out_channels",
    "sample_size",
    "scaling_factor",
    "shift_factor",
)


def latent_difference(old: AutoencoderKL, new: AutoencoderKL) -> str | None:
    """The first setting or encoder weight in which `new` makes other latents than `old`; None if none."""
    for key in LATENT_CONFIG:
        if old.config.get(key) != new.config.get(key):
            return f"{key}: {old.config.get(key)} there, {new.config.get(key)} here"
    old_weights, new_weights = old.state_dict(), new.state_dict()
    for key, value in old_weights.items():
        if key.startswith(ENCODER_PREFIXES) and not (
            key in new_weights and new_weights[key].shape == value.shape and torch.equal(new_weights[key], value)
        ):
            return f"encoder weight {key} differs"
    return None


def replaced_entry(old: dict[str, Any], folder: Path, autoencoder: str) -> dict[str, Any]:
    """The provenance's `autoencoder` entry for the new decoder: same latents (shape, scale, std), new model."""
    return {
        **old,
        "model": autoencoder,
        "sha256": content_sha256(folder),
        "provenance": autoencoder_provenance(folder),
        "replaced": {key: old.get(key) for key in ("model", "sha256")},
    }


def replace_decoder(pipeline: str, autoencoder: str, out: Path, overwrite: bool = False) -> Path:
    """Write `pipeline` (a BloodLDMPipeline: bundled name, folder or Hub repo) with the AutoencoderKL saved in folder
    `autoencoder` to `out`, refusing an autoencoder whose latents differ; `out` is replaced only with `overwrite`."""
    pipe = load_pipeline(pipeline)
    if not isinstance(pipe, BloodLDMPipeline):
        raise UsageError(f"{pipeline} is a {type(pipe).__name__}; only a latent pipeline (BloodLDMPipeline) decodes")
    new = load_autoencoder(autoencoder)
    difference = latent_difference(pipe.vae, new)
    if difference:
        raise UsageError(
            f"{autoencoder} makes other latents than {pipeline}'s autoencoder ({difference}): only a decoder tuned "
            "with `train autoencoder --init-from <its autoencoder> --freeze-encoder` fits its latent model"
        )
    provenance = pipeline_provenance(pipe) or {}
    if not provenance.get("autoencoder"):
        raise UsageError(
            f"{pipeline} records no autoencoder in its provenance; retrain it with `bloodgen-hf train ldm`"
        )
    folder = Path(autoencoder).expanduser()
    entry = replaced_entry(provenance["autoencoder"], folder, autoencoder)
    pipe.register_modules(vae=new)
    pipe.register_to_config(provenance=portable_provenance({**provenance, "autoencoder": entry}))
    with atomic_path(Path(out), is_dir=True, overwrite=overwrite) as tmp:
        save_pipeline(pipe, tmp)
    return Path(out)
