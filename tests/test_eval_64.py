"""Issue 34 (5, 6): evaluation at 64 px. `evaluate`, `compare` and `augment-study` at `--resolution`, a BloodNet of
another resolution refused, 28 px models scored at 64 with `--upsample bicubic` (and labelled), `grid` and `sample`
with a 64 px latent model; on the fake 64 px archive, a tiny 64 px LDM and tiny BloodNets (tests/conftest.py).
evaluate's one-line refusals of a 28 px model at 64 px without --upsample, of downsampling and of a bad --upsample
are among the CLI's in tests/test_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bloodgen_hf.cli import app
from bloodgen_hf.data import CLASS_NAMES
from bloodgen_hf.errors import UsageError
from bloodgen_hf.evaluation import cache as C
from bloodgen_hf.evaluation import features as F
from bloodgen_hf.evaluation.features import INCEPTION_FILE, FeatureExtractor, Features
from bloodgen_hf.evaluation.protocol import Upsample
from bloodgen_hf.evaluation.runner import file_stem, scoring_resolution, upsampling
from bloodgen_hf.provenance import training_provenance
from bloodgen_hf.registry import save_pipeline
from tests.conftest import SMALL_EVAL, one_error_line, saved_bloodnet, tiny_gan_pipeline
from tests.test_eval_features import StandInInception


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared, busy CPU two threads wait on each other; results are the same."""
    torch.set_num_threads(1)


def tiny_gan_64(provenance: dict | None = None):
    from bloodgen_hf.models.gan import ConditionalGenerator
    from bloodgen_hf.pipelines import BloodGANPipeline

    torch.manual_seed(0)
    gan = ConditionalGenerator(
        resolution=64, latent_dim=16, base_channels=8, embed_dim=8, class_names=list(CLASS_NAMES)
    )
    return BloodGANPipeline(gan=gan, provenance=provenance)


@pytest.fixture
def inception_file(tmp_path: Path) -> Path:
    """A TorchScript stand-in for clean-fid's Inception file (tests/test_eval_features.py)."""
    torch.manual_seed(0)
    path = tmp_path / INCEPTION_FILE
    torch.jit.script(StandInInception()).save(str(path))
    return path


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- evaluate ----------------------------------------------------------------------------------------------


