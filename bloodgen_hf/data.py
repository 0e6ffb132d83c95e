"""Labelled image data for every model and evaluator: one loader, `load_data`, for any source.

Sources (`--dataset`):
- `bloodmnist` (the default) or any other MedMNIST 2D flag (`pathmnist`, `dermamnist`, ...): medmnist's
  archives, `<flag>.npz` (28 px) or `<flag>_<size>.npz` (64, 128, 224 px), read from `--data-dir`;
- an ImageFolder: a folder with one subfolder of images per class;
- a `datasets` folder written by `save_to_disk`, or a Hub dataset id (`org/name`), with one image
  column and one ClassLabel column.

Every source comes back the same way: uint8 RGB images [N, R, R, 3] at `--resolution` R (centre-cropped
to a square and resized), int64 labels and the class names, which come from the data. Splits are the
source's own (MedMNIST, a DatasetDict with several splits); a source without splits is divided into a
fixed, class-stratified 80/10/10 train/val/test partition. Bad data (an empty class folder, a single
class, an unreadable image, an unsupported image mode, an image smaller than R) raises one DataError
naming the culprit, before anything is trained or written.

Images stay uint8 NHWC arrays (cheap to index, easy to hand to metrics) and become [-1, 1] float
tensors only when batched for a model.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bloodgen_hf.errors import UsageError

# BloodMNIST, the default dataset and the one the bundled models were trained on.
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
# BloodMNIST images per class in the whole dataset (all splits), as MedMNIST documents them.
CLASS_COUNTS: tuple[int, ...] = (1218, 3117, 1551, 2895, 1214, 1420, 3329, 2348)
DEFAULT_DATASET = "bloodmnist"
SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)  # the sizes medmnist publishes
DATA_DIR_ENV = "BLOODGEN_DATA_DIR"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
RGB_MODES = ("RGB", "RGBA", "L")  # converted to RGB; every other mode is refused
HOLDOUT_FRACTION = 0.1  # val and test share of each class, for sources without splits


class DataError(RuntimeError):
    """Raised for missing or malformed data; its message is meant for the user as is."""


class Data(NamedTuple):
    """What `load_data` returns for any source."""

    images: np.ndarray  # uint8 [N, R, R, 3]
    labels: np.ndarray  # int64 [N], indices into class_names
    class_names: tuple[str, ...]
    splits: np.ndarray  # str [N]: the split each image belongs to


# --- class names -----------------------------------------------------------------------------------


def normalise_name(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def class_index(label: int | str, class_names: tuple[str, ...] | list[str] = CLASS_NAMES) -> int:
    """A class index or name among `class_names` (case-insensitive; '-', ' ' and '_' alike; plural 's')."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < len(class_names):
            return int(label)
        raise UsageError(f"class index {label} out of range 0..{len(class_names) - 1}")
    key = normalise_name(label)
    if key.isdigit():
        return class_index(int(key), class_names)
    for i, name in enumerate(class_names):
        if key in (normalise_name(name), normalise_name(name) + "s"):
            return i
    raise UsageError(f"unknown class {label!r}; choose from: {', '.join(class_names)}")


def same_classes(a: tuple[str, ...] | list[str], b: tuple[str, ...] | list[str]) -> bool:
    return [normalise_name(n) for n in a] == [normalise_name(n) for n in b]


def describe_classes(names: tuple[str, ...] | list[str]) -> str:
    """'3 classes: a, b, c', for error messages that put two class lists side by side."""
    return f"{len(names)} classes: {', '.join(names)}"


# --- one loader for every source ---------------------------------------------------------------------


