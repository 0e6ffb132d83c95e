"""Issue 34, first stage: diffusers' stock AutoencoderKL trained on the shared core (training/autoencoder.py),
its latent scale, exact resume, shape refusals, and the reconstruction metrics (PSNR, SSIM, FD)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from bloodgen_hf.data import load_data, to_model_range
from bloodgen_hf.errors import UsageError
from bloodgen_hf.evaluation.features import FeatureExtractor, Features
from bloodgen_hf.evaluation.reconstruction import (
    encoder_fingerprint,
    evaluate_autoencoder,
    latent_probe,
    reconstruct,
    reconstruction_report,
)
from bloodgen_hf.image_quality import psnr, ssim
from bloodgen_hf.models.patch_discriminator import PatchDiscriminator
from bloodgen_hf.training import TRAIN_ENTRY_POINTS
from bloodgen_hf.training.autoencoder import (
    AutoencoderOptions,
    build_autoencoder,
    latent_shape,
    main,
)
from bloodgen_hf.training.checkpoint import load_state
from tests.conftest import write_fake_bloodmnist

# 32 px (resized from the fake 64 px archive) -> 8x8x4 latents; 48 train images, 6 batches of 8 an epoch.
TINY = [
    "--resolution", "32", "--block-out-channels", "4,8,8", "--norm-num-groups", "4", "--no-attention",
    "--disc-channels", "4", "--disc-layers", "2", "--batch-size", "8", "--cpu-threads", "1",
    "--log-with", "none", "--log-every", "1",
]  # fmt: skip
TIMING = ("images_per_s", "cpu_minutes")  # measured, not computed: they differ between any two runs


def train(data_dir: Path, out: Path, *extra: str) -> Path:
    path = main(["--data-dir", str(data_dir), "--output-dir", str(out), *TINY, *extra])
    AcceleratorState._reset_state(True)
    return path


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    found = {}
    for name in ("autoencoder", "discriminator", "training_state"):
        found.update({f"{name}.{k}": v for k, v in load_file(str(checkpoint / f"{name}.safetensors")).items()})
    return found


def metric_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """3 steps, the discriminator on after 2, a checkpoint each step: (data folder, run folder)."""
    root = tmp_path_factory.mktemp("autoencoder")
    data = write_fake_bloodmnist(root / "data", 64)
    run = root / "run"
    AcceleratorState._reset_state(True)
    common = ["--max-steps", "3", "--disc-start", "2", "--disc-weight-mode", "fixed", "--disc-weight", "0.1"]
    train(data, run, *common, "--checkpoint-every", "1", "--keep-checkpoints", "5", "--sample-every", "3")
    return data, run


# --- the saved AutoencoderKL ---------------------------------------------------------------------------


def test_the_saved_folder_is_a_stock_autoencoder_with_the_trained_weights(trained):
    _, run = trained
    folder = run / "pipeline"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "provenance.json",
        "training_cost.json",  # a record beside the stock files, as every train script writes
    ]
    loaded = AutoencoderKL.from_pretrained(folder)
    assert type(loaded) is AutoencoderKL and json.loads((folder / "config.json").read_text())["_class_name"] == (
        "AutoencoderKL"
    )
    before = build_autoencoder(
        AutoencoderOptions(block_out_channels="4,8,8", norm_num_groups=4, attention=False), resolution=32
    )
    before.load_state_dict(load_file(str(run / "checkpoints" / "checkpoint-0000003" / "autoencoder.safetensors")))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean_before, mean_after = before.encode(x).latent_dist.mean, loaded.encode(x).latent_dist.mean
        assert mean_after.shape == (3, 4, 8, 8) and torch.equal(mean_before, mean_after)
        assert torch.equal(before.decode(mean_before).sample, loaded.decode(mean_after).sample)
    record = json.loads((folder / "provenance.json").read_text())
    assert record["records"][record["model"]] | {"init_from": None} == {
        "dataset": "bloodmnist",
        "split": "train",
        "resolution": 32,
        "num_images": 48,
        "subset": None,
        "init_from": None,
    }


def test_scaling_factor_is_one_over_the_std_of_the_training_latents(trained):
    data, run = trained
    vae = AutoencoderKL.from_pretrained(run / "pipeline")
    train_images = torch.from_numpy(load_data("bloodmnist", "train", 32, data).images)  # 48 < --scale-images
    with torch.no_grad():
        latents = vae.encode(to_model_range(train_images)).latent_dist.mode()
    assert vae.config.scaling_factor == pytest.approx(1 / latents.double().std().item(), rel=1e-5)
    assert vae.config.scaling_factor != AutoencoderKL().config.scaling_factor  # not diffusers' default 0.18215


def test_the_discriminator_only_starts_after_disc_start(trained):
    _, run = trained
    checkpoints = [run / "checkpoints" / f"checkpoint-000000{s}" for s in (1, 2, 3)]
    discs = [load_file(str(c / "discriminator.safetensors")) for c in checkpoints]
    assert all(torch.equal(discs[0][k], discs[1][k]) for k in discs[0])  # untouched for 2 steps
    assert any(not torch.equal(discs[1][k], discs[2][k]) for k in discs[1])  # updated at step 3
    states = [load_state(c / "training_state") for c in checkpoints]
    assert not states[1]["optimizers"]["discriminator"]["state"] and states[2]["optimizers"]["discriminator"]["state"]
    assert [s["extra"]["step"] for s in states] == [1, 2, 3]
    rows = metric_rows(run)
    assert ["loss_d" in r for r in rows] == [False, False, True]
    assert rows[2]["adv_weight"] == 0.1 and {"l1", "kl", "psnr", "loss_adv", "score_real"} <= rows[2].keys()


def test_progress_grid_shows_real_rows_over_their_reconstructions(trained):
    from PIL import Image

    _, run = trained
    grid = np.asarray(Image.open(run / "samples" / "step_0000003.png"))
    tile = 32 + 2  # 32 of the 48 training images: 4 rows of 8 real ones, each above its 8 reconstructions
    assert grid.shape == (8 * tile + 2, 8 * tile + 2, 3)
    real_row, recon_row = grid[2 : 2 + 32], grid[2 + tile : 2 + tile + 32]
    assert not np.array_equal(real_row, recon_row)


def test_init_from_a_saved_autoencoder_starts_from_its_weights_and_records_it(trained, tmp_path):
    """Two stages, as the 64 px autoencoder trains: L1 first, then the adversarial term from its weights
    (--init-from), with any discriminator settings. The fitted scaling_factor may differ; the data are recorded."""
    data, first = trained
    second = train(
        data, tmp_path / "second", "--init-from", str(first / "pipeline"), "--max-steps", "1", "--lr", "1e-12",
        "--disc-start", "0", "--disc-norm", "none", "--checkpoint-every", "1",
    )  # fmt: skip
    start = AutoencoderKL.from_pretrained(first / "pipeline").state_dict()
    after = AutoencoderKL.from_pretrained(second).state_dict()
    assert start.keys() == after.keys()
    gap = max((start[k] - after[k]).abs().max().item() for k in start)
    assert gap < 1e-6, gap  # one Adam step of lr 1e-12 away; a fresh start would be ~0.1 away
    record = json.loads((second / "provenance.json").read_text())
    origin = record["records"][record["model"]]["init_from"]
    assert origin and str(origin["model"]).startswith("pipeline@sha256:")  # portable: folder name and content hash
    earlier = [r for key, r in record["records"].items() if key != record["model"]]
    assert any(r["split"] == "train" and r["init_from"] is None for r in earlier)  # the first stage's data


def test_freeze_encoder_tunes_the_decoder_and_keeps_the_latents(trained, tmp_path):
    """Stage 2 with --freeze-encoder: the encoder, its quant_conv and the latent scale are the first stage's
    exactly, so a latent model trained on the first stage's latents fits; the decoder moves."""
    data, first = trained
    second = train(
        data, tmp_path / "decoder", "--init-from", str(first / "pipeline"), "--freeze-encoder", "--max-steps", "2",
        "--disc-start", "0", "--lr", "1e-3",
    )  # fmt: skip
    start, after = AutoencoderKL.from_pretrained(first / "pipeline"), AutoencoderKL.from_pretrained(second)
    before_w, after_w = start.state_dict(), after.state_dict()
    encoder_keys = [k for k in before_w if k.startswith(("encoder.", "quant_conv."))]
    decoder_keys = [k for k in before_w if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder_keys and decoder_keys
    assert all(torch.equal(before_w[k], after_w[k]) for k in encoder_keys)
    assert any(not torch.equal(before_w[k], after_w[k]) for k in decoder_keys)
    assert after.config.scaling_factor == start.config.scaling_factor


def test_freeze_encoder_keeps_the_first_stages_scaling_factor_exactly(trained, tmp_path):
    """The factor is the first stage's, not measured again: measured on another CPU it moved in the ninth digit,
    and replace-decoder (rightly) refused the decoder as making other latents."""
    data, first = trained
    marked = tmp_path / "first"
    shutil.copytree(first / "pipeline", marked)
    config = json.loads((marked / "config.json").read_text())
    (marked / "config.json").write_text(json.dumps({**config, "scaling_factor": 1.2345678901234567}))
    second = train(data, tmp_path / "decoder", "--init-from", str(marked), "--freeze-encoder", "--max-steps", "1")
    assert AutoencoderKL.from_pretrained(second).config.scaling_factor == 1.2345678901234567
    third = train(data, tmp_path / "again", "--init-from", str(marked), "--max-steps", "1")  # encoder trains: measured
    assert AutoencoderKL.from_pretrained(third).config.scaling_factor != 1.2345678901234567


def test_freeze_encoder_without_init_from_is_refused_in_one_line(trained, tmp_path, capsys):
    data, _ = trained
    with pytest.raises(SystemExit) as err:
        train(data, tmp_path / "frozen", "--freeze-encoder")
    line = capsys.readouterr().err.strip()
    assert err.value.code == 2 and "\n" not in line and "--freeze-encoder needs --init-from" in line
    assert not (tmp_path / "frozen").exists()  # refused before anything was written


def test_init_from_a_different_autoencoder_is_refused_in_one_line(trained, tmp_path, capsys):
    data, first = trained
    with pytest.raises(SystemExit) as err:
        train(data, tmp_path / "other", "--init-from", str(first / "pipeline"), "--latent-channels", "8")
    line = capsys.readouterr().err.strip()
    assert err.value.code == 2 and "\n" not in line
    assert "has a different architecture from this run's (latent_channels: 4 there, 8 here)" in line


def test_bloodgen_hf_train_knows_the_autoencoder():
    assert TRAIN_ENTRY_POINTS["autoencoder"].__name__ == "_autoencoder_main"


# --- exact resume ------------------------------------------------------------------------------------


def test_resume_reproduces_uninterrupted_training(tmp_path):
    """4 steps straight == 2, stop, resume to 4: both models, both optimizers, the step counter, the RNG.

    The discriminator starts after 1 step, so it and its optimizer hold state at the interruption, and a step
    counter that came back as 0 would switch it off again. SSIM and the adaptive weight are on."""
    data = write_fake_bloodmnist(tmp_path / "data", 64)
    common = ["--disc-start", "1", "--ssim-weight", "0.2", "--checkpoint-every", "2", "--keep-checkpoints", "5"]
    common += ["--disc-weight-mode", "adaptive", "--disc-weight", "0.5"]
    train(data, tmp_path / "full", *common, "--max-steps", "4")
    train(data, tmp_path / "split", *common, "--max-steps", "2")
    train(data, tmp_path / "split", *common, "--max-steps", "4", "--resume", "latest")
    full, split = (tmp_path / name / "checkpoints" / "checkpoint-0000004" for name in ("full", "split"))
    a, b = tensors(full), tensors(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "training_state.json").read_text() == (split / "training_state.json").read_text()
    assert metric_rows(tmp_path / "full") == metric_rows(tmp_path / "split")
    assert {"ssim", "loss_d"} <= metric_rows(tmp_path / "full")[-1].keys()
    scale = (AutoencoderKL.load_config(tmp_path / name / "pipeline")["scaling_factor"] for name in ("full", "split"))
    assert len(set(scale)) == 1


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "30"], "--resolution 30 is not divisible by --spatial-factor 4"),
        (["--resolution", "28"], "gives a 7x7 latent; the latent UNet needs a side that is a multiple of 4"),
        (["--spatial-factor", "3"], "--spatial-factor must be a power of 2"),
        (["--spatial-factor", "8"], "has 3 levels, which halve the image 2 times; --spatial-factor 8 needs 4"),
        (["--latent-channels", "0"], "--latent-channels must be at least 1"),
        (["--block-out-channels", "4,6,8"], "must be multiples of --norm-num-groups 4"),
        (["--block-out-channels", "4;8"], "--block-out-channels takes comma-separated integers such as 32,64,64"),
        (["--block-out-channels", "0,8,8"], "--block-out-channels must be positive, got '0,8,8'"),
        (["--disc-layers", "5"], "leave no patch to score in a 32-pixel image"),
        (["--kl-weight", "-1"], "--kl-weight must be >= 0"),
        (["--split", "all"], "trains on --split train (or val), not 'all'"),
    ],
)
def test_bad_shapes_and_options_are_refused_in_one_line_before_reading_data(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as err:
        train(tmp_path / "no-data-here", tmp_path / "bad", "--max-steps", "1", *extra)
    assert err.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and message in line and "\n" not in line, line


@pytest.mark.parametrize("norm, layer", [("batch", torch.nn.BatchNorm2d), ("spectral", None), ("none", None)])
def test_disc_norm_builds_the_discriminator_it_names(norm, layer):
    disc = PatchDiscriminator(base_channels=8, num_layers=3, norm=norm)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules()) == (layer is not None)
    assert any(hasattr(m, "weight_orig") for m in disc.modules()) == (norm == "spectral")
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_the_default_discriminator_starts_with_logits_that_tell_images_apart():
    """Why --disc-norm defaults to batch: a spectral-norm PatchGAN at 64 px starts with logits about 30 times
    flatter, so its adversarial gradient is tiny, the adaptive weight huge, and the autoencoder, driven by the
    adversarial term alone, kept it at chance (models/patch_discriminator.py)."""
    torch.manual_seed(0)
    images = torch.rand(16, 3, 64, 64) * 2 - 1
    spreads = {}
    for norm in ("batch", "spectral"):
        disc = PatchDiscriminator(base_channels=32, num_layers=3, norm=norm)
        for _ in range(5):  # let spectral norm's power iteration settle, as it does in training
            disc(images)
        spreads[norm] = disc(images).std().item()
    assert spreads["batch"] > 10 * spreads["spectral"], spreads


