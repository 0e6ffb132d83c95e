"""`--dataset`: ImageFolder and `datasets` sources, MedMNIST flags, train -> sample -> evaluate on
non-BloodMNIST classes, evaluators that must match the generator, and one clear error per kind of bad data."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bloodgen_hf.cli import app
from bloodgen_hf.data import CLASS_NAMES, DataError, class_index, load_data, partition
from bloodgen_hf.evaluation.bloodnet import BUNDLED_BLOODNET
from tests.conftest import SPLIT_SIZES

CLASSES = ("alpha", "beta", "gamma")
PER_CLASS = 12
SIZE = 32
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))
TINY_GAN = ["--batch-size", "8", "--base-channels", "8", "--latent-dim", "16", "--log-with", "none"]
TINY_NET = ["--batch-size", "8", "--channels", "8,16", "--blocks-per-stage", "1", "--log-with", "none"]

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def cell_images(seed: int = 0) -> list[tuple[Image.Image, int]]:
    """PER_CLASS noisy images per class, each class its own colour, so a tiny model can tell them apart."""
    rng = np.random.default_rng(seed)
    images = []
    for label, colour in enumerate(COLOURS):
        for _ in range(PER_CLASS):
            pixels = np.clip(np.asarray(colour) + rng.integers(-30, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            images.append((Image.fromarray(pixels), label))
    return images


def write_folder(root: Path, images=None) -> Path:
    for i, (image, label) in enumerate(images or cell_images()):
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        image.save(root / CLASSES[label] / f"cell_{i:03d}.png")
    return root


def hf_dataset(images, names=CLASSES):
    """Deliberately not called image/label: the loader finds the Image and ClassLabel columns by type."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"picture": ImageFeature(), "cell_type": ClassLabel(names=list(names))})
    return Dataset.from_dict({"picture": [i for i, _ in images], "cell_type": [y for _, y in images]}, features)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "cells")


@pytest.fixture
def saved_dataset(tmp_path: Path) -> Path:
    hf_dataset(cell_images()).save_to_disk(str(tmp_path / "cells_hf"))
    return tmp_path / "cells_hf"


# --- loading -------------------------------------------------------------------------------------------


def test_image_folder_gives_its_classes_a_fixed_stratified_partition_and_any_resolution(image_folder):
    data = load_data(str(image_folder), "all", SIZE)
    assert data.class_names == CLASSES
    assert data.images.shape == (3 * PER_CLASS, SIZE, SIZE, 3) and data.images.dtype == np.uint8
    assert np.bincount(data.labels).tolist() == [PER_CLASS] * 3
    for split in ("val", "test"):  # 10% of each class (at least one) in val and in test, the rest train
        assert np.bincount(data.labels[data.splits == split], minlength=3).tolist() == [1, 1, 1]
    train = load_data(str(image_folder), "train", SIZE)
    assert len(train.labels) == 3 * (PER_CLASS - 2)
    np.testing.assert_array_equal(train.images, data.images[data.splits == "train"])
    assert np.array_equal(partition(data.labels), data.splits)  # fixed: the same every time
    assert load_data(str(image_folder), "all", 16).images.shape[1:] == (16, 16, 3)
    with pytest.raises(DataError, match="unknown split 'training'"):
        load_data(str(image_folder), "training", SIZE)


def test_image_modes_are_converted_and_wide_images_centre_cropped(tmp_path):
    wide = np.zeros((SIZE, SIZE + 8, 3), np.uint8)
    wide[:, :4] = 255  # a white band that the centre crop removes
    wide[:, 4:] = (0, 0, 200)
    images = [
        (Image.fromarray(wide), 0),
        (Image.new("L", (SIZE, SIZE), 90), 0),
        (Image.new("RGBA", (SIZE, SIZE), (10, 20, 30, 0)), 1),
        (Image.new("RGB", (SIZE, SIZE), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), 1),
    ]
    data = load_data(str(write_folder(tmp_path / "mixed", images)), "all", SIZE)
    assert data.images.shape == (4, SIZE, SIZE, 3)
    assert (data.images[0] == (0, 0, 200)).all()  # centre-cropped, not squashed
    assert (data.images[1] == 90).all()  # greyscale -> RGB
    assert (data.images[2] == (10, 20, 30)).all()  # alpha dropped
    assert (data.images[3] == (10, 200, 30)).all()  # palette -> RGB


def test_saved_dataset_reads_the_same_as_the_image_folder(image_folder, saved_dataset):
    a, b = load_data(str(image_folder), "all", SIZE), load_data(str(saved_dataset), "all", SIZE)
    assert a.class_names == b.class_names == CLASSES
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.splits, b.splits)


