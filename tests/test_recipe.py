"""Issue 12: the DDPM v2 recipe options (min-SNR-gamma, class-balanced batches, flow matching, UNet shape,
CPU budget) and `--init-from` for every train script."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from bloodgen_hf.pipelines.pipeline_bloodgen_ddpm import make_scheduler
from bloodgen_hf.registry import load_pipeline, save_pipeline
from bloodgen_hf.training import ddpm, gan
from bloodgen_hf.training.core import TrainConfig, epoch_batches, init_from_pretrained
from tests.test_ddpm import sample, train_args


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- min-SNR-gamma -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_closed_form(prediction_type):
    scheduler = ddpm.build_noise_scheduler("squaredcos_cap_v2", prediction_type)
    timesteps = torch.tensor([0, 10, 100, 400, 700, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    expected = expected / snr if prediction_type == "epsilon" else expected / (snr + 1)
    weights = ddpm.min_snr_weights(scheduler, timesteps, prediction_type, 5.0)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-6)
    assert weights[0] < weights[-1] if prediction_type == "epsilon" else weights[0] < 0.2
    assert torch.equal(ddpm.min_snr_weights(scheduler, timesteps, prediction_type, 0.0), torch.ones(6))


def test_snr_gamma_is_refused_where_it_has_no_meaning(fake_data_dir, tmp_path):
    with pytest.raises(SystemExit, match="--snr-gamma weights the DDPM targets"):
        ddpm.main(train_args(fake_data_dir, tmp_path / "r", "--prediction-type", "flow", "--snr-gamma", "5"))
    with pytest.raises(SystemExit, match="--snr-gamma must be >= 0"):
        ddpm.main(train_args(fake_data_dir, tmp_path / "r", "--snr-gamma", "-1"))


# --- class-balanced batches ---------------------------------------------------------------------------


def test_balanced_batches_draw_every_class_equally_and_deterministically():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    order = epoch_batches(len(labels), 50, seed=3, epoch=1, rank=0, world=1, labels=labels)
    shares = torch.bincount(labels[order.flatten()], minlength=3).double() / order.numel()
    torch.testing.assert_close(shares, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.05, rtol=0)
    assert torch.equal(order, epoch_batches(len(labels), 50, seed=3, epoch=1, rank=0, world=1, labels=labels))
    assert not torch.equal(order, epoch_batches(len(labels), 50, seed=3, epoch=2, rank=0, world=1, labels=labels))
    plain = epoch_batches(len(labels), 50, seed=3, epoch=1, rank=0, world=1)
    assert torch.bincount(labels[plain.flatten()])[2] <= 10  # a permutation never repeats the rare class


# --- flow matching --------------------------------------------------------------------------------------


def test_flow_matching_trains_and_samples_with_flow_schedulers(fake_data_dir, tmp_path):
    out = tmp_path / "flow"
    ddpm.main(
        train_args(
            fake_data_dir,
            out,
            "--prediction-type",
            "flow",
            "--max-steps",
            "20",
            "--lr",
            "2e-3",
            "--lr-warmup-steps",
            "0",
        )
    )
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]), losses
    pipe = load_pipeline(str(out / "pipeline"))
    assert type(pipe.scheduler) is DPMSolverMultistepScheduler and pipe.scheduler.config.use_flow_sigmas
    images = sample(pipe, num_inference_steps=3)
    assert images.shape == (4, 28, 28, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(images, sample(pipe, num_inference_steps=3))
    euler = pipe.with_scheduler("euler")
    assert type(euler.scheduler) is FlowMatchEulerDiscreteScheduler
    assert not np.array_equal(sample(euler, num_inference_steps=3), images)
    with pytest.raises(ValueError, match="unknown scheduler 'ddim'; choose from: euler, dpm\\+\\+, unipc"):
        pipe.with_scheduler("ddim")


def test_a_saved_flow_shift_survives_a_scheduler_swap():
    """A few-step model may be bundled with its sigmas shifted (`flow_shift`); `--scheduler` must keep the shift."""
    config = ddpm.build_noise_scheduler("squaredcos_cap_v2", "flow").config
    shifted = make_scheduler("dpm++", {**config, "flow_shift": 2.0})
    assert shifted.config.flow_shift == 2.0
    assert make_scheduler("euler", shifted.config).config.shift == 2.0
    assert make_scheduler("unipc", make_scheduler("euler", shifted.config).config).config.flow_shift == 2.0
    shifted.set_timesteps(2)
    plain = make_scheduler("dpm++", config)
    plain.set_timesteps(2)
    assert shifted.sigmas[1] > plain.sigmas[1] == pytest.approx(0.5, abs=1e-3)  # the middle step moves towards noise


# --- UNet shape and the CPU budget --------------------------------------------------------------------


def test_unet_shape_overrides_and_their_errors():
    unet = ddpm.build_unet("tiny", 28, channels=(16, 32, 64), layers_per_block=2, attention_levels=2)
    assert tuple(unet.config.block_out_channels) == (16, 32, 64) and unet.config.layers_per_block == 2
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    with pytest.raises(ValueError, match="multiple of 8"):
        ddpm.build_unet("tiny", 28, channels=(16, 30))
    with pytest.raises(ValueError, match="halve 28 pixels 3 times"):
        ddpm.build_unet("tiny", 28, channels=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="--attention-levels must be between 0 and 3"):
        ddpm.build_unet("tiny", 28, attention_levels=4)
    with pytest.raises(ValueError, match="comma-separated integers"):
        ddpm.parse_channels("16;32")


@pytest.mark.parametrize(("resolution", "levels"), [(32, 3), (36, 3), (96, 4)])
def test_resolutions_without_a_preset_entry_get_the_nearest_layout(resolution, levels):
    unet = ddpm.build_unet("tiny", resolution)
    assert len(unet.config.block_out_channels) == levels
    x = torch.randn(1, 3, resolution, resolution)
    assert unet(x, torch.tensor([10]), class_labels=torch.tensor([0])).sample.shape == x.shape


def test_cpu_budget_stops_the_run_and_saves_it(fake_data_dir, tmp_path):
    out = tmp_path / "budget"
    ddpm.main(train_args(fake_data_dir, out, "--cpu-budget-minutes", "0.000001", "--max-steps", "50"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 1 and logged[-1]["cpu_minutes"] > 0
    assert (out / "pipeline" / "model_index.json").is_file()
    assert (out / "checkpoints" / "checkpoint-0000001").is_dir()
    with pytest.raises(SystemExit, match="--cpu-budget-minutes must be positive"):
        ddpm.main(train_args(fake_data_dir, tmp_path / "b2", "--cpu-budget-minutes", "0"))


def test_data_smaller_than_one_batch_is_refused_before_anything_is_written(fake_data_dir, tmp_path):
    out = tmp_path / "too_small"  # the fake train split holds 48 images
    with pytest.raises(SystemExit, match="48 training images make no whole batch of 64 .* lower --batch-size"):
        ddpm.main(train_args(fake_data_dir, out, "--batch-size", "64", "--split", "train"))
    assert not out.exists()


# --- --init-from ----------------------------------------------------------------------------------------


def test_init_from_gives_the_source_weights_at_step_zero(fake_data_dir, tmp_path):
    source = tmp_path / "source"
    ddpm.main(train_args(fake_data_dir, source, "--max-steps", "3", "--lr", "1e-2"))
    src_unet = load_pipeline(str(source / "pipeline")).unet
    # lr 0 and no weight decay: one step changes nothing, so the saved EMA must equal the source exactly.
    frozen = ["--max-steps", "1", "--lr", "0", "--weight-decay", "0", "--lr-warmup-steps", "0"]
    ddpm.main(train_args(fake_data_dir, tmp_path / "tuned", "--init-from", str(source / "pipeline"), *frozen))
    assert state_equal(load_pipeline(str(tmp_path / "tuned" / "pipeline")).unet, src_unet)
    ddpm.main(train_args(fake_data_dir, tmp_path / "fresh", *frozen))
    assert not state_equal(load_pipeline(str(tmp_path / "fresh" / "pipeline")).unet, src_unet)
    recorded = json.loads((tmp_path / "tuned" / "train_config.json").read_text())
    assert recorded["init_from"] == str(source / "pipeline")


def test_init_from_a_different_architecture_is_refused(fake_data_dir, tmp_path):
    source = save_pipeline(load_tiny_ddpm(), tmp_path / "tiny")
    with pytest.raises(SystemExit) as err:
        ddpm.main(train_args(fake_data_dir, tmp_path / "r", "--init-from", str(source), "--channels", "16,32,64"))
    message = str(err.value)
    assert message.startswith(f"error: --init-from {source} (unet) has a different architecture from this run's")
    assert "block_out_channels: [16, 32, 32] there, [16, 32, 64] here" in message
    assert not (tmp_path / "r" / "pipeline").exists()
    with pytest.raises(SystemExit, match="no model 'nowhere'"):
        ddpm.main(train_args(fake_data_dir, tmp_path / "r2", "--init-from", "nowhere"))


def test_init_from_works_for_the_gan_and_names_the_wrong_family(tmp_path):
    from pipelines import BloodGANPipeline

    config = TrainConfig(resolution=28, extra=gan_options(latent_dim=16, base_channels=8))
    torch.manual_seed(1)
    source = save_pipeline(BloodGANPipeline(gan=gan.GANTask.build(config, 48).models["generator"]), tmp_path / "gan")
    torch.manual_seed(0)
    task = gan.GANTask.build(config, 48)
    assert not state_equal(task.models["generator"], load_pipeline(str(source)).gan)
    init_from_pretrained(task, str(source))
    assert state_equal(task.models["generator"], load_pipeline(str(source)).gan)
    assert all(torch.equal(a, b) for a, b in zip(task.ema.shadow_params, task.models["generator"].parameters()))
    with pytest.raises(Exception, match="has no ConditionalGenerator component 'gan': it is a BloodDDPMPipeline"):
        init_from_pretrained(task, str(save_pipeline(load_tiny_ddpm(), tmp_path / "ddpm")))


def load_tiny_ddpm():
    from tests.conftest import tiny_ddpm_pipeline

    return tiny_ddpm_pipeline()


def gan_options(**overrides) -> dict:
    import argparse

    parser = gan.add_gan_arguments(argparse.ArgumentParser())
    defaults = vars(parser.parse_args([]))
    return {**defaults, **overrides}


def test_train_config_records_the_new_flags(tmp_path: Path, fake_data_dir):
    out = tmp_path / "r"
    ddpm.main(train_args(fake_data_dir, out, "--max-steps", "1", "--balanced-batches", "--snr-gamma", "5"))
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["balanced_batches"] is True and recorded["extra"]["snr_gamma"] == 5.0