def test_a_class_conditional_discriminator_judges_the_same_patches_by_their_class():
    torch.manual_seed(0)
    disc = PatchDiscriminator(base_channels=8, num_layers=3, num_classes=8).eval()
    images = torch.rand(2, 3, 64, 64).repeat(4, 1, 1, 1) * 2 - 1  # each image under four labels
    labels = torch.arange(8)
    scores = disc(images, labels)
    assert scores.shape == (8, 1, 6, 6)
    assert not torch.allclose(scores[0], scores[2]) and not torch.allclose(scores[1], scores[3])
    torch.nn.init.zeros_(disc.class_embedding.weight)  # no class signal: the unconditional network's logits
    assert torch.allclose(disc(images, labels), disc.layers(images))
    with pytest.raises(ValueError, match="class_labels must be given"):
        disc(images)
    with pytest.raises(ValueError, match="class_labels must be None"):
        PatchDiscriminator(base_channels=8, num_layers=3)(images, labels)


def test_disc_classes_tunes_the_decoder_against_a_class_conditional_critic_and_saves_a_stock_autoencoder(
    trained, tmp_path
):
    data, first = trained
    second = train(
        data, tmp_path / "decoder", "--init-from", str(first / "pipeline"), "--freeze-encoder", "--disc-classes",
        "--max-steps", "2", "--disc-start", "0", "--checkpoint-every", "1", "--keep-checkpoints", "2",
    )  # fmt: skip
    checkpoints = sorted((second.parent / "checkpoints").glob("checkpoint-*"))
    embeddings = [tensors(c)["discriminator.class_embedding.weight"] for c in checkpoints]
    assert embeddings[0].shape == (8, 4 * 2**2)  # one vector per class, as wide as the last features
    assert not torch.equal(embeddings[0], embeddings[1])  # the labels reach the critic: its class vectors learn
    start, after = AutoencoderKL.from_pretrained(first / "pipeline"), AutoencoderKL.from_pretrained(second)
    assert set(after.state_dict()) == set(start.state_dict())  # nothing of the labels in the saved model
    assert json.loads((second.parent / "train_config.json").read_text())["extra"]["disc_classes"] is True


