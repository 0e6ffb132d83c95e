"""A diffusion pipeline that samples with other defaults: guidance, steps, guidance interval.

The settings chosen on val (a guidance sweep, a guidance interval) belong with the model: a copy saved with them
as its defaults samples that way in `sample`, `evaluate`, `compare`, on the Hub without bloodgen-hf, and when it
is the teacher of `train student`, whose pairs are drawn at the teacher's defaults. The weights are the same, so
the provenance (the data it was trained on) is too; `sampling_defaults` records where the copy came from and what
it sampled with before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import atomic_path
from bloodgen_hf.pipelines import BloodDDPMPipeline
from bloodgen_hf.provenance import pipeline_provenance, portable_provenance
from bloodgen_hf.registry import load_pipeline, save_pipeline

DEFAULT_KEYS = BloodDDPMPipeline.SAMPLING_DEFAULTS


def sampling_defaults(pipe: BloodDDPMPipeline) -> dict[str, Any]:
    """What the pipeline samples with when its caller passes nothing (interval None: every step guided)."""
    return {key: pipe.config.get(key) for key in DEFAULT_KEYS}


def with_defaults(
    pipe: BloodDDPMPipeline,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> BloodDDPMPipeline:
    """A pipeline sharing `pipe`'s models with the given defaults (the others kept), checked as a new one is."""
    chosen = dict(zip(DEFAULT_KEYS, (guidance_scale, num_inference_steps, guidance_interval), strict=True))
    return pipe.replaced(**{key: value for key, value in chosen.items() if value is not None})


def save_with_defaults(
    model: str,
    out: Path,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `model` (bundled name, folder or Hub repo) to `out` with new sampling defaults; the defaults it had.
    Refused in one line: a model without a sampler (GAN, VAE), nothing to set, or a bad value."""
    pipe = load_pipeline(model)
    if not isinstance(pipe, BloodDDPMPipeline):
        raise UsageError(f"{model} is a {type(pipe).__name__}: only a diffusion pipeline has sampling defaults")
    if guidance_scale is None and num_inference_steps is None and guidance_interval is None:
        raise UsageError("nothing to set: pass --guidance, --steps or --guidance-interval")
    before = sampling_defaults(pipe)
    copy = with_defaults(pipe, guidance_scale, num_inference_steps, guidance_interval)
    provenance = pipeline_provenance(pipe)
    if provenance is not None:
        record = {"copied_from": model, "was": before}
        copy.register_to_config(provenance=portable_provenance({**provenance, "sampling_defaults": record}))
    with atomic_path(Path(out), is_dir=True, overwrite=overwrite) as tmp:
        save_pipeline(copy, tmp)
    return before
