"""BloodMNIST data: class names, where the archives come from, and one loader for every model.

Images are kept as uint8 NHWC arrays (cheap to index, easy to hand to metrics) and turned into
[-1, 1] float tensors only when batched for a model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipelines.blood_pipeline_utils import class_to_index

CLASS_NAMES: tuple[str, ...] = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "immature_granulocyte",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)
NUM_CLASSES = len(CLASS_NAMES)
# Images per class in the whole dataset (all splits), as MedMNIST documents them; used to sample
# with the real class distribution without loading the data.
CLASS_COUNTS: tuple[int, ...] = (1218, 3117, 1551, 2895, 1214, 1420, 3329, 2348)
SPLITS = ("train", "val", "test")
SIZES = (28, 64)
DATA_DIR_ENV = "BLOODGEN_DATA_DIR"


class DataError(RuntimeError):
    """Raised for missing or malformed data; its message is meant for the user as is."""


def class_index(label: int | str) -> int:
    """A class index or name (case-insensitive; '-', ' ' and '_' alike; plural 's' accepted)."""
    return class_to_index(label, CLASS_NAMES, NUM_CLASSES)


def archive_name(size: int) -> str:
    if size not in SIZES:
        raise DataError(f"BloodMNIST comes in sizes {SIZES}, not {size}")
    return "bloodmnist.npz" if size == 28 else f"bloodmnist_{size}.npz"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """`--data-dir`, then $BLOODGEN_DATA_DIR; None means 'let medmnist download it'."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def load_arrays(
    split: str = "all", size: int = 28, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,H,W,3], labels int64 [N]) for a split or 'all' (the whole dataset)."""
    if split == "all":
        parts = [load_arrays(s, size, data_dir) for s in SPLITS]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from: all, {', '.join(SPLITS)}")
    root = resolve_data_dir(data_dir)
    name = archive_name(size)
    if root is not None:
        path = root / name
        if not path.is_file():
            raise DataError(
                f"missing {path}: put BloodMNIST's {name} there (from medmnist, "
                f"https://medmnist.com), or point --data-dir / ${DATA_DIR_ENV} at the folder holding it"
            )
        return _read_npz(path, split)
    return _download_with_medmnist(split, size)


def _read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as archive:
            images = archive[f"{split}_images"]
            labels = archive[f"{split}_labels"].reshape(-1).astype(np.int64)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path} is not a readable BloodMNIST archive ({err})") from err
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
        raise DataError(f"{path}: expected RGB images [N,H,W,3] and N labels, got {images.shape}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{path}: labels outside 0..{NUM_CLASSES - 1}")
    return images.astype(np.uint8, copy=False), labels


def _download_with_medmnist(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """medmnist's own download path, for machines with internet and no local copy."""
    import medmnist

    root = Path(os.environ.get("MEDMNIST_ROOT", Path.home() / ".medmnist"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        ds = medmnist.BloodMNIST(split=split, size=size, root=str(root), download=True)
    except Exception as err:  # medmnist raises bare RuntimeError/AssertionError
        raise DataError(
            f"could not download BloodMNIST ({type(err).__name__}: {err}); without internet, "
            f"pass --data-dir or set ${DATA_DIR_ENV} to a folder holding {archive_name(size)}"
        ) from err
    return ds.imgs.astype(np.uint8, copy=False), ds.labels.reshape(-1).astype(np.int64)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float NCHW in [-1, 1] -> uint8 NHWC (rounded, clamped)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


class BloodMNIST(Dataset):
    """BloodMNIST held in memory as uint8; `batch(indices)` gives model-ready [-1, 1] tensors.

    With `flip`, batches get random horizontal/vertical flips: cells have no orientation, so flips
    are free, label-preserving augmentation.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, flip: bool = False):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.flip = flip

    @classmethod
    def load(cls, split: str = "all", size: int = 28, data_dir=None, flip: bool = False) -> BloodMNIST:
        return cls(*load_arrays(split, size, data_dir), flip=flip)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.batch(torch.tensor([i]))
        return images[0], labels[0]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = to_model_range(self.images[indices])
        if self.flip:
            n = len(indices)
            images = torch.where(torch.rand(n, 1, 1, 1) < 0.5, images.flip(-1), images)
            images = torch.where(torch.rand(n, 1, 1, 1) < 0.5, images.flip(-2), images)
        return images, self.labels[indices]