def test_an_unknown_disc_norm_is_refused():
    with pytest.raises(ValueError, match="norm must be one of batch, spectral, none"):
        PatchDiscriminator(norm="layer")


def test_latent_shape_for_the_latent_model():
    assert latent_shape(64) == (4, 16, 16)
    assert latent_shape(64, 4, 8) == (8, 16, 16)
    assert latent_shape(128, 8, 4) == (4, 16, 16)


# --- PSNR, SSIM and the report -----------------------------------------------------------------------


def test_identical_images_have_ssim_one_and_infinite_psnr():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ssim(x, x), torch.ones(4))
    assert torch.isinf(psnr(x, x)).all()


def test_known_noise_gives_the_expected_psnr_and_lower_ssim():
    generator = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    signs = torch.randint(0, 2, x.shape, generator=generator) * 2 - 1
    for amplitude, expected_db in ((0.1, 20.0), (0.01, 40.0)):
        torch.testing.assert_close(psnr(x + amplitude * signs, x), torch.full((2,), expected_db, dtype=torch.float64))
    assert 1 > ssim(x + 0.01 * signs, x).min() > ssim(x + 0.1 * signs, x).max() > 0
    # on the [-1, 1] range (data_range 2) the same noise is half as large
    torch.testing.assert_close(psnr(2 * x + 0.2 * signs, 2 * x, data_range=2.0), torch.full((2,), 20.0).double())


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.random((32, 32, 3))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    expected = metrics.structural_similarity(
        a, b, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )
    as_batch = lambda image: torch.from_numpy(image).permute(2, 0, 1)[None]  # noqa: E731
    assert ssim(as_batch(b), as_batch(a)).item() == pytest.approx(expected, abs=1e-9)


