"""Issue 34 (2, 3): the class-conditional latent flow model (bloodgen_hf/training/latent.py) and BloodLDMPipeline, on a
tiny stock AutoencoderKL (32x32 RGB <-> 4x8x8 latents) and the fake 64 px archive resized to 32 px."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bloodgen_hf.cli import app
from bloodgen_hf.data import CLASS_NAMES, LabelledImages, to_model_range
from bloodgen_hf.errors import UsageError
from bloodgen_hf.pipelines import BloodLDMPipeline
from bloodgen_hf.pipelines.blood_pipeline_utils import flatten_provenance, postprocess
from bloodgen_hf.provenance import LeakError, check_unseen, content_sha256, training_provenance
from bloodgen_hf.registry import load_pipeline, save_pipeline
from bloodgen_hf.training import latent
from bloodgen_hf.training.checkpoint import load_state
from bloodgen_hf.training.core import TrainConfig
from tests.conftest import tiny_autoencoder, tiny_ldm_pipeline
from tests.test_remote_code import LABELS, SEEDS, reference_images, run_without_bloodgen_hf

STEPS = {"num_inference_steps": 2}
SCALE = 2.5


def sample(pipe, seeds=(0, 1, 2, 3), labels=(0, 3, 5, 7), **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(len(seeds), class_labels=list(labels), generator=generators, output_type="np", **kwargs).images


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared, busy CPU two threads wait on each other (20x slower); results are the same."""
    torch.set_num_threads(1)


@pytest.fixture
def autoencoder_dir(tmp_path: Path) -> Path:
    """A saved tiny AutoencoderKL with scaling_factor 2.5 and the record of what it was trained on."""
    folder = tmp_path / "ae"
    tiny_autoencoder(scaling_factor=SCALE).save_pretrained(folder, safe_serialization=True)
    record = training_provenance("bloodmnist", 32, "train", 48)
    (folder / "provenance.json").write_text(json.dumps(flatten_provenance(record)))
    return folder


def train_args(data_dir: Path, autoencoder: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data-dir", str(data_dir), "--autoencoder", str(autoencoder), "--output-dir", str(out),
        "--resolution", "32", "--preset", "tiny", "--batch-size", "16", "--log-every", "1", "--log-with", "none",
        "--sampler-steps", "2", "--grid-per-class", "1", "--cpu-threads", "1", *extra,
    ]  # fmt: skip


# --- the latent scale --------------------------------------------------------------------------------------


def test_the_task_encodes_every_flip_and_applies_the_recorded_scale(fake_data_dir, autoencoder_dir):
    """latents = posterior mode x scaling_factor of the autoencoder's config, for each of the four flips."""
    config = TrainConfig(
        data_dir=str(fake_data_dir), resolution=32, split="train", extra={"autoencoder": str(autoencoder_dir)}
    )
    data, provenance = latent.load_latent_data(config)
    assert data.latents.shape == (4, 48, 4, 8, 8) and len(data) == 48

    vae = latent.load_autoencoder(str(autoencoder_dir))
    images = to_model_range(LabelledImages.load("train", 32, fake_data_dir).images)
    with torch.no_grad():
        for index, dims in enumerate(latent.FLIPS):
            x = images.flip(dims) if dims else images
            expected = vae.encode(x).latent_dist.mode() * SCALE
            torch.testing.assert_close(data.latents[index], expected, atol=1e-5, rtol=1e-5)

    entry = provenance["autoencoder"]
    assert entry["model"] == str(autoencoder_dir) and entry["sha256"] == content_sha256(autoencoder_dir)
    assert entry["scaling_factor"] == SCALE and entry["latent_shape"] == [4, 8, 8]
    assert entry["provenance"] == training_provenance("bloodmnist", 32, "train", 48)
    assert (provenance["split"], provenance["resolution"], provenance["num_images"]) == ("train", 32, 48)


