"""`bloodgen-hf set-defaults`: a copy of a diffusion model that samples with the settings chosen on val."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bloodgen_hf.cli import app
from bloodgen_hf.errors import UsageError
from bloodgen_hf.pipelines.pipeline_bloodgen_ddpm import in_guidance_interval
from bloodgen_hf.registry import load_pipeline, save_pipeline
from bloodgen_hf.training.student import outside_guidance_interval
from tests.conftest import one_error_line, tiny_ddpm_pipeline, tiny_gan_pipeline, tiny_ldm_pipeline
from tests.test_ddpm import sample


def provenanced(pipe):
    pipe.register_to_config(provenance={"dataset": "bloodmnist", "resolution": 28, "split": "train"})
    return pipe


def run(*args: str):
    return CliRunner().invoke(app, ["set-defaults", *args])


@pytest.mark.parametrize("make", [tiny_ddpm_pipeline, tiny_ldm_pipeline])
def test_the_copy_samples_with_the_new_defaults_and_the_same_weights(make, tmp_path: Path):
    source = save_pipeline(provenanced(make()), tmp_path / "source")
    out = tmp_path / "copy"
    result = run(str(source), "--out", str(out), "--guidance", "3", "--steps", "3", "--guidance-interval", "0,0.7")
    assert result.exit_code == 0, result.output
    assert "guidance 1.0 -> 3.0, steps 10 -> 3, guidance interval None -> (0.0, 0.7)" in result.output
    original, copy = load_pipeline(str(source)), load_pipeline(str(out))
    assert copy.config.default_guidance_scale == 3.0 and copy.config.default_num_inference_steps == 3
    assert copy.config.default_guidance_interval == [0.0, 0.7]
    for name, model in original.components.items():
        if isinstance(model, torch.nn.Module):
            assert all(
                torch.equal(a, b)
                for a, b in zip(model.state_dict().values(), copy.components[name].state_dict().values())
            )
    np.testing.assert_array_equal(
        sample(copy), sample(original, guidance_scale=3.0, num_inference_steps=3, guidance_interval=(0, 0.7))
    )
    provenance = copy.config.provenance
    assert provenance["split"] == "train"  # the same weights: trained on the same data
    assert provenance["sampling_defaults"]["was"] == {
        "default_guidance_scale": 1.0,
        "default_num_inference_steps": 10,
        "default_guidance_interval": None,
    }


def test_unset_defaults_are_kept(tmp_path: Path):
    pipe = tiny_ddpm_pipeline()
    pipe.register_to_config(default_guidance_scale=2.0, default_guidance_interval=[0.2, 0.85])
    source = save_pipeline(provenanced(pipe), tmp_path / "source")
    assert run(str(source), "--out", str(tmp_path / "copy"), "--steps", "4").exit_code == 0
    copy = load_pipeline(str(tmp_path / "copy"))
    assert copy.config.default_guidance_scale == 2.0 and copy.config.default_guidance_interval == [0.2, 0.85]
    assert copy.config.default_num_inference_steps == 4


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "nothing to set: pass --guidance, --steps or --guidance-interval"),
        (("--guidance-interval", "0.9,0.1"), "needs 0 <= lo < hi <= 1, got 0.9,0.1"),
        (("--guidance-interval", "half"), "--guidance-interval takes two numbers LO,HI"),
        (("--guidance", "-1"), "guidance_scale (--guidance) must be >= 0"),
        (("--steps", "0"), "num_inference_steps (--steps) must be a positive integer"),
    ],
)
def test_bad_values_are_one_line_and_write_nothing(args, message, tmp_path: Path):
    source = save_pipeline(provenanced(tiny_ddpm_pipeline()), tmp_path / "source")
    assert message in one_error_line(run(str(source), "--out", str(tmp_path / "copy"), *args))
    assert not (tmp_path / "copy").exists()


def test_a_gan_or_an_existing_output_is_refused(tmp_path: Path):
    gan = save_pipeline(tiny_gan_pipeline(), tmp_path / "gan")
    line = one_error_line(run(str(gan), "--out", str(tmp_path / "copy"), "--guidance", "2"))
    assert "is a BloodGANPipeline: only a diffusion pipeline has sampling defaults" in line
    source = save_pipeline(provenanced(tiny_ddpm_pipeline()), tmp_path / "source")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert "--overwrite" in one_error_line(run(str(source), "--out", str(tmp_path / "taken"), "--guidance", "2"))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("make", [tiny_ddpm_pipeline, tiny_ldm_pipeline])
def test_replaced_and_with_scheduler_share_the_models_and_keep_the_other_settings(make):
    """The one way a pipeline is copied: a new scheduler or new defaults, the models and the rest kept."""
    pipe = provenanced(make()).replaced(default_guidance_scale=2.0, default_guidance_interval=(0.0, 0.7))
    assert (pipe.config.default_guidance_scale, pipe.config.default_guidance_interval) == (2.0, [0.0, 0.7])
    other = pipe.with_scheduler("unipc")  # a flow model gets the flow version of it
    assert type(other) is type(pipe) and type(other.scheduler).__name__ == "UniPCMultistepScheduler"
    assert {k: other.config.get(k) for k in pipe.SAMPLING_DEFAULTS} == {
        k: pipe.config.get(k) for k in pipe.SAMPLING_DEFAULTS
    }
    assert other.config.provenance == pipe.config.provenance and other.class_names == pipe.class_names
    assert all(other.components[k] is v for k, v in pipe.components.items() if k != "scheduler")
    with pytest.raises(TypeError, match="not \\['unet'\\]"):
        pipe.replaced(unet=None)
    with pytest.raises(UsageError, match="needs 0 <= lo < hi <= 1"):
        pipe.replaced(default_guidance_interval=(0.7, 0.2))


def test_the_guidance_interval_test_is_the_same_for_one_level_and_a_tensor_of_them():
    levels = torch.tensor([0.0, 0.1, 0.7, 0.71, 1.0])
    for interval in (None, (0.0, 0.7), (0.2, 0.85)):
        as_tensor = in_guidance_interval(levels, interval).tolist()
        assert as_tensor == [bool(in_guidance_interval(float(t), interval)) for t in levels]
    assert in_guidance_interval(levels, (0.0, 0.7)).tolist() == [False, True, True, False, False]
    assert outside_guidance_interval(levels, [0.0, 0.7]).tolist() == [True, False, False, True, True]
    assert not outside_guidance_interval(levels, None).any()