def load_data(
    dataset: str = DEFAULT_DATASET,
    split: str = "all",
    resolution: int = 28,
    data_dir: str | os.PathLike | None = None,
) -> Data:
    """The images, labels and class names of `split` ('all', 'train', 'val', 'test' or a source's own
    split name) at `resolution`; the whole source is read and checked, so bad data fails here."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise DataError(f"--resolution must be a positive number of pixels, got {resolution!r}")
    kind, where = resolve_source(str(dataset))
    if kind == "medmnist":
        return load_medmnist(where, split, int(resolution), data_dir)
    if kind == "folder":
        images, labels, names = read_image_folder(Path(where), int(resolution))
        return select_split(Data(images, labels, names, partition(labels)), split, str(dataset))
    return load_hf_dataset(kind, where, split, int(resolution))


def resolve_source(dataset: str) -> tuple[str, str]:
    """('medmnist', flag) | ('folder', path) | ('saved', path) | ('hub', repo id), or one clear error."""
    if dataset.lower() == DEFAULT_DATASET:
        return "medmnist", DEFAULT_DATASET
    path = Path(dataset).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"--dataset {dataset} is a file; give an ImageFolder or a `datasets` folder")
        if any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return "saved", str(path)
        return "folder", str(path)
    if re.fullmatch(r"[a-z0-9]+mnist(3d)?", dataset.lower()):
        return "medmnist", medmnist_flag(dataset.lower())
    if dataset.count("/") == 1 and not dataset.startswith((".", "/", "~")):
        return "hub", dataset
    raise DataError(
        f"unknown --dataset {dataset!r}: not a MedMNIST flag (e.g. bloodmnist, pathmnist), an existing "
        "folder (ImageFolder or `datasets` save_to_disk), nor a Hub dataset id (org/name)"
    )


def check_classes(names: tuple[str, ...], counts: np.ndarray, source: str) -> None:
    """At least two classes, each with images, with names usable as folder names."""
    if len(names) < 2:
        only = f" ({names[0]!r})" if names else ""
        raise DataError(f"{source} has only one class{only}; a class-conditional model needs at least 2")
    for name in names:
        if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise DataError(f"{source}: class name {name!r} cannot name a folder; rename the class")
    clashes = sorted({n for n in names if [normalise_name(m) for m in names].count(normalise_name(n)) > 1})
    if clashes:
        raise DataError(f"{source}: class names {', '.join(clashes)} differ only in case, spaces or dashes")
    empty = [n for n, c in zip(names, counts) if c == 0]
    if empty:
        raise DataError(f"{source}: class {empty[0]!r} has no images")


def partition(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """The split of each image for sources without splits: per class, a fixed random 10% val, 10% test
    (at least one each for classes of 3 or more images), the rest train."""
    rng = np.random.default_rng(seed)
    splits = np.full(len(labels), "train", dtype="<U5")
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(len(members) * HOLDOUT_FRACTION + 0.5)) if len(members) >= 3 else 0
        splits[members[:k]] = "val"
        splits[members[k : 2 * k]] = "test"
    return splits


def select_split(data: Data, split: str, source: str) -> Data:
    if split == "all":
        return data
    available = list(dict.fromkeys(data.splits.tolist()))
    if split == "val" and "val" not in available and "validation" in available:
        split = "validation"
    if split not in available:
        raise DataError(f"unknown split {split!r} of {source}; choose from: all, {', '.join(available)}")
    keep = data.splits == split
    return Data(data.images[keep], data.labels[keep], data.class_names, data.splits[keep])


def dataset_label(dataset: str) -> str:
    """A short file-name-safe name for a dataset (cache entries, report titles): the flag, or the
    folder / repo name plus a hash of the full path, so two folders called `train` stay apart."""
    kind, where = resolve_source(dataset)
    if kind == "medmnist":
        return where
    full = str(Path(where).resolve()) if kind in ("folder", "saved") else where
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(where).name or "data").strip("-.") or "data"
    return f"{name}-{hashlib.sha256(full.encode()).hexdigest()[:8]}"


# --- images: mode, size, centre-crop and resize --------------------------------------------------------


def fit_image(image: Image.Image, resolution: int, name: str) -> np.ndarray:
    """uint8 [R, R, 3]: RGB, centre-cropped to a square and resized (bicubic) to `resolution`."""
    image = to_rgb(image, name)
    width, height = image.size
    if min(width, height) < resolution:
        raise DataError(f"{name} is {width}x{height} pixels, smaller than --resolution {resolution}")
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """RGB, RGBA (alpha dropped), greyscale L and palette images with an RGB(A) palette become RGB."""
    mode = image.mode
    if mode == "P" and image.palette is not None and image.palette.mode in ("RGB", "RGBA"):
        return image.convert("RGB")
    if mode not in RGB_MODES:
        shown = f"P with a {image.palette.mode} palette" if mode == "P" and image.palette is not None else mode
        raise DataError(f"{name} has image mode {shown}; only 8-bit RGB, RGBA, L (greyscale) and palette images load")
    return image if mode == "RGB" else image.convert("RGB")


def open_image(source: str | Path | bytes, name: str) -> Image.Image:
    """A fully decoded PIL image, or a DataError naming the file (missing, unreadable, corrupt, truncated)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            return image
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{name} is not a readable image ({reason})") from err