def test_evaluate_a_64px_model_scores_every_metric_at_64_by_default(ldm_64_dir, args_64, tmp_path):
    """No --resolution: the model's own 64 px; real images, features, classifier and near-copies all at 64."""
    out = tmp_path / "eval"
    result = invoke("evaluate", "--model", ldm_64_dir, *SMALL_EVAL, *args_64, "--out", out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["size"] == 64 and results["protocol"]["upsample"] is None
    assert results["model"] == str(ldm_64_dir)
    metrics = results["metrics"]
    for key in ("fd_bloodnet", "precision_bloodnet", "recall_bloodnet", "class_accuracy", "memorization"):
        assert np.isfinite(metrics[key]["mean"]), key
    assert set(results["per_class"]["class_accuracy"]) <= set(CLASS_NAMES)
    assert "class_accuracy" in results["floor"] and "fd_bloodnet" in results["floor"]
    assert "at 64px vs n generated (" in (out / "summary.md").read_text()
    assert [p.name for p in (tmp_path / "cache").iterdir()][0].startswith("bloodmnist-64px-all-bloodnet-")
    pairs = np.asarray(Image.open(out / "memorization_pairs.png"))
    assert pairs.shape[0] == 2 * 64 + 3 * 2  # two rows of 64 px images, not enlarged


def test_evaluate_at_64_with_clean_fid_inception(ldm_64_dir, args_64, inception_file, tmp_path):
    """clean-fid's path (PIL-bicubic resize to 299) takes 64 px images as it takes 28 px ones; BloodNet judges."""
    out = tmp_path / "eval"
    args = [*args_64, "--extractor", "inception", "--inception-weights", inception_file, "--metrics", "fid,kid,is,pr"]
    few = ["--split", "test", "--n", 12, "--no-floor", "--runs", 1, "--batch-size", 12]  # 28 images through Inception
    result = invoke("evaluate", "--model", ldm_64_dir, *few, *args, "--metrics", "accuracy", "--out", out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["size"] == 64 and results["protocol"]["extractor"]["name"] == "inception"
    for key in ("fid", "kid", "is", "precision", "recall", "class_accuracy"):
        assert np.isfinite(results["metrics"][key]["mean"]), key


def test_a_bloodnet_of_another_resolution_is_refused_naming_how_to_train_one(
    ldm_64_dir, fake_data_dir, inception_file, tmp_path
):
    bloodnet_28 = saved_bloodnet(tmp_path / "bloodnet-28", 28)
    for extractor in ("bloodnet", "inception"):  # as the feature extractor, or only as the class-accuracy judge
        args = ["--extractor", extractor, "--bloodnet", bloodnet_28, "--data-dir", fake_data_dir, "--device", "cpu"]
        args += ["--inception-weights", inception_file]
        result = invoke("evaluate", "--model", ldm_64_dir, *SMALL_EVAL, *args, "--out", tmp_path / "e")
        line = one_error_line(result)
        assert f"BloodNet at {bloodnet_28 / 'classifier'} was trained at 28 px; scoring at 64 px" in line
        assert "bloodgen-hf train bloodnet --resolution 64" in line


@pytest.fixture
def no_bloodnet_env(monkeypatch):
    """No $BLOODGEN_BLOODNET: BloodNet is the bundled one of the scored size."""
    from bloodgen_hf.evaluation.bloodnet import BLOODNET_ENV

    monkeypatch.delenv(BLOODNET_ENV, raising=False)


def bundled_identity(folder: str) -> str:
    from bloodgen_hf.registry import BUNDLED_DIR, WEIGHTS_NAME

    return "bloodnet:" + F.file_sha256(BUNDLED_DIR / folder / "classifier" / WEIGHTS_NAME)


def test_evaluate_a_64px_model_without_bloodnet_uses_the_bundled_64px_one(
    ldm_64_dir, fake_data_dir, no_bloodnet_env, tmp_path
):
    out = tmp_path / "eval"
    args = ["--extractor", "bloodnet", "--metrics", "fd,accuracy", "--no-floor", "--data-dir", fake_data_dir]
    args += ["--cache-dir", tmp_path / "cache", "--device", "cpu", "--out", out]
    result = invoke("evaluate", "--model", ldm_64_dir, *SMALL_EVAL, *args)
    assert result.exit_code == 0, result.output
    protocol = json.loads((out / "results.json").read_text())["protocol"]
    assert protocol["size"] == 64 and protocol["extractor"]["identity"] == bundled_identity("bloodnet-64")


def test_compare_without_resolution_or_bloodnet_scores_with_the_bundled_one_of_the_largest_size(
    ldm_64_dir, tiny_gan_dir, fake_data_dir, inception_file, no_bloodnet_env, tmp_path
):
    """--upsample without --resolution scores at the largest model's size (64 px), so BloodNet, here only the class
    accuracy judge, is the 64 px one."""
    out = tmp_path / "report"
    args = ["--extractor", "inception", "--inception-weights", inception_file, "--metrics", "accuracy", "--no-floor"]
    args += ["--data-dir", fake_data_dir]
    args += ["--cache-dir", tmp_path / "cache", "--device", "cpu", "--out", out]
    result = invoke("compare", "--models", tiny_gan_dir, ldm_64_dir, "--upsample", "bicubic", *SMALL_EVAL, *args)
    assert result.exit_code == 0, result.output
    gan = json.loads((out / "models" / "tiny_gan-28to64-bicubic" / "results.json").read_text())
    assert gan["protocol"]["size"] == 64 and gan["protocol"]["upsample"]["from"] == 28
    assert gan["protocol"]["classifier"]["identity"] == bundled_identity("bloodnet-64")


def test_a_needless_bloodnet_of_another_size_is_refused_naming_the_bundled_one(
    ldm_64_dir, fake_data_dir, no_bloodnet_env, tmp_path
):
    bloodnet_28 = saved_bloodnet(tmp_path / "bloodnet-28", 28)
    args = ["--extractor", "bloodnet", "--bloodnet", bloodnet_28, "--data-dir", fake_data_dir, "--device", "cpu"]
    line = one_error_line(invoke("evaluate", "--model", ldm_64_dir, *SMALL_EVAL, *args, "--out", tmp_path / "e"))
    assert "(the bundled one is used without --bloodnet and $BLOODGEN_BLOODNET), or train one" in line


def test_evaluate_upsampled_is_labelled_and_recorded(tiny_gan_dir, args_64, tmp_path):
    out = tmp_path / "eval"
    args = ["--resolution", 64, "--upsample", "bicubic", "--metrics", "fd,accuracy,memorization"]
    result = invoke("evaluate", "--model", tiny_gan_dir, *SMALL_EVAL, *args_64, *args, "--out", out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == f"{tiny_gan_dir} (28->64 bicubic)"
    assert results["protocol"]["size"] == 64
    assert results["protocol"]["upsample"] == {"method": "bicubic", "from": 28, "to": 64}
    summary = (out / "summary.md").read_text()
    assert "(28->64 bicubic)`" in summary and "made at 28px and upsampled (bicubic)" in summary
    recorded = invoke("evaluate", "--model", tiny_gan_dir, *args_64, *args, "--record", "--out", tmp_path / "e")
    assert "an --upsample evaluation is a baseline" in one_error_line(recorded)


# --- compare -----------------------------------------------------------------------------------------------


def test_compare_scores_a_64px_model_and_an_upsampled_28px_one_in_one_table(
    ldm_64_dir, tiny_gan_dir, args_64, tmp_path
):
    out = tmp_path / "report"
    models = ["--models", ldm_64_dir, tiny_gan_dir, "--resolution", 64, "--upsample", "bicubic"]
    result = invoke("compare", *models, *SMALL_EVAL, *args_64, "--metrics", "fd,accuracy", "--no-floor", "--out", out)
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "| metric | | ldm-64 | tiny_gan (28->64 bicubic) | real vs real |" in report
    assert "at 64px vs n generated (" in report  # one resolution for the table
    ldm = json.loads((out / "models" / "ldm-64" / "results.json").read_text())
    gan = json.loads((out / "models" / "tiny_gan-28to64-bicubic" / "results.json").read_text())
    assert ldm["protocol"]["size"] == gan["protocol"]["size"] == 64
    assert ldm["protocol"]["upsample"] is None and gan["protocol"]["upsample"]["from"] == 28
    assert (
        Image.open(out / "grids" / "tiny_gan-28to64-bicubic.png").size == Image.open(out / "grids" / "ldm-64.png").size
    )

    again = invoke(
        "compare", *models, *SMALL_EVAL, *args_64, "--metrics", "fd,accuracy", "--no-floor", "--out", out, "--reuse"
    )
    assert again.exit_code == 0 and again.output.count("reusing") == 2, again.output


def test_compare_of_models_of_different_sizes_needs_one_resolution(ldm_64_dir, tiny_gan_dir, args_64, tmp_path):
    result = invoke("compare", "--models", ldm_64_dir, tiny_gan_dir, *SMALL_EVAL, *args_64, "--out", tmp_path / "r")
    line = one_error_line(result)
    assert "different sizes (ldm-64: 64 px, tiny_gan: 28 px)" in line and "--resolution 64 --upsample bicubic" in line


def test_resolution_and_upsampling_rules():
    assert scoring_resolution({"a": 28, "b": 28}, None, None) == 28
    assert scoring_resolution({"a": 64, "b": 28}, None, "bicubic") == 64
    assert scoring_resolution({"a": 28}, 64, None) == 64
    assert upsampling("a", 64, 64, "bicubic") is None
    plan = upsampling("a", 28, 64, "bicubic")
    assert plan == Upsample("bicubic", 28, 64) and plan.suffix == " (28->64 bicubic)"
    assert file_stem("ddpm-fast" + plan.suffix) == "ddpm-fast-28to64-bicubic" and file_stem("tiny_gan") == "tiny_gan"
    with pytest.raises(UsageError, match="only enlarges"):
        Upsample("bicubic", 64, 28)


def test_upsample_is_pil_bicubic_in_uint8():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    big = Upsample("bicubic", 28, 64)(images)
    assert big.shape == (3, 64, 64, 3) and big.dtype == np.uint8
    expected = np.asarray(Image.fromarray(images[1]).resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(big[1], expected)


class MeanColours(FeatureExtractor):
    """Mean colours of a 4x4 grid of patches (any size divisible by 4); counts the images it was asked for."""

    name, identity = "colours", "colours:1"

    def __init__(self):
        self.calls: list[int] = []

    def extract(self, images, progress=True, desc="colours") -> Features:
        self.calls.append(len(images))
        n, h = len(images), images.shape[1]
        return Features(images.reshape(n, 4, h // 4, 4, h // 4, 3).mean(axis=(2, 4)).reshape(n, -1).astype(np.float32))


def test_cache_keys_differ_by_resolution(fake_data_dir, tmp_path):
    from bloodgen_hf.evaluation.protocol import RealData

    extractor, cache = MeanColours(), tmp_path / "cache"
    small, large = RealData.load("all", 28, fake_data_dir), RealData.load("all", 64, fake_data_dir)
    paths = {
        real.size: C.cache_path(cache, real.dataset, real.size, "all", extractor, real.images)
        for real in (small, large)
    }
    assert paths[28] != paths[64] and "-28px-" in paths[28].name and "-64px-" in paths[64].name
    for real in (small, large, small):  # both entries stay: writing one never removes the other size's
        C.cached_features(extractor, real.images, dataset=real.dataset, size=real.size, split="all", cache_dir=cache)
    assert extractor.calls == [80, 80] and sorted(cache.iterdir()) == sorted(paths.values())


# --- training a 64 px BloodNet, augment-study, grid and sample ------------------------------------------------


def test_train_bloodnet_at_64_then_evaluate_with_it(ldm_64_dir, fake_data_dir, tmp_path):
    net = tmp_path / "bloodnet-64"
    train = ["train", "bloodnet", "--data-dir", fake_data_dir, "--resolution", 64, "--split", "train"]
    train += ["--output-dir", net, "--max-steps", 1, "--batch-size", 8, "--channels", "4,8", "--blocks-per-stage", 1]
    result = invoke(*train, "--log-with", "none")
    assert result.exit_code == 0, result.output
    assert json.loads((net / "pipeline" / "classifier" / "config.json").read_text())["resolution"] == 64
    assert json.loads((net / "pipeline" / "test_metrics.json").read_text())["num_images"] == 16

    args = ["--extractor", "bloodnet", "--bloodnet", net / "pipeline", "--data-dir", fake_data_dir, "--device", "cpu"]
    out = tmp_path / "eval"
    result = invoke(
        "evaluate", "--model", ldm_64_dir, *SMALL_EVAL, *args, "--metrics", "fd", "--no-floor", "--out", out
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["protocol"]["size"] == 64


def test_augment_study_at_64(fake_data_dir, tmp_path):
    gan = save_pipeline(tiny_gan_64(training_provenance("bloodmnist", 64, "train", 48)), tmp_path / "gan-64")
    out = tmp_path / "study"
    args = ["--model", gan, "--data-dir", fake_data_dir, "--fractions", "1", "--seeds", "0", "--out", out]
    args += ["--settings", "synthetic", "--protocol", "fixed-steps", "--steps", 1, "--batch-size", 16]
    result = invoke("augment-study", *args, "--resolution", 64, "--device", "cpu")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["resolution"] == 64 and [r["setting"] for r in results["runs"]] == ["synthetic"]
    classifier = json.loads(
        (out / "runs" / "synthetic-1x-1-seed0" / "pipeline" / "classifier" / "config.json").read_text()
    )
    assert classifier["resolution"] == 64
    with np.load(out / "synthetic_pool.npz") as pool:
        assert pool["images"].shape[1:] == (64, 64, 3)
    assert "Images at 64 px." in (out / "report.md").read_text()


def test_augment_study_refuses_a_generator_of_another_size(fake_data_dir, tmp_path):
    pipe = tiny_gan_pipeline()
    gan = save_pipeline(
        type(pipe)(gan=pipe.gan, provenance=training_provenance("bloodmnist", 28, "train", 48)), tmp_path / "g"
    )
    out = tmp_path / "study"
    args = ["--model", gan, "--data-dir", fake_data_dir, "--out", out, "--resolution", 64, "--device", "cpu"]
    line = one_error_line(invoke("augment-study", *args))
    assert "makes 28 px images, not 64 px (--resolution 64)" in line
    per_fraction = ["--generator-per-fraction", "gan", "--generator-steps", 1, "--generator-resolution", 28]
    line = one_error_line(invoke("augment-study", *per_fraction, "--resolution", 64, "--out", out))
    assert "--generator-resolution 28 differs from --resolution 64" in line
    assert not (out / "results.json").exists()


def test_grid_and_sample_with_a_64px_latent_model(ldm_64_dir, tmp_path):
    grid = tmp_path / "grid.png"
    result = invoke("grid", "--model", ldm_64_dir, "--per-class", 2, "--scale", 1, "--out", grid)
    assert result.exit_code == 0, result.output
    width, height = Image.open(grid).size
    assert height == 8 * (64 + 2) + 2 and width > 2 * (64 + 2)
    samples = tmp_path / "samples"
    result = invoke("sample", "--model", ldm_64_dir, "--n", 8, "--out", samples)
    assert result.exit_code == 0, result.output
    pngs = sorted(samples.rglob("*.png"))
    assert len(pngs) == 8 and {Image.open(p).size for p in pngs} == {(64, 64)}