def test_batches_draw_one_flip_per_image_from_the_global_rng():
    latents = torch.arange(4 * 6, dtype=torch.float32).view(4, 6, 1, 1, 1)
    data = latent.LatentImages(latents, torch.arange(6) % 2, flip=True)
    torch.manual_seed(0)
    batch, labels = data.batch(torch.tensor([5, 0, 3]))
    torch.manual_seed(0)
    horizontal, vertical = torch.rand(3) < 0.5, torch.rand(3) < 0.5
    flips = horizontal.long() + 2 * vertical.long()
    assert batch.view(-1).tolist() == [float(f * 6 + i) for f, i in zip(flips.tolist(), [5, 0, 3])]
    assert labels.tolist() == [1, 0, 1]
    unflipped = latent.LatentImages(latents[:1], torch.arange(6) % 2, flip=False)
    assert unflipped.batch(torch.tensor([4]))[0].view(-1).tolist() == [4.0]


def test_the_pipeline_divides_by_the_scale_before_decoding(monkeypatch):
    """vae.decode gets latents / scaling_factor + shift_factor, and its output is the image."""
    pipe = tiny_ldm_pipeline(scaling_factor=1.0)
    seen: list[torch.Tensor] = []
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, *a, **k: seen.append(z.clone()) or decode(z, *a, **k))

    images = sample(pipe, **STEPS)
    unit = seen[-1]  # the denoised latents themselves (scale 1)
    with torch.no_grad():
        manual = postprocess(decode(unit).sample, "np")
    np.testing.assert_array_equal(images, manual)

    pipe.vae.register_to_config(scaling_factor=SCALE, shift_factor=0.25)
    sample(pipe, **STEPS)  # the same UNet and noise: the same latents, decoded as latents / 2.5 + 0.25
    torch.testing.assert_close(seen[-1], unit / SCALE + 0.25)


# --- the pipeline ------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_image_in_any_batch():
    pipe = tiny_ldm_pipeline()
    together = sample(pipe, **STEPS)
    assert together.shape == (4, 32, 32, 3)
    alone = sample(pipe, seeds=(2,), labels=(5,), **STEPS)
    np.testing.assert_allclose(together[2], alone[0], atol=1e-5)
    np.testing.assert_array_equal(together, sample(pipe, **STEPS))
    shuffled = sample(pipe, seeds=(3, 2, 9), labels=(7, 5, 0), **STEPS)
    np.testing.assert_allclose(shuffled[:2], together[[3, 2]], atol=1e-5)


def test_class_labels_names_and_output_types():
    pipe = tiny_ldm_pipeline()
    assert pipe.id2label == dict(enumerate(CLASS_NAMES)) and pipe.get_label_ids(["platelet", "basophil"]) == [7, 0]
    assert pipe(class_labels=[0, 1, 2], output_type="np", **STEPS).images.shape == (3, 32, 32, 3)
    tensors = pipe(2, class_labels="neutrophil", output_type="pt", **STEPS).images
    assert tensors.shape == (2, 3, 32, 32) and 0 <= tensors.min() and tensors.max() <= 1
    assert [im.size for im in pipe(2, **STEPS).images] == [(32, 32)] * 2
    swapped = pipe.with_scheduler("euler")
    assert swapped.vae is pipe.vae and swapped.unet is pipe.unet and swapped.class_names == pipe.class_names


def test_a_unet_that_does_not_match_the_latents_is_refused_in_one_line():
    from bloodgen_hf.training.ddpm import build_unet

    pipe = tiny_ldm_pipeline()
    with pytest.raises(UsageError, match="needs a UNet with 4 channels in and out") as refused:
        BloodLDMPipeline(vae=pipe.vae, unet=build_unet("tiny", 8), scheduler=pipe.scheduler)
    assert "\n" not in str(refused.value)
    pipe.vae.register_to_config(scaling_factor=0.0)
    with pytest.raises(UsageError, match="scaling_factor must be a positive number, got 0.0"):
        BloodLDMPipeline(vae=pipe.vae, unet=pipe.unet, scheduler=pipe.scheduler)


def test_precision_auto_is_bf16_and_close_to_fp32(monkeypatch):
    """--precision auto treats the LDM as the DDPMs (a scheduler: many UNet passes); bf16 autocast also runs the
    decoder, and stays close to fp32."""
    from bloodgen_hf import process
    from bloodgen_hf.sampling import generate, resolve_precision

    pipe = tiny_ldm_pipeline()
    monkeypatch.setattr(process, "native_bf16", lambda flags=None: True)
    assert resolve_precision("auto", pipe) == "bf16"

    def draw(precision):
        batches = generate(pipe, np.array([0, 3, 5]), seed=3, progress=False, precision=precision, **STEPS)
        return np.concatenate([b[0] for b in batches]).astype(np.int16)

    fp32, bf16 = draw("fp32"), draw("bf16")
    assert bf16.shape == fp32.shape == (3, 32, 32, 3) and np.abs(bf16 - fp32).mean() < 4.0