def fit_array(images: np.ndarray, resolution: int, name: str) -> np.ndarray:
    """An archive's uint8 images (NHWC RGB or NHW greyscale) as RGB at `resolution`."""
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.shape[1:3] == (resolution, resolution):
        return images
    return np.stack([fit_image(Image.fromarray(im), resolution, f"{name} image {i}") for i, im in enumerate(images)])


# --- MedMNIST --------------------------------------------------------------------------------------------


def medmnist_info(flag: str) -> dict:
    """medmnist's INFO entry; importing medmnist takes seconds, so only sets other than BloodMNIST do."""
    from medmnist.info import INFO

    return INFO[flag]


def medmnist_flag(flag: str) -> str:
    from medmnist.info import INFO

    if flag not in INFO:
        flags = ", ".join(k for k in INFO if not k.endswith("3d"))
        raise DataError(f"unknown MedMNIST flag {flag!r}; the 2D sets are: {flags}")
    if flag.endswith("3d"):
        raise DataError(f"{flag} is a 3D MedMNIST set; only 2D images are supported")
    if INFO[flag]["task"].startswith("multi-label"):
        raise DataError(f"{flag} is multi-label; a class-conditional model needs one class per image")
    return flag


def medmnist_class_names(flag: str) -> tuple[str, ...]:
    """BloodMNIST's names as the bundled models know them; other sets' from medmnist's INFO, made into
    short identifiers ('smooth muscle' -> 'smooth_muscle', text in parentheses dropped)."""
    if flag == DEFAULT_DATASET:
        return CLASS_NAMES
    labels = medmnist_info(flag)["label"]
    raw = [labels[str(i)] for i in range(len(labels))]
    short = [re.sub(r"[^0-9a-z]+", "_", name.split("(")[0].lower()).strip("_") or str(i) for i, name in enumerate(raw)]
    return tuple(short) if len(set(short)) == len(short) else tuple(raw)


