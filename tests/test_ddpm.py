"""Issue 3: the class-conditional DDPM (UNet2DModel + classifier-free guidance), its pipeline and training."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from safetensors.torch import load_file
from typer.testing import CliRunner

from bloodgen_hf.cli import app
from bloodgen_hf.pipelines import BloodDDPMPipeline
from bloodgen_hf.registry import ModelLoadError, load_pipeline, save_pipeline
from bloodgen_hf.training import ddpm
from bloodgen_hf.training.checkpoint import load_state
from tests.conftest import tiny_ddpm_pipeline

STEPS = {"num_inference_steps": 3}
ROOT = Path(__file__).resolve().parents[1]


def sample(pipe, seeds=(0, 1, 2, 3), labels=(0, 3, 5, 7), **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(len(seeds), class_labels=list(labels), generator=generators, output_type="np", **kwargs).images


def train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data-dir", str(data_dir), "--output-dir", str(out), "--preset", "tiny", "--batch-size", "16",
        "--log-every", "1", "--log-with", "none", "--sampler-steps", "2", "--grid-per-class", "1",
        *extra,
    ]  # fmt: skip


# --- model -----------------------------------------------------------------------------------------


def test_presets_match_the_documented_parameter_counts():
    documented = re.findall(r"^\s+(tiny|small|base)\s+([\d.]+)M / ([\d.]+)M", ddpm.__doc__, re.MULTILINE)
    assert [name for name, *_ in documented] == list(ddpm.PRESETS)
    for name, at28, at64 in documented:
        for resolution, millions in ((28, at28), (64, at64)):
            unet = ddpm.build_unet(name, resolution)
            assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 2) == float(millions), (name, resolution)


@pytest.mark.parametrize("resolution, levels", [(28, 3), (64, 4)])
def test_native_resolutions_and_class_embedding(resolution, levels):
    unet = ddpm.build_unet("tiny", resolution)
    assert len(unet.config.block_out_channels) == levels
    assert unet.class_embedding.num_embeddings == 9  # 8 classes + the null class
    x = torch.randn(2, 3, resolution, resolution)
    out = unet(x, torch.tensor([10, 900]), class_labels=torch.tensor([0, 8])).sample
    assert out.shape == x.shape


def test_bad_model_settings_are_refused():
    with pytest.raises(ValueError, match="unknown UNet preset 'huge'"):
        ddpm.build_unet("huge", 28)
    with pytest.raises(ValueError, match="a multiple of 4, not 30"):
        ddpm.build_unet("tiny", 30)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        ddpm.build_noise_scheduler("cosine", "epsilon")
    with pytest.raises(ValueError, match="unknown prediction type"):
        ddpm.build_noise_scheduler("linear", "x0")


def test_pipeline_refuses_a_unet_without_class_embeddings():
    scheduler = DDPMScheduler()
    unconditional = UNet2DModel(
        sample_size=28, block_out_channels=(16, 16), norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, layers_per_block=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="num_class_embeds = classes \\+ 1"):
        BloodDDPMPipeline(unet=unconditional, scheduler=scheduler)


# --- pipeline --------------------------------------------------------------------------------------


def test_pipeline_outputs_and_determinism():
    pipe = tiny_ddpm_pipeline()
    images = sample(pipe, **STEPS)
    assert images.shape == (4, 28, 28, 3) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1
    np.testing.assert_array_equal(images, sample(pipe, **STEPS))
    assert not np.array_equal(images, sample(pipe, seeds=(4, 5, 6, 7), **STEPS))
    pil = pipe(2, generator=torch.Generator().manual_seed(0), **STEPS).images
    assert [im.size for im in pil] == [(28, 28)] * 2


def test_per_image_generators_do_not_depend_on_batching():
    pipe = tiny_ddpm_pipeline().with_scheduler("ddpm")  # a stochastic scheduler: step noise comes per image too
    together = sample(pipe, **STEPS)
    alone = sample(pipe, seeds=(2,), labels=(5,), **STEPS)
    np.testing.assert_allclose(together[2], alone[0], atol=1e-5)


def test_class_labels_and_guidance_change_outputs():
    pipe = tiny_ddpm_pipeline()
    same_noise = (0, 0, 0, 0)
    by_class = sample(pipe, seeds=same_noise, labels=(0, 3, 5, 7), guidance_scale=1.0, **STEPS)
    assert all(not np.allclose(by_class[0], by_class[i]) for i in (1, 2, 3))
    guided = sample(pipe, seeds=same_noise, labels=(0, 3, 5, 7), guidance_scale=3.0, **STEPS)
    assert not np.allclose(guided, by_class)
    # guidance 0 is the unconditional model: the class no longer matters
    unconditional = sample(pipe, seeds=same_noise, labels=(0, 3, 5, 7), guidance_scale=0.0, **STEPS)
    np.testing.assert_allclose(unconditional[1:], unconditional[:1].repeat(3, axis=0), atol=1e-6)


def test_guidance_mixes_the_conditional_and_unconditional_predictions():
    pipe = tiny_ddpm_pipeline()
    x, t, labels = torch.randn(2, 3, 28, 28), torch.tensor(500), torch.tensor([1, 6])
    with torch.no_grad():
        cond = pipe.guided_prediction(x, t, labels, 1.0)
        uncond = pipe.guided_prediction(x, t, labels, 0.0)
        guided = pipe.guided_prediction(x, t, labels, 2.5)
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_bf16_autocast_samples_close_to_fp32_and_stays_deterministic():
    """--precision bf16: the UNet runs under autocast, the sample and the guidance mix stay in fp32."""
    from bloodgen_hf.sampling import generate

    pipe = tiny_ddpm_pipeline()
    labels = np.array([0, 3, 5, 7])

    def draw(precision):
        batches = generate(pipe, labels, seed=3, progress=False, precision=precision, guidance_scale=1.5, **STEPS)
        return np.concatenate([b[0] for b in batches]).astype(np.int16)

    fp32, bf16 = draw("fp32"), draw("bf16")
    assert bf16.dtype == fp32.dtype and bf16.shape == fp32.shape == (4, 28, 28, 3)
    np.testing.assert_array_equal(bf16, draw("bf16"))
    assert np.abs(bf16 - fp32).mean() < 2.0 and not np.array_equal(bf16, fp32)  # rounded, not another image
    x, t = torch.randn(2, 3, 28, 28), torch.tensor(500)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert pipe.guided_prediction(x, t, torch.tensor([1, 6]), 2.5).dtype == torch.float32


def test_precision_auto_is_bf16_only_for_diffusion_on_a_bf16_cpu(monkeypatch):
    from bloodgen_hf import process
    from bloodgen_hf.sampling import configure_sampling, resolve_precision
    from tests.conftest import tiny_gan_pipeline

    ddpm_pipe, gan_pipe = tiny_ddpm_pipeline(), tiny_gan_pipeline()
    monkeypatch.setattr(process, "native_bf16", lambda flags=None: True)
    assert resolve_precision("auto", ddpm_pipe) == "bf16" and resolve_precision("auto", gan_pipe) == "fp32"
    assert configure_sampling(ddpm_pipe, {})[1] == {"precision": "bf16"}
    assert resolve_precision("fp32", ddpm_pipe) == "fp32" and resolve_precision("bf16", gan_pipe) == "bf16"
    monkeypatch.setattr(process, "native_bf16", lambda flags=None: False)
    assert resolve_precision("auto", ddpm_pipe) == "fp32"
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16, got 'fp16'"):
        configure_sampling(ddpm_pipe, {"precision": "fp16"})


@pytest.mark.parametrize(
    "name, cls",
    [
        ("ddpm", DDPMScheduler),
        ("ddim", DDIMScheduler),
        ("dpm++", DPMSolverMultistepScheduler),
        ("unipc", UniPCMultistepScheduler),
        ("euler", EulerDiscreteScheduler),
    ],
)
def test_scheduler_swap(name, cls):
    pipe = tiny_ddpm_pipeline(scheduler="ddim")
    swapped = pipe.with_scheduler(name)
    assert type(swapped.scheduler) is cls and type(pipe.scheduler) is DDIMScheduler
    assert swapped.unet is pipe.unet and swapped.class_names == pipe.class_names
    for key in ("beta_schedule", "prediction_type", "num_train_timesteps", "timestep_spacing"):
        assert swapped.scheduler.config[key] == pipe.scheduler.config[key]
    if name == "dpm++":
        assert swapped.scheduler.config.algorithm_type == "dpmsolver++"
    images = sample(swapped, **STEPS)
    assert images.shape == (4, 28, 28, 3) and np.isfinite(images).all()
    if name != "ddim":
        assert not np.allclose(images, sample(pipe, **STEPS))


def test_default_steps_depend_on_the_scheduler():
    pipe = tiny_ddpm_pipeline()
    assert pipe.default_steps() == pipe.config.default_num_inference_steps == 10
    assert pipe.with_scheduler("ddpm").default_steps() == 1000


def test_guidance_interval_guides_only_the_steps_inside_it():
    """Three steps at t = 999, 666, 332 of 1000: an interval holding all of them is plain guidance, one holding
    none is the conditional model, and one holding some is neither."""
    pipe = tiny_ddpm_pipeline()
    guided, plain = sample(pipe, guidance_scale=3.0, **STEPS), sample(pipe, guidance_scale=1.0, **STEPS)
    np.testing.assert_array_equal(sample(pipe, guidance_scale=3.0, guidance_interval=(0, 1), **STEPS), guided)
    np.testing.assert_array_equal(sample(pipe, guidance_scale=3.0, guidance_interval=(0, 0.3), **STEPS), plain)
    partial = sample(pipe, guidance_scale=3.0, guidance_interval=(0.4, 0.7), **STEPS)
    assert not np.allclose(partial, guided) and not np.allclose(partial, plain)
    # the upper end is inside: t = 666 alone is guided by (0.6, 0.666] and by (0.4, 0.7]
    np.testing.assert_array_equal(sample(pipe, guidance_scale=3.0, guidance_interval=(0.6, 0.666), **STEPS), partial)


def test_a_default_guidance_interval_is_saved_and_an_unset_one_leaves_the_config_as_before(tmp_path):
    plain = save_pipeline(tiny_ddpm_pipeline(), tmp_path / "plain")
    assert "default_guidance_interval" not in json.loads((plain / "model_index.json").read_text())
    pipe = tiny_ddpm_pipeline()
    pipe.register_to_config(default_guidance_scale=3.0, default_num_inference_steps=3)
    pipe.register_to_config(default_guidance_interval=[0.3, 0.7])
    loaded = load_pipeline(str(save_pipeline(pipe, tmp_path / "interval")))
    assert loaded.config.default_guidance_interval == [0.3, 0.7]
    np.testing.assert_array_equal(sample(loaded), sample(pipe, guidance_interval=(0.3, 0.7)))
    np.testing.assert_array_equal(sample(loaded.with_scheduler("dpm++")), sample(loaded))


@pytest.mark.parametrize(
    "interval, message",
    [
        ((0.7, 0.3), "needs 0 <= lo < hi <= 1, got 0.7,0.3"),
        ((-0.1, 0.5), "needs 0 <= lo < hi <= 1, got -0.1,0.5"),
        ((0.2, 1.5), "needs 0 <= lo < hi <= 1, got 0.2,1.5"),
        ((0.2,), "must be two numbers lo,hi"),
        (("a", 0.5), "must be two numbers lo,hi"),
    ],
)
def test_a_bad_guidance_interval_is_a_clear_error(interval, message):
    with pytest.raises(ValueError, match=re.escape(f"guidance_interval (--guidance-interval) {message}")):
        tiny_ddpm_pipeline()(2, num_inference_steps=2, guidance_interval=interval)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_inference_steps": 0}, "num_inference_steps \\(--steps\\) must be a positive integer, got 0"),
        ({"num_inference_steps": -3}, "must be a positive integer, got -3"),
        ({"num_inference_steps": 2.5}, "must be a positive integer, got 2.5"),
        ({"num_inference_steps": 1001}, "1001 exceeds the 1000 training timesteps"),
        ({"guidance_scale": -1.0}, "guidance_scale \\(--guidance\\) must be >= 0"),
        ({"guidance_scale": float("nan")}, "guidance_scale \\(--guidance\\) must be >= 0"),
        ({"class_labels": "monster"}, "unknown class 'monster'"),
        ({"class_labels": 8}, "class index 8 out of range 0..7"),  # the null class is not a class
        ({"generator": [torch.Generator()]}, "got 1 generators for 2 images"),
        ({"output_type": "jpg"}, "output_type must be one of"),
    ],
)
def test_bad_sampling_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_ddpm_pipeline()(2, **{"num_inference_steps": 2, **kwargs})


def test_unknown_scheduler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scheduler 'heun'; choose from: ddpm, ddim, dpm\\+\\+, unipc, euler"):
        tiny_ddpm_pipeline().with_scheduler("heun")


# --- saving and loading ----------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path):
    pipe = tiny_ddpm_pipeline()
    pipe.register_to_config(default_guidance_scale=1.5, default_num_inference_steps=3)
    folder = save_pipeline(pipe, tmp_path / "ddpm")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_bloodgen_ddpm", "BloodDDPMPipeline"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert (folder / "pipeline_bloodgen_ddpm.py").is_file() and (folder / "blood_pipeline_utils.py").is_file()
    assert not list(folder.glob("unet/*.py"))  # a stock diffusers model needs no remote code
    assert not list(folder.rglob("*.bin"))

    loaded = load_pipeline(str(folder))
    assert type(loaded) is BloodDDPMPipeline and type(loaded.scheduler) is DPMSolverMultistepScheduler
    assert loaded.class_names == pipe.class_names
    assert (loaded.config.default_guidance_scale, loaded.config.default_num_inference_steps) == (1.5, 3)
    np.testing.assert_array_equal(sample(loaded), sample(pipe))  # the saved defaults apply


def test_corrupt_unet_weights_are_rejected_naming_the_file(tmp_path):
    folder = save_pipeline(tiny_ddpm_pipeline(), tmp_path / "ddpm")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=re.escape(str(weights))):
        load_pipeline(str(folder))


def test_only_diffusers_classes_are_loaded_from_model_index(tmp_path):
    folder = save_pipeline(tiny_ddpm_pipeline(), tmp_path / "ddpm")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["os", "system"]}))
    with pytest.raises(ModelLoadError, match="os.system is not a diffusers model or scheduler class"):
        load_pipeline(str(folder))


def test_cli_samples_with_scheduler_steps_and_guidance(tmp_path):
    folder = save_pipeline(tiny_ddpm_pipeline(), tmp_path / "ddpm")
    out = tmp_path / "samples.npz"
    args = ["sample", "--model", str(folder), "--n", "5", "--format", "npz", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--scheduler", "unipc", "--steps", "2", "--guidance", "2.0"])
    assert result.exit_code == 0, result.output
    with np.load(out) as archive:
        assert archive["images"].shape == (5, 28, 28, 3)
        assert json.loads(str(archive["info"]))["guidance_scale"] == 2.0
    result = CliRunner().invoke(app, [*args, "--overwrite", "--guidance", "2.0", "--guidance-interval", "0.2,0.85"])
    assert result.exit_code == 0, result.output
    with np.load(out) as archive:
        assert json.loads(str(archive["info"]))["guidance_interval"] == [0.2, 0.85]
    for bad, message in [
        (["--scheduler", "heun"], "error: unknown scheduler 'heun'"),
        (["--steps", "0"], "error: num_inference_steps (--steps) must be a positive integer, got 0"),
        (["--guidance", "-1"], "error: guidance_scale (--guidance) must be >= 0"),
        (["--temperature", "0.5"], "error: --temperature does not apply to BloodDDPMPipeline"),
        (["--guidance-interval", "0.2"], "error: --guidance-interval takes two numbers LO,HI such as 0.2,0.85"),
        (["--guidance-interval", "0.9,0.2"], "needs 0 <= lo < hi <= 1, got 0.9,0.2"),
    ]:
        result = CliRunner().invoke(app, [*args, "--overwrite", *bad])
        assert result.exit_code == 2 and message in result.output, result.output


# --- training --------------------------------------------------------------------------------------


def test_training_steps_reduce_loss_and_save_a_pipeline(fake_data_dir, tmp_path):
    out = tmp_path / "run"
    ddpm.main(train_args(fake_data_dir, out, "--max-steps", "30", "--lr", "2e-3", "--lr-warmup-steps", "0"))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4]), losses
    assert sorted(p.name for p in (out / "samples").iterdir())[:2] == ["epoch_0001.png", "epoch_0002.png"]
    pipe = load_pipeline(str(out / "pipeline"))
    assert pipe.config.default_num_inference_steps == 2 and type(pipe.scheduler) is DPMSolverMultistepScheduler
    assert sample(pipe).shape == (4, 28, 28, 3)


def test_saved_pipeline_carries_the_ema_weights(fake_data_dir, tmp_path):
    out = tmp_path / "run"
    ddpm.main(train_args(fake_data_dir, out, "--max-steps", "3", "--lr", "1e-2", "--ema-power", "1.0"))
    live = load_file(str(out / "checkpoints" / "checkpoint-0000003" / "unet.safetensors"))
    shadow = load_state(out / "checkpoints" / "checkpoint-0000003" / "training_state")["extra"]["ema"]
    unet = load_pipeline(str(out / "pipeline")).unet
    saved, params = unet.state_dict(), [name for name, _ in unet.named_parameters()]
    for name, ema_value in zip(params, shadow["shadow_params"]):
        torch.testing.assert_close(saved[name], ema_value)
    assert any(not torch.equal(saved[k], live[k]) for k in params)


def test_resume_reproduces_uninterrupted_training(fake_data_dir, tmp_path):
    """8 steps in one go == 4 steps, stop, resume to 8: weights, EMA, optimizer and LR all equal.

    The LR warms up over 6 steps, so the schedule's state crosses the interruption; 5 batches per
    epoch, so the resumed run also crosses an epoch boundary (data order, flips, a sample grid)."""
    common = ["--lr-schedule", "constant", "--lr-warmup-steps", "6", "--checkpoint-every", "4"]
    ddpm.main(train_args(fake_data_dir, tmp_path / "full", *common, "--max-steps", "8"))
    ddpm.main(train_args(fake_data_dir, tmp_path / "split", *common, "--max-steps", "4"))
    ddpm.main(train_args(fake_data_dir, tmp_path / "split", *common, "--max-steps", "8", "--resume", "latest"))

    full, split = (tmp_path / run / "checkpoints" / "checkpoint-0000008" for run in ("full", "split"))
    a, b = load_file(str(full / "unet.safetensors")), load_file(str(split / "unet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a, state_b = load_state(full / "training_state"), load_state(split / "training_state")
    for x, y in zip(state_a["extra"]["ema"]["shadow_params"], state_b["extra"]["ema"]["shadow_params"]):
        assert torch.equal(x, y)
    assert state_a["schedulers"]["lr"]["_last_lr"] == state_b["schedulers"]["lr"]["_last_lr"]
    assert state_a["schedulers"]["lr"]["last_epoch"] == 8
    exp_a = [s["exp_avg_sq"] for s in state_a["optimizers"]["unet"]["state"].values()]
    exp_b = [s["exp_avg_sq"] for s in state_b["optimizers"]["unet"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(exp_a, exp_b))


def test_training_at_64x64(fake_data_dir, tmp_path):
    out = tmp_path / "run64"
    ddpm.main(train_args(fake_data_dir, out, "--resolution", "64", "--max-steps", "2", "--batch-size", "8"))
    assert sample(load_pipeline(str(out / "pipeline")), seeds=(0,), labels=(1,)).shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cfg-dropout", "1.5"], "error: --cfg-dropout must be in \\[0, 1\\), got 1.5"),
        (["--guidance-scale", "2", "--cfg-dropout", "0"], "error: --guidance-scale other than 1 needs"),
        (["--guidance-scale", "-1"], "error: --guidance-scale must be >= 0"),
        (["--sampler-steps", "0"], "error: --sampler-steps must be at least 1"),
        (["--batch-size", "500"], "make no whole batch"),
    ],
)
def test_bad_training_arguments_are_clear_errors(fake_data_dir, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        ddpm.main(train_args(fake_data_dir, tmp_path / "bad", "--max-steps", "1", *extra))


def test_accelerate_launch_with_two_cpu_processes(fake_data_dir, tmp_path):
    """`accelerate launch train_scripts/train_ddpm.py`, two DDP processes on CPU, as the issue asks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", "29531", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "train_scripts" / "train_ddpm.py"),
        *train_args(fake_data_dir, tmp_path / "mp", "--max-steps", "2", "--batch-size", "8"),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "mp" / "checkpoints" / "checkpoint-0000002"
    assert (checkpoint / "rng_0.json").is_file() and (checkpoint / "rng_1.json").is_file()
    assert type(load_pipeline(str(tmp_path / "mp" / "pipeline"))) is BloodDDPMPipeline
