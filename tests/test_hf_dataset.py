"""Issue 6: `bloodgen-hf sample --format hf-dataset` and `--push-to-hub` (against FakeHub, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Image, load_dataset, load_from_disk
from huggingface_hub import DatasetCard
from typer.testing import CliRunner

from bloodgen_hf import publish, sampling
from bloodgen_hf.cli import app
from bloodgen_hf.data import CLASS_NAMES
from tests.test_hub import TOKEN, FakeHub


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(publish, "HfApi", fake.api)
    return fake


def sample(model: Path, out: Path, *extra: str):
    args = ["sample", "--model", str(model), "--n", "10", "--seed", "5", "--batch-size", "4", "--out", str(out)]
    return CliRunner().invoke(app, [*args, *extra])


def as_arrays(dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = np.stack([np.asarray(image) for image in dataset["image"]])
    return images, np.asarray(dataset["label"]), np.asarray(dataset["seed"])


def test_hf_dataset_holds_the_same_images_labels_and_seeds_as_npz(tiny_gan_dir, tmp_path):
    result = sample(tiny_gan_dir, tmp_path / "synthetic", "--format", "hf-dataset")
    assert result.exit_code == 0, result.output
    assert sample(tiny_gan_dir, tmp_path / "same.npz", "--format", "npz").exit_code == 0

    dataset = load_from_disk(str(tmp_path / "synthetic"))
    assert isinstance(dataset.features["image"], Image)
    assert dataset.features["label"] == ClassLabel(names=list(CLASS_NAMES))
    images, labels, seeds = as_arrays(dataset)
    reference = np.load(tmp_path / "same.npz")
    np.testing.assert_array_equal(images, reference["images"])  # PNG inside the dataset: lossless
    np.testing.assert_array_equal(labels, reference["labels"])
    np.testing.assert_array_equal(seeds, np.arange(5, 15))
    assert dataset["model"] == [str(tiny_gan_dir)] * 10
    assert dataset.features["label"].int2str(int(labels[3])) == CLASS_NAMES[3]
    info = json.loads((tmp_path / "synthetic" / "info.json").read_text())
    assert info["model"] == str(tiny_gan_dir) and info["seed"] == 5 and info["num_images"] == 10


def test_hf_dataset_is_never_overwritten_silently_nor_left_half_written(tiny_gan_dir, tmp_path, monkeypatch):
    out = tmp_path / "synthetic"
    assert sample(tiny_gan_dir, out, "--format", "hf-dataset").exit_code == 0
    before = sorted(p.name for p in out.iterdir())

    refused = sample(tiny_gan_dir, out, "--format", "hf-dataset")
    assert refused.exit_code == 2 and "already exists" in refused.output

    def fails_after_one_batch(*args, **kwargs):
        yield next(iter(real_generate(*args, **kwargs)))
        raise ValueError("generation stopped half way")

    real_generate = sampling.generate
    monkeypatch.setattr(sampling, "generate", fails_after_one_batch)
    failed = sample(tiny_gan_dir, out, "--format", "hf-dataset", "--overwrite")
    assert failed.exit_code == 1 and "half way" in failed.output  # an unexpected error: a bug (issue 32), exit 1
    assert sorted(p.name for p in out.iterdir()) == before  # the old dataset is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic", "tiny_gan"]  # no temporary left behind
    assert len(load_from_disk(str(out))) == 10


def test_push_to_hub_publishes_a_dataset_that_loads_back(tiny_gan_dir, fake_hub, tmp_path):
    out = tmp_path / "synthetic"
    result = sample(
        tiny_gan_dir, out, "--format", "hf-dataset", "--push-to-hub", "bloodgen-test/synthetic", "--token", TOKEN
    )
    assert result.exit_code == 0, result.output
    assert "https://huggingface.co/datasets/bloodgen-test/synthetic" in result.output
    assert fake_hub.tokens == [TOKEN]
    assert [(name, kwargs["repo_type"]) for name, kwargs in fake_hub.calls] == [
        ("create_repo", "dataset"),
        ("upload_folder", "dataset"),
    ]
    files = fake_hub.files("bloodgen-test/synthetic", repo_type="dataset")
    assert sorted(files) == ["README.md", "data/train-00000-of-00001.parquet"]

    repo = tmp_path / "downloaded"
    for name, content in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(content)
    pushed = load_dataset(str(repo), split="train", cache_dir=str(tmp_path / "cache"))  # reads the card's configs
    local = load_from_disk(str(out))
    assert pushed.features == local.features
    for a, b in zip(as_arrays(pushed), as_arrays(local)):
        np.testing.assert_array_equal(a, b)
    assert pushed["model"] == local["model"]

    card = DatasetCard(files["README.md"].decode())
    assert card.data.license == "cc-by-4.0" and "synthetic" in card.data.tags
    assert card.data.size_categories == ["n<1K"]
    counts = np.bincount(as_arrays(local)[1], minlength=8)
    assert all(f"| {i} | {name} | {counts[i]} |" in card.text for i, name in enumerate(CLASS_NAMES))
    assert 'load_dataset("bloodgen-test/synthetic"' in card.text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format", "png", "--push-to-hub", "org/name", "--token", TOKEN], "needs --format hf-dataset"),
        (["--format", "hf-dataset", "--push-to-hub", "org/na me", "--token", TOKEN], "bad repo id 'org/na me'"),
        (["--format", "hf-dataset", "--push-to-hub", "just-a-name", "--token", TOKEN], "expected org/name"),
        (["--format", "hf-dataset", "--push-to-hub", "org/name"], "no Hugging Face token"),
    ],
)
def test_push_to_hub_fails_before_generating(extra, message, tiny_gan_dir, fake_hub, tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    result = sample(tiny_gan_dir, tmp_path / "synthetic", *extra)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "synthetic").exists() and fake_hub.calls == []


def test_push_dataset_refuses_a_folder_that_is_not_a_sampled_dataset(tiny_gan_dir, fake_hub):
    with pytest.raises(FileNotFoundError, match="is not a dataset written by `bloodgen-hf sample"):
        publish.push_dataset(tiny_gan_dir, "org/name", token=TOKEN)
    assert fake_hub.calls == []