def archive_name(size: int, flag: str = DEFAULT_DATASET) -> str:
    if size not in SIZES:
        raise DataError(f"{medmnist_title(flag)} comes in sizes {SIZES}, not {size}")
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def medmnist_title(flag: str) -> str:
    return "BloodMNIST" if flag == DEFAULT_DATASET else medmnist_info(flag)["python_class"]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """`--data-dir`, then $BLOODGEN_DATA_DIR; None means 'let medmnist download it'."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def archive_size(flag: str, resolution: int, data_dir) -> int:
    """The archive to read for `resolution`: its own size, else the smallest larger one present locally."""
    if resolution in SIZES:
        return resolution
    larger = [s for s in SIZES if s > resolution]
    if not larger:
        raise DataError(f"{medmnist_title(flag)} comes in sizes up to {SIZES[-1]}, not --resolution {resolution}")
    root = resolve_data_dir(data_dir)
    if root is None:
        return larger[0]
    for size in larger:
        if (root / archive_name(size, flag)).is_file():
            return size
    names = ", ".join(archive_name(s, flag) for s in larger)
    raise DataError(f"--resolution {resolution} is resized from a larger archive; put one of {names} in {root}")


def load_medmnist(flag: str, split: str, resolution: int, data_dir) -> Data:
    splits = SPLITS if split == "all" else (split,)
    if split != "all" and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from: all, {', '.join(SPLITS)}")
    size = archive_size(flag, resolution, data_dir)
    parts = [load_arrays(s, size, data_dir, flag) for s in splits]
    images = np.concatenate([fit_array(p[0], resolution, archive_name(size, flag)) for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    names = medmnist_class_names(flag)
    if labels.min() < 0 or labels.max() >= len(names):
        raise DataError(f"{archive_name(size, flag)}: labels outside 0..{len(names) - 1}")
    check_classes(names, np.bincount(labels, minlength=len(names)), flag)
    split_of = np.concatenate([np.full(len(p[1]), s, dtype="<U5") for s, p in zip(splits, parts)])
    return Data(images, labels, names, split_of)


def load_arrays(
    split: str = "all", size: int = 28, data_dir: str | os.PathLike | None = None, flag: str = DEFAULT_DATASET
) -> tuple[np.ndarray, np.ndarray]:
    """One MedMNIST archive as stored: (images uint8 [N,H,W,3] or [N,H,W], labels int64 [N]) for a split
    or 'all' (the whole dataset). `load_data` is the loader for models; this reads the archive only."""
    if split == "all":
        parts = [load_arrays(s, size, data_dir, flag) for s in SPLITS]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from: all, {', '.join(SPLITS)}")
    root = resolve_data_dir(data_dir)
    name = archive_name(size, flag)
    if root is not None:
        path = root / name
        if not path.is_file():
            raise DataError(
                f"missing {path}: put {medmnist_title(flag)}'s {name} there (from medmnist, "
                f"https://medmnist.com), or point --data-dir / ${DATA_DIR_ENV} at the folder holding it"
            )
        return _read_npz(path, split, flag)
    return _download_with_medmnist(split, size, flag)


def _read_npz(path: Path, split: str, flag: str = DEFAULT_DATASET) -> tuple[np.ndarray, np.ndarray]:
    if not zipfile.is_zipfile(path):  # else numpy tries it as a pickle, and its message misleads
        raise DataError(
            f"{path} is not a readable {medmnist_title(flag)} archive (not an .npz file): download it again"
        )
    try:
        with np.load(path) as archive:
            images = archive[f"{split}_images"]
            labels = archive[f"{split}_labels"].reshape(-1).astype(np.int64)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"{path} is not a readable {medmnist_title(flag)} archive ({err})") from err
    rgb, grey = images.ndim == 4 and images.shape[-1] == 3, images.ndim == 3
    if not (rgb or grey) or len(images) != len(labels):
        raise DataError(f"{path}: expected images [N,H,W,3] or [N,H,W] and N labels, got {images.shape}")
    num_classes = len(medmnist_class_names(flag))
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    return images.astype(np.uint8, copy=False), labels


def _download_with_medmnist(split: str, size: int, flag: str = DEFAULT_DATASET) -> tuple[np.ndarray, np.ndarray]:
    """medmnist's own download path, for machines with internet and no local copy."""
    import medmnist

    root = Path(os.environ.get("MEDMNIST_ROOT", Path.home() / ".medmnist"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        ds = getattr(medmnist, medmnist_title(flag))(split=split, size=size, root=str(root), download=True)
    except Exception as err:  # medmnist raises bare RuntimeError/AssertionError
        raise DataError(
            f"could not download {medmnist_title(flag)} ({type(err).__name__}: {err}); without internet, "
            f"pass --data-dir or set ${DATA_DIR_ENV} to a folder holding {archive_name(size, flag)}"
        ) from err
    return ds.imgs.astype(np.uint8, copy=False), ds.labels.reshape(-1).astype(np.int64)


# --- ImageFolder -------------------------------------------------------------------------------------------


def read_image_folder(root: Path, resolution: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One subfolder per class (sorted names; hidden entries and files beside the class folders are
    ignored), every image file below it, in sorted order."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class folders; an ImageFolder holds one subfolder of images per class")
    files = [image_files(folder) for folder in folders]
    for folder, found in zip(folders, files):
        if not found:
            raise DataError(f"{folder} is an empty class folder (no {', '.join(IMAGE_EXTENSIONS)} files)")
    names = tuple(folder.name for folder in folders)
    check_classes(names, np.asarray([len(f) for f in files]), str(root))
    images = [fit_image(open_image(path, str(path)), resolution, str(path)) for found in files for path in found]
    labels = np.repeat(np.arange(len(names), dtype=np.int64), [len(f) for f in files])
    return np.stack(images), labels, names


def image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def write_image_folder(data: Data, folder: Path) -> None:
    """<folder>/<class name>/<index>.png (lossless), the layout read_image_folder reads back pixel for pixel."""
    for name in data.class_names:
        (folder / name).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        Image.fromarray(image).save(folder / data.class_names[label] / f"{i:06d}.png", format="PNG", compress_level=1)


# --- datasets (save_to_disk folders and the Hub) -----------------------------------------------------------


def load_hf_dataset(kind: str, where: str, split: str, resolution: int) -> Data:
    """A `datasets` Dataset or DatasetDict: its own splits when it has several, else the fixed partition."""
    import datasets

    try:
        loaded = datasets.load_from_disk(where) if kind == "saved" else datasets.load_dataset(where)
    except Exception as err:  # FileNotFoundError, offline, no such repo, bad format: all end the same way
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot load the dataset {where} ({reason})") from err
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"all": loaded}
    first = next(iter(parts.values()))
    image_col, label_col, names = hf_columns(first, where)
    images, labels, split_of = [], [], []
    for name, part in parts.items():
        if image_col not in part.features or part.features.get(label_col) != first.features[label_col]:
            raise DataError(f"{where}: split {name!r} has other columns or classes than the first split")
        x, y = hf_rows(part, image_col, label_col, resolution, f"{where} ({name})")
        images.append(x)
        labels.append(y)
        split_of.append(np.full(len(y), name, dtype=object))
    labels = np.concatenate(labels)
    check_classes(names, np.bincount(labels, minlength=len(names)), where)
    splits = np.concatenate(split_of).astype(str) if len(parts) > 1 else partition(labels)
    return select_split(Data(np.concatenate(images), labels, names, splits), split, where)


def hf_columns(dataset, source: str) -> tuple[str, str, tuple[str, ...]]:
    """(image column, ClassLabel column, class names): the only one of each kind, or the one called image/label."""
    import datasets

    features = dataset.features
    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    image = images[0] if len(images) == 1 else ("image" if "image" in images else None)
    label = labels[0] if len(labels) == 1 else ("label" if "label" in labels else None)
    if image is None or label is None:
        raise DataError(
            f"{source} needs one image column and one ClassLabel column; it has image columns {images} and "
            f"ClassLabel columns {labels} (all columns: {', '.join(features)})"
        )
    return image, label, tuple(str(n) for n in features[label].names)


def hf_rows(dataset, image_col: str, label_col: str, resolution: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Every row's image decoded here (not by `datasets`), so a bad one is named by its row and file."""
    import datasets

    labels = np.asarray(dataset[label_col], dtype=np.int64)
    if (labels < 0).any():
        raise DataError(f"{source} row {int(np.flatnonzero(labels < 0)[0])} has no label")
    raw = dataset.cast_column(image_col, datasets.Image(decode=False))[image_col]
    images = []
    for i, item in enumerate(raw):
        if item is None or (item.get("bytes") is None and not item.get("path")):
            raise DataError(f"{source} row {i} has no image")
        name = f"{source} row {i}" + (f" ({item['path']})" if item.get("path") else "")
        image = open_image(item["bytes"] if item.get("bytes") is not None else item["path"], name)
        images.append(fit_image(image, resolution, name))
    if not images:
        raise DataError(f"{source} has no rows")
    return np.stack(images), labels


# --- model-ready tensors ---------------------------------------------------------------------------------


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float NCHW in [-1, 1] -> uint8 NHWC (rounded, clamped)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


class LabelledImages(Dataset):
    """Labelled images held in memory as uint8, from any `load_data` source (`load`: BloodMNIST by default,
    another with `dataset`); `batch(indices)` gives model-ready [-1, 1] tensors.

    With `flip`, batches get random horizontal/vertical flips: cells have no orientation, so flips
    are free, label-preserving augmentation.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, flip: bool = False, class_names=CLASS_NAMES):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.flip = flip
        self.class_names = tuple(class_names)

    @classmethod
    def load(
        cls, split: str = "all", size: int = 28, data_dir=None, flip: bool = False, dataset: str = DEFAULT_DATASET
    ) -> LabelledImages:
        data = load_data(dataset, split, size, data_dir)
        return cls(data.images, data.labels, flip=flip, class_names=data.class_names)

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