def test_dataset_dict_splits_are_its_own(tmp_path):
    from datasets import DatasetDict

    images = cell_images()
    parts = {"train": images[::3] + images[1::3], "validation": images[2::6], "test": images[5::6]}
    DatasetDict({k: hf_dataset(v) for k, v in parts.items()}).save_to_disk(str(tmp_path / "dd"))
    val = load_data(str(tmp_path / "dd"), "val", SIZE)
    assert len(val.labels) == len(parts["validation"]) and set(val.splits) == {"validation"}
    assert len(load_data(str(tmp_path / "dd"), "all", SIZE).labels) == len(images)


def test_bloodmnist_other_sizes_are_resized_from_the_next_archive(fake_data_dir):
    native = load_data("bloodmnist", "train", 28, fake_data_dir)
    assert native.class_names == CLASS_NAMES
    from bloodgen_hf.data import load_arrays

    np.testing.assert_array_equal(native.images, load_arrays("train", 28, fake_data_dir)[0])  # as before
    resized = load_data("bloodmnist", "train", 32, fake_data_dir)  # from bloodmnist_64.npz
    assert resized.images.shape == (SPLIT_SIZES["train"], 32, 32, 3)
    with pytest.raises(DataError, match="up to 224"):
        load_data("bloodmnist", "train", 256, fake_data_dir)


