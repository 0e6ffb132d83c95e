import numpy as np
import pytest
import torch

from bloodgen_hf.data import (
    CLASS_COUNTS,
    CLASS_NAMES,
    DataError,
    LabelledImages,
    class_index,
    load_arrays,
    to_model_range,
    to_uint8,
)
from tests.conftest import SPLIT_SIZES


def test_class_index_accepts_names_indices_and_plurals():
    assert class_index("neutrophil") == CLASS_NAMES.index("neutrophil")
    assert class_index("Immature granulocytes") == 3
    assert class_index("7") == 7 and class_index(2) == 2
    with pytest.raises(ValueError, match="unknown class 'blast'"):
        class_index("blast")
    with pytest.raises(ValueError, match="out of range"):
        class_index(8)


def test_load_splits_and_all(fake_data_dir):
    images, labels = load_arrays("train", 28, fake_data_dir)
    assert images.shape == (SPLIT_SIZES["train"], 28, 28, 3) and images.dtype == np.uint8
    assert labels.shape == (SPLIT_SIZES["train"],) and labels.dtype == np.int64
    all_images, all_labels = load_arrays("all", 64, fake_data_dir)
    assert all_images.shape == (sum(SPLIT_SIZES.values()), 64, 64, 3)
    assert len(all_labels) == len(all_images)


def test_data_dir_from_environment(fake_data_dir, monkeypatch):
    monkeypatch.setenv("BLOODGEN_DATA_DIR", str(fake_data_dir))
    assert len(load_arrays("val")[0]) == SPLIT_SIZES["val"]


def test_missing_archive_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"missing .*bloodmnist_64\.npz.*--data-dir"):
        load_arrays("train", 64, tmp_path)


def test_unknown_split_and_size(fake_data_dir):
    with pytest.raises(DataError, match="unknown split"):
        load_arrays("training", 28, fake_data_dir)
    with pytest.raises(DataError, match="sizes"):
        load_arrays("train", 32, fake_data_dir)


def test_corrupt_archive_is_reported(tmp_path):
    (tmp_path / "bloodmnist.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable BloodMNIST archive"):
        load_arrays("train", 28, tmp_path)


def test_range_conversions_round_trip():
    images = torch.randint(0, 256, (4, 28, 28, 3), dtype=torch.uint8)
    x = to_model_range(images)
    assert x.shape == (4, 3, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8(x), images)


def test_batches_flip_but_keep_labels(fake_data_dir):
    ds = LabelledImages.load("train", 28, fake_data_dir, flip=True)
    idx = torch.arange(8)
    torch.manual_seed(0)
    images, labels = ds.batch(idx)
    assert images.shape == (8, 3, 28, 28) and torch.equal(labels, ds.labels[:8])
    plain = to_model_range(ds.images[idx])
    for img, ref in zip(images, plain):  # every image is one of the four flips of the original
        assert any(torch.equal(img, f) for f in (ref, ref.flip(-1), ref.flip(-2), ref.flip(-1).flip(-2)))


def test_real_archives_match_medmnist_layout_and_counts(real_data_dir):
    import medmnist

    ds = medmnist.BloodMNIST(split="val", size=28, root=str(real_data_dir), download=False)
    assert len(ds) == 1712
    _, labels = load_arrays("all", 28, real_data_dir)
    assert tuple(np.bincount(labels, minlength=8)) == CLASS_COUNTS