def test_remote_code_load_without_bloodgen_hf(tmp_path):
    """The saved folder (the LDM's file, the DDPM's it derives from, the helper) loads with
    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) in an interpreter without bloodgen_hf, draws
    the same images, takes class_labels=[0, 1, 2], knows its decoded size, and saves the same layout again."""
    pipe = tiny_ldm_pipeline()
    folder = save_pipeline(pipe, tmp_path / "ldm")
    assert {"pipeline_bloodgen_ldm.py", "pipeline_bloodgen_ddpm.py", "blood_pipeline_utils.py"} <= {
        p.name for p in folder.glob("*.py")
    }
    assert json.loads((folder / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    out = tmp_path / "images"
    job = {
        "source": str(folder),
        "out": str(out),
        "call": STEPS,
        "labels": f"{out}.json",
        "resave": str(tmp_path / "re"),
    }
    run_without_bloodgen_hf(tmp_path, {"jobs": [job], "threads": torch.get_num_threads()})

    expected = reference_images(pipe)
    assert len(SEEDS) == len(LABELS) == expected.shape[0]
    np.testing.assert_array_equal(np.load(f"{out}.npy"), expected)
    np.testing.assert_array_equal(np.load(f"{out}-resaved.npy"), expected)
    found = json.loads(Path(f"{out}.json").read_text())
    assert found["shape"] == [3, 32, 32, 3] and found["resolution"] == 32 and found["label_ids"] == [7, 0]
    assert found["id2label"] == {str(i): name for i, name in enumerate(CLASS_NAMES)}


def test_cli_sample_writes_pngs_at_the_decoded_size(tmp_path):
    folder = save_pipeline(tiny_ldm_pipeline(), tmp_path / "ldm")
    out = tmp_path / "samples"
    result = CliRunner().invoke(app, ["sample", "--model", str(folder), "--n", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 8 and {p.parent.name for p in pngs} == set(CLASS_NAMES)
    from PIL import Image

    assert {Image.open(p).size for p in pngs} == {(32, 32)}
    assert len((out / "manifest.csv").read_text().splitlines()) == 9


# --- training ----------------------------------------------------------------------------------------------


def test_resume_reproduces_uninterrupted_training(fake_data_dir, autoencoder_dir, tmp_path):
    """4 steps in one go == 2 steps, stop, resume to 4 (UNet, EMA, optimizer, LR), over an epoch boundary (3
    batches per epoch: flips, a sample grid); the saved pipeline holds the autoencoder, its scale and record."""
    common = ["--lr-schedule", "constant", "--lr-warmup-steps", "3", "--checkpoint-every", "2"]
    latent.main(train_args(fake_data_dir, autoencoder_dir, tmp_path / "full", *common, "--max-steps", "4"))
    latent.main(train_args(fake_data_dir, autoencoder_dir, tmp_path / "split", *common, "--max-steps", "2"))
    resumed = ["--max-steps", "4", "--resume", "latest"]
    latent.main(train_args(fake_data_dir, autoencoder_dir, tmp_path / "split", *common, *resumed))

    full, split = (tmp_path / run / "checkpoints" / "checkpoint-0000004" for run in ("full", "split"))
    a, b = load_file(str(full / "unet.safetensors")), load_file(str(split / "unet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(name.startswith("vae") for name in a)  # the autoencoder is frozen: not in checkpoints
    state_a, state_b = load_state(full / "training_state"), load_state(split / "training_state")
    for x, y in zip(state_a["extra"]["ema"]["shadow_params"], state_b["extra"]["ema"]["shadow_params"]):
        assert torch.equal(x, y)
    assert state_a["schedulers"]["lr"]["_last_lr"] == state_b["schedulers"]["lr"]["_last_lr"]

    pipe = load_pipeline(str(tmp_path / "split" / "pipeline"))
    assert type(pipe) is BloodLDMPipeline and pipe.vae.config.scaling_factor == SCALE
    assert (pipe.unet.config.sample_size, pipe.unet.config.in_channels) == (8, 4)
    assert pipe.scheduler.config.prediction_type == "flow_prediction"  # --prediction-type flow by default
    record = pipe.config.provenance
    assert record["split"] == "train" and record["autoencoder"]["sha256"] == content_sha256(autoencoder_dir)
    assert record["autoencoder"]["provenance"]["split"] == "train"
    assert sample(pipe, seeds=(0,), labels=(1,), **STEPS).shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "30"], "--resolution 30 is not a multiple of 4, the autoencoder's downsampling factor"),
        (["--resolution", "24"], "--resolution 24 gives 4x6x6 latents, which the UNet cannot take: .*not 6"),
        (["--channels", "16,16,32,32,32"], "gives 4x8x8 latents, which the UNet cannot take: 5 UNet levels halve 8"),
        (["--autoencoder", ""], "--autoencoder is required"),
        (["--sampler", "ddim"], "--sampler ddim cannot sample flow matching; choose from: euler, dpm\\+\\+, unipc"),
    ],
)
def test_bad_resolution_or_latent_shape_is_refused_in_one_line(
    fake_data_dir, autoencoder_dir, tmp_path, extra, message
):
    with pytest.raises(SystemExit, match=message) as refused:
        latent.main(train_args(fake_data_dir, autoencoder_dir, tmp_path / "bad", "--max-steps", "1", *extra))
    assert refused.value.code == 2 and "\n" not in str(refused.value)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_an_autoencoder_folder_that_is_not_one_is_refused(fake_data_dir, tmp_path):
    not_an_autoencoder = save_pipeline(tiny_ldm_pipeline(), tmp_path / "ldm") / "unet"
    with pytest.raises(SystemExit, match=r"config.json is the config of a UNet2DModel, not of an AutoencoderKL"):
        latent.main(train_args(fake_data_dir, not_an_autoencoder, tmp_path / "bad", "--max-steps", "1"))
    with pytest.raises(SystemExit, match=r"missing: --autoencoder .* is not a saved AutoencoderKL folder"):
        latent.main(train_args(fake_data_dir, tmp_path / "nowhere", tmp_path / "bad", "--max-steps", "1"))


def test_leak_checks_follow_the_autoencoder():
    """Every image comes out of the decoder: an autoencoder trained on the test split (or on nothing recorded)
    makes the latent model unfit to be scored on it."""
    own = training_provenance("bloodmnist", 64, "train", 100)
    leaky = {**own, "autoencoder": {"model": "ae", "provenance": training_provenance("bloodmnist", 64, "all", 9)}}
    with pytest.raises(LeakError, match=r"ldm \(decoded by ae\) was trained on split 'all'"):
        check_unseen(leaky, "ldm", "test", "bloodmnist", "augment-study")
    unrecorded = {**own, "autoencoder": {"model": "ae", "provenance": None}}
    with pytest.raises(LeakError, match="records no training data"):
        check_unseen(unrecorded, "ldm", "test", "bloodmnist", "augment-study")
    clean = {**own, "autoencoder": {"model": "ae", "provenance": own}}
    check_unseen(clean, "ldm", "test", "bloodmnist", "augment-study")


def test_the_student_takes_a_flow_ldm_teacher_and_refuses_another(tmp_path):
    """A flow-matching LDM is a teacher (tests/test_student.py distils one); a v-prediction one is refused."""
    from bloodgen_hf.pipelines.pipeline_bloodgen_ddpm import make_scheduler
    from bloodgen_hf.training.ddpm import build_noise_scheduler
    from bloodgen_hf.training.student import load_teacher

    assert type(load_teacher(str(save_pipeline(tiny_ldm_pipeline(), tmp_path / "ldm")))) is BloodLDMPipeline
    pipe = tiny_ldm_pipeline()
    v_prediction = make_scheduler("dpm++", build_noise_scheduler("squaredcos_cap_v2", "v_prediction").config)
    folder = save_pipeline(BloodLDMPipeline(vae=pipe.vae, unet=pipe.unet, scheduler=v_prediction), tmp_path / "v")
    with pytest.raises(UsageError, match=r"is a BloodLDMPipeline without flow matching; distillation needs"):
        load_teacher(str(folder))