def test_other_medmnist_flags_take_their_class_names_from_medmnist(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in SPLIT_SIZES.items():  # pneumoniamnist is greyscale with 2 classes
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    data = load_data("pneumoniamnist", "all", 28, tmp_path)
    assert data.class_names == ("normal", "pneumonia")
    assert data.images.shape == (sum(SPLIT_SIZES.values()), 28, 28, 3)
    assert (data.images[..., 0] == data.images[..., 2]).all()
    with pytest.raises(DataError, match="multi-label"):
        load_data("chestmnist", "all", 28, tmp_path)
    with pytest.raises(DataError, match="unknown --dataset 'no-such-thing'"):
        load_data("no-such-thing", "all", 28)


def test_class_index_uses_the_given_names():
    assert class_index("Beta", CLASSES) == 1 and class_index("gammas", CLASSES) == 2 and class_index(0, CLASSES) == 0
    with pytest.raises(ValueError, match="unknown class 'neutrophil'; choose from: alpha, beta, gamma"):
        class_index("neutrophil", CLASSES)


def test_export_imagefolder_round_trips_bloodmnist_exactly(fake_data_dir, tmp_path):
    out = tmp_path / "blood64"
    result = invoke("export-imagefolder", "--size", 64, "--split", "train", "--data-dir", fake_data_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(CLASS_NAMES)
    back, original = load_data(str(out), "all", 64), load_data("bloodmnist", "train", 64, fake_data_dir)
    assert back.class_names == CLASS_NAMES
    order = np.argsort(original.labels, kind="stable")  # the folder is read class by class
    np.testing.assert_array_equal(back.images, original.images[order])
    np.testing.assert_array_equal(back.labels, original.labels[order])


# --- train -> sample -> evaluate on other classes ---------------------------------------------------------


@pytest.mark.parametrize("source", ["image_folder", "saved_dataset"])
def test_train_sample_evaluate_on_own_classes(source, request, tmp_path, fake_data_dir):
    data = request.getfixturevalue(source)
    gan, net = tmp_path / "gan", tmp_path / "bloodnet"
    args = ("--dataset", data, "--resolution", SIZE)
    result = invoke("train", "gan", *args, "--output-dir", gan, "--max-steps", 2, *TINY_GAN)
    assert result.exit_code == 0, result.output
    config = json.loads((gan / "pipeline" / "gan" / "config.json").read_text())
    assert config["class_names"] == list(CLASSES) and config["num_classes"] == 3 and config["resolution"] == SIZE
    recorded = json.loads((gan / "train_config.json").read_text())
    assert recorded["dataset"] == str(data) and recorded["resolution"] == SIZE

    result = invoke("train", "bloodnet", *args, "--split", "train", "--output-dir", net, "--max-steps", 2, *TINY_NET)
    assert result.exit_code == 0, result.output
    report = json.loads((net / "pipeline" / "test_metrics.json").read_text())
    assert report["class_names"] == list(CLASSES) and report["num_images"] == 3  # one test image per class

    samples = tmp_path / "samples"
    result = invoke("sample", "--n", 4, "--model", gan / "pipeline", "--class", "Beta", "--out", samples)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(samples / "manifest.csv")))
    assert {(r["label"], r["class_name"]) for r in rows} == {("1", "beta")}
    assert all(Image.open(samples / r["file"]).size == (SIZE, SIZE) for r in rows)

    evaluation = ("evaluate", "--model", gan / "pipeline", *args[:2], "--extractor", "bloodnet", "--runs", 1, "--n", 12)
    evaluation += ("--metrics", "fd,accuracy", "--no-floor", "--cache-dir", tmp_path / "cache", "--device", "cpu")
    result = invoke(*evaluation, "--bloodnet", net / "pipeline", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["protocol"]["class_names"] == list(CLASSES)
    assert set(results["per_class"]["class_accuracy"]) == set(CLASSES)
    assert 0 <= results["metrics"]["class_accuracy"]["mean"] <= 1

    refused = invoke(*evaluation, "--out", tmp_path / "eval-unbundled")  # no BloodNet is bundled at 32 px
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "no bundled BloodNet for 32 px" in refused.output and not (tmp_path / "eval-unbundled").exists()

    bundled = ("--bloodnet", BUNDLED_BLOODNET)  # it knows 8 other classes
    refused = invoke(*evaluation, *bundled, "--out", tmp_path / "eval-bundled")
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "classifies 8 classes: basophil" in refused.output and "3 classes: alpha, beta, gamma" in refused.output
    assert not (tmp_path / "eval-bundled").exists()

    compared = ("compare", "--models", gan / "pipeline", *args[:2], "--extractor", "bloodnet", "--runs", 1)
    refused = invoke(*compared, *bundled, "--n", 12, "--no-floor", "--out", tmp_path / "report")
    assert refused.exit_code == 2 and "classifies 8 classes" in refused.output and not (tmp_path / "report").exists()

    wrong_data = ("--dataset", "bloodmnist", "--data-dir", fake_data_dir, "--bloodnet", net / "pipeline")
    refused = invoke(*evaluation[:3], *evaluation[5:], *wrong_data, "--out", tmp_path / "eval-wrong")
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "generates 3 classes: alpha, beta, gamma, but --dataset bloodmnist has 8 classes" in refused.output


# --- bad data: one line each, nothing written -----------------------------------------------------------------


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def empty_class(root):
    (root / "delta").mkdir()


def single_class(root):
    for name in ("beta", "gamma"):
        for file in (root / name).iterdir():
            file.unlink()
        (root / name).rmdir()


def corrupt_file(root):
    (root / "beta" / "broken.png").write_bytes(b"these bytes are no PNG")


def truncated_file(root):
    (root / "beta" / "cut.png").write_bytes(png_bytes(Image.new("RGB", (SIZE, SIZE), (1, 2, 3)))[:60])


def cmyk_file(root):
    (root / "gamma" / "print.jpg").write_bytes(png_bytes(Image.new("CMYK", (SIZE, SIZE)), "JPEG"))


def sixteen_bit_file(root):
    (root / "gamma" / "deep.png").write_bytes(png_bytes(Image.new("I;16", (SIZE, SIZE))))


def small_file(root):
    (root / "alpha" / "tiny.png").write_bytes(png_bytes(Image.new("RGB", (20, 24))))


BAD_FOLDERS = {
    "empty class folder": (empty_class, r"cells/delta is an empty class folder"),
    "single class": (single_class, r"has only one class \('alpha'\); a class-conditional model needs at least 2"),
    "corrupt file": (corrupt_file, r"beta/broken\.png is not a readable image"),
    "truncated file": (truncated_file, r"beta/cut\.png is not a readable image"),
    "CMYK image": (cmyk_file, r"gamma/print\.jpg has image mode CMYK; only 8-bit RGB, RGBA, L"),
    "16-bit image": (sixteen_bit_file, r"gamma/deep\.png has image mode I;16"),
    "image too small": (small_file, r"alpha/tiny\.png is 20x24 pixels, smaller than --resolution 32"),
}


def assert_one_error_nothing_written(tmp_path: Path, dataset: Path, message: str, capsys) -> None:
    from bloodgen_hf.training.gan import main as train_gan

    capsys.readouterr()  # what building the fixture printed
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_gan(["--dataset", str(dataset), "--resolution", str(SIZE), "--output-dir", str(out), *TINY_GAN])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_image_folder_gives_one_error_and_writes_nothing(case, image_folder, tmp_path, capsys):
    damage, message = BAD_FOLDERS[case]
    damage(image_folder)
    assert_one_error_nothing_written(tmp_path, image_folder, message, capsys)


def test_bad_saved_datasets_give_one_error_and_write_nothing(tmp_path, capsys):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    images = cell_images()
    hf_dataset(images[:PER_CLASS], names=("alpha",)).save_to_disk(str(tmp_path / "one"))
    assert_one_error_nothing_written(tmp_path, tmp_path / "one", r"only one class \('alpha'\)", capsys)

    raw = hf_dataset(images).cast_column("picture", ImageFeature(decode=False))
    rows = raw.to_dict()
    rows["picture"][5] = {"bytes": b"garbage", "path": None}
    Dataset.from_dict(rows, features=raw.features).save_to_disk(str(tmp_path / "broken"))
    assert_one_error_nothing_written(tmp_path, tmp_path / "broken", r"row 5 is not a readable image", capsys)
