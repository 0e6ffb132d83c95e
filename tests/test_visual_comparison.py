"""Issue 33: benchmarks/visual_comparison.py draws real images and each model's for the same classes and seeds (the
images `bloodgen-hf sample --seed S` makes), one block per source, and refuses mixed resolutions and existing
outputs in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodgen_hf.data import load_data
from bloodgen_hf.registry import load_pipeline, save_pipeline
from tests.conftest import seeded, tiny_ddpm_pipeline, tiny_gan_pipeline, write_fake_bloodmnist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import visual_comparison as vc  # noqa: E402

PER_CLASS, SIZE, SCALE = 3, 28, 3  # 28 px images are enlarged 3x
COLUMN = (8 * (SIZE + vc.PAD) + vc.PAD) * SCALE  # a block is as wide as 8 cells: the 8 classes' nearest-image pairs


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("visual")
    write_fake_bloodmnist(root / "data")
    return {
        "data": root / "data",
        "gan": save_pipeline(tiny_gan_pipeline(), root / "gan"),
        "ddpm": save_pipeline(tiny_ddpm_pipeline(), root / "ddpm"),
    }


def run(models: dict, out: Path, *names: str, seed: int = 0, extra: tuple = ()) -> dict:
    argv = ["--models", *(str(models[n]) for n in names), "--data-dir", str(models["data"]), "--out", str(out)]
    return vc.main([*argv, "--per-class", str(PER_CLASS), "--seed", str(seed), *extra])


def cell(picture: np.ndarray, block: int, left: int, row: int, col: int) -> np.ndarray:
    """The enlarged image at (row, col) of a source's block, shrunk back to SIZE px."""
    y = vc.TITLE + (vc.PAD + row * (SIZE + vc.PAD)) * SCALE
    x = left + block * (COLUMN + vc.GAP) + (vc.PAD + col * (SIZE + vc.PAD)) * SCALE
    return picture[y : y + SIZE * SCALE : SCALE, x : x + SIZE * SCALE : SCALE]


def test_one_block_per_source_holding_the_real_images_and_what_sample_draws(models, tmp_path):
    run(models, tmp_path / "two.png", "gan")  # real, gan
    three = run(models, tmp_path / "three.png", "gan", "ddpm")  # real, gan, ddpm
    small, large = Image.open(tmp_path / "two.png"), Image.open(tmp_path / "three.png")
    assert large.width - small.width == COLUMN + vc.GAP and large.height == small.height
    grid, pairs = (8 * (SIZE + vc.PAD) + vc.PAD) * SCALE, (2 * (SIZE + vc.PAD) + vc.PAD) * SCALE
    assert small.height == 2 * vc.TITLE + grid + vc.GAP + pairs + vc.FONT_SIZE + 2 * vc.MARGIN

    picture = np.asarray(large.convert("RGB"))
    left = large.width - 3 * COLUMN - 2 * vc.GAP - vc.MARGIN
    train = load_data("bloodmnist", "train", SIZE, models["data"]).images
    indices = np.asarray(three["real"]["indices"])
    assert indices.shape == (8, PER_CLASS)
    for c in (0, 5):
        for j in range(PER_CLASS):
            np.testing.assert_array_equal(cell(picture, 0, left, c, j), train[indices[c, j]])
    # class c, column j of a model is image j*8+c of `sample --seed 0`: class c, seed j*8+c
    assert three["seeds"] == [[j * 8 + c for j in range(PER_CLASS)] for c in range(8)]
    assert three["labels"] == [[c] * PER_CLASS for c in range(8)]
    gan = load_pipeline(str(models["gan"]))
    for c, j in ((1, 2), (7, 0)):
        image = gan(class_labels=[c], generator=seeded(j * 8 + c), output_type="pt").images[0]
        expected = (image.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy()
        np.testing.assert_array_equal(cell(picture, 1, left, c, j), expected)
    # the nearest-image check: real images skip themselves; every model's first column is recorded
    assert all(d > 0 for d in three["real"]["nearest"]["distance"])
    assert [m["nearest"]["seeds"] for m in three["models"]] == [list(range(8))] * 2
    assert json.loads((tmp_path / "three.json").read_text()) == three


def test_the_same_seed_draws_the_same_figure(models, tmp_path):
    first = run(models, tmp_path / "a.png", "ddpm", "gan", seed=3)
    again = run(models, tmp_path / "b.png", "ddpm", "gan", seed=3)
    other = run(models, tmp_path / "c.png", "ddpm", "gan", seed=4)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert {**first, "command": ""} == {**again, "command": ""}
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()
    assert other["seeds"][0][0] == 4 and first["seeds"][0][0] == 3


def test_models_of_different_sizes_are_refused_in_one_line_naming_both(models, ldm_64_dir, tmp_path):
    out = tmp_path / "mixed.png"
    with pytest.raises(SystemExit) as err:
        vc.main(["--models", str(models["gan"]), str(ldm_64_dir), "--data-dir", str(models["data"]), "--out", str(out)])
    message = str(err.value.code)
    assert message.count("\n") == 0 and message.startswith("error: ")
    assert f"{models['gan']} makes 28 px" in message and f"{ldm_64_dir} makes 64 px" in message
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_an_existing_output_is_kept_without_overwrite(models, tmp_path):
    out = tmp_path / "figure.png"
    out.write_bytes(b"old")
    with pytest.raises(SystemExit) as err:
        run(models, out, "gan")
    message = str(err.value.code)
    assert message.count("\n") == 0 and message.startswith("error: ") and "--overwrite" in message
    assert out.read_bytes() == b"old" and not out.with_suffix(".json").exists()
    run(models, out, "gan", extra=("--overwrite",))
    assert Image.open(out).format == "PNG" and out.with_suffix(".json").is_file()