class ShiftingAutoencoder(torch.nn.Module):
    """An 'autoencoder' whose reconstruction is the image plus `shift` uint8 levels in a checkerboard."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # reconstruct() reads the device from its parameters

    def encode(self, x: torch.Tensor):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z: torch.Tensor):
        board = (torch.arange(z.shape[-1])[None, :] + torch.arange(z.shape[-2])[:, None]) % 2 * 2 - 1
        return SimpleNamespace(sample=z + board * self.shift / 127.5)


class PixelFeatures(FeatureExtractor):
    name = "pixels"

    def extract(self, images: np.ndarray, progress: bool = True, desc: str = "") -> Features:
        return Features(images.reshape(len(images), -1)[:, :8].astype(np.float32) / 255)


class BrightnessClassifier(PixelFeatures):
    """Class 1 for images brighter than mid-grey on average, else class 0."""

    def extract(self, images: np.ndarray, progress: bool = True, desc: str = "") -> Features:
        bright = images.reshape(len(images), -1).mean(1) > 127.5
        return Features(super().extract(images).features, np.stack([~bright, bright], 1).astype(np.float32))


def test_reconstruction_report_class_accuracy_counts_reconstructions_kept_in_their_class():
    images = np.concatenate([np.full((3, 16, 16, 3), 100, np.uint8), np.full((3, 16, 16, 3), 150, np.uint8)])
    labels = np.array([0, 0, 0, 1, 1, 1])
    darker = images - 40  # the 150s become 110s: now read as class 0
    report = reconstruction_report(
        ShiftingAutoencoder(0), images, BrightnessClassifier(), reconstructions=darker, labels=labels
    )
    assert report["class_accuracy"] == 0.5
    assert report["class_accuracy_by_class"] == {"0": 1.0, "1": 0.0}  # the average hides the class it loses
    assert "class_accuracy" not in reconstruction_report(ShiftingAutoencoder(0), images, BrightnessClassifier())
    assert "class_accuracy" not in reconstruction_report(ShiftingAutoencoder(0), images, PixelFeatures(), labels=labels)


class ForgetfulAutoencoder(ShiftingAutoencoder):
    """Its latents are all zero: they keep nothing of the image."""

    def encode(self, x: torch.Tensor):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: torch.zeros_like(x)))


def test_latent_probe_finds_the_class_the_latents_keep_and_not_one_they_lose():
    """A linear probe of the latents: perfect where they are the pixels and the classes differ in brightness, no
    better than the train split's first class where they are all zero; the same scores every time."""
    rng = np.random.default_rng(0)

    def cells(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 2
        base = np.where(labels == 1, 170, 80)[:, None, None, None]
        return np.clip(base + rng.normal(0, 20, (n, 8, 8, 3)), 0, 255).astype(np.uint8), labels

    (train, train_labels), (test, test_labels) = cells(40), cells(20)
    keeps = latent_probe(ShiftingAutoencoder(0), train, train_labels, test, test_labels)
    assert keeps == {"probe_accuracy": 1.0, "probe_accuracy_by_class": {"0": 1.0, "1": 1.0}}
    assert latent_probe(ShiftingAutoencoder(0), train, train_labels, test, test_labels) == keeps
    loses = latent_probe(ForgetfulAutoencoder(0), train, train_labels, test, test_labels)
    assert loses == {"probe_accuracy": 0.5, "probe_accuracy_by_class": {"0": 1.0, "1": 0.0}}
    with pytest.raises(UsageError, match="every image needs a label"):
        latent_probe(ShiftingAutoencoder(0), train, train_labels[:-1], test, test_labels)


def test_reconstruction_report_psnr_ssim_and_fd():
    rng = np.random.default_rng(0)
    images = rng.integers(30, 220, size=(6, 32, 32, 3), dtype=np.uint8)
    exact = reconstruction_report(ShiftingAutoencoder(0), images, PixelFeatures())
    assert exact["ssim"] == 1.0 and exact["psnr"] == float("inf") and exact["fd_pixels"] == pytest.approx(0, abs=1e-6)
    shifted = reconstruct(ShiftingAutoencoder(10), images)
    assert np.abs(shifted.astype(int) - images).max() == 10
    np.testing.assert_array_equal(reconstruct(ShiftingAutoencoder(10), images, batch_size=4), shifted)
    assert reconstruct(ShiftingAutoencoder(10), images[:0]).shape == (0, 32, 32, 3)
    noisy = reconstruction_report(ShiftingAutoencoder(10), images, PixelFeatures(), reconstructions=shifted)
    assert noisy["psnr"] == pytest.approx(20 * np.log10(255 / 10)) == noisy["psnr_of_mean_mse"]
    assert noisy["l1"] == pytest.approx(10 / 255) and 0 < noisy["ssim"] < 1 and noisy["fd_pixels"] > 0
    assert noisy["num_images"] == 6
    real = PixelFeatures().extract(images).features  # taken once for several autoencoders: the same report
    given = reconstruction_report(
        ShiftingAutoencoder(10), images, PixelFeatures(), reconstructions=shifted, real_features=real
    )
    assert given == noisy
    assert exact["precision"] == exact["recall"] == 1.0  # every original lies on its own reconstruction


def test_reconstruction_report_recall_falls_when_the_decoder_draws_one_cell_for_all():
    rng = np.random.default_rng(1)
    images = rng.integers(30, 220, size=(8, 16, 16, 3), dtype=np.uint8)
    one_cell = np.repeat(images[:1], len(images), axis=0)
    report = reconstruction_report(ShiftingAutoencoder(0), images, PixelFeatures(), reconstructions=one_cell)
    assert report["precision"] == 1.0 and report["recall"] == 0.0
    few = reconstruction_report(ShiftingAutoencoder(0), images[:5], PixelFeatures(), nearest_k=5)
    assert "recall" not in few and "fd_pixels" in few  # k-NN balls need more than k images


def test_encoder_fingerprint_follows_the_encoder_and_ignores_the_decoder(trained):
    """A stage 2 trained with --freeze-encoder has its stage 1's latents: the same fingerprint, so one probe."""
    _, run = trained
    vae = AutoencoderKL.from_pretrained(run / "pipeline")
    fingerprint = encoder_fingerprint(vae)
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(1.0)
        assert encoder_fingerprint(vae) == fingerprint
        vae.quant_conv.bias.add_(1e-3)
        assert encoder_fingerprint(vae) != fingerprint


def test_evaluate_autoencoder_on_the_test_split(trained):
    data, run = trained
    report, reconstructions = evaluate_autoencoder(run / "pipeline", "test", data)
    assert report["split"] == "test" and report["resolution"] == 32 and report["num_images"] == 16
    assert reconstructions.shape == (16, 32, 32, 3) and reconstructions.dtype == np.uint8
    assert np.isfinite(report["psnr"]) and -1 < report["ssim"] < 1


def test_the_reconstruction_report_scores_each_autoencoder_and_pictures_the_same_cells(trained, tmp_path):
    """benchmarks/autoencoder_report.py: one row per autoencoder, a picture of real rows beside each one's."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import autoencoder_report

    data, run = trained
    folder = str(run / "pipeline")
    out = tmp_path / "report"
    autoencoder_report.main(
        ["--autoencoders", f"a={folder}", f"b={folder}", "--data-dir", str(data), "--out", str(out), "--latent-probe"]
    )
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["a", "b"] and rows[0]["split"] == "test"
    assert 0 <= rows[0]["probe_accuracy"] <= 1 and rows[0]["probe_accuracy"] == rows[1]["probe_accuracy"]
    assert rows[0]["encoder_sha256"] == rows[1]["encoder_sha256"]  # one encoder: one probe for both
    assert "| latent probe | its worst class |" in (out / "report.md").read_text()
    assert rows[0]["psnr"] == rows[1]["psnr"] and 0 < rows[0]["ssim"] <= 1
    assert "| a |" in (out / "report.md").read_text()
    unprobed = {key: value for key, value in rows[0].items() if not key.startswith("probe_")}
    row = {**unprobed, "fd_bloodnet": 3.5, "class_accuracy": 0.9, "class_accuracy_by_class": {"0": 0.6, "1": 0.95}}
    with_classifier = autoencoder_report.report_markdown([row], "val", 0.98, ["basophil", "eosinophil"])
    assert "| 3.500 | 0.9000 | basophil 0.600 |" in with_classifier  # the worst-kept class, named
    with Image.open(out / "reconstructions.png") as picture:
        assert picture.width > 3 * 32  # at least real, a and b side by side in each class row
