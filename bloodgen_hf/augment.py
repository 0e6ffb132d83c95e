"""`bloodgen-hf augment`: a labelled training set plus synthetic images, ready for a classifier.

The recipe is the one `augment-study` measures: per class, `ratio` x the real images of that class, or with
`balance` just enough to top every class up to the largest one. The output keeps every real image as it was
read and marks each image real or synthetic in `manifest.csv` (PNG ImageFolder) or in a `source` column
(`datasets` folder), with the seed that regenerates a synthetic image.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import atomic_path
from bloodgen_hf.sampling import INFO_NAME, generate, write_class_folder

AUGMENT_FORMATS = ("png", "hf-dataset")


@dataclass(frozen=True)
class Recipe:
    """How many synthetic images join each class: `ratio` x its real images, or (`balance`) up to the largest."""

    ratio: float = 2.0  # `bloodgen-hf augment`'s default: the best recipe measured (docs/augmentation.md)
    balance: bool = False

    def check(self) -> None:
        if self.ratio < 0 or (self.ratio == 0 and not self.balance):
            raise UsageError(f"--synthetic-ratio must be positive (or use --balance), got {self.ratio:g}")

    @property
    def name(self) -> str:
        return "balance" if self.balance else f"{self.ratio:g}x"

    def counts(self, real_counts: np.ndarray) -> np.ndarray:
        """Synthetic images per class: balance tops up to the largest class exactly; a ratio rounds per class."""
        real_counts = np.asarray(real_counts, np.int64)
        if self.balance:
            return real_counts.max() - real_counts
        return np.round(self.ratio * real_counts).astype(np.int64)


def synthetic_labels(real_counts: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The label of every synthetic image, class by class."""
    counts = recipe.counts(real_counts)
    return np.repeat(np.arange(len(counts)), counts)


def augmented_rows(images: np.ndarray, labels: np.ndarray, batches) -> Iterator[tuple[np.ndarray, int, str, int]]:
    """(image, label, 'real' | 'synthetic', seed or -1): the real images first, as read, then the generated ones."""
    for image, label in zip(images, labels):
        yield image, int(label), "real", -1
    for batch_images, batch_labels, seeds in batches:
        for image, label, seed in zip(batch_images, batch_labels, seeds):
            yield image, int(label), "synthetic", int(seed)


def write_augmented_folder(rows, out: Path, info: dict, class_names: Sequence[str], overwrite: bool = False) -> dict:
    """<out>/<class>/<real|synthetic>_<index>.png, manifest.csv (file, label, class_name, source, seed; seed
    empty for real images) and info.json, written atomically (sampling.write_class_folder)."""
    records = (
        (image, label, f"{source}_{index:06d}", (source, "" if seed < 0 else seed))
        for index, (image, label, source, seed) in enumerate(rows)
    )
    manifest = write_class_folder(
        records, out, info, class_names, ("source", "seed"), num_images=source_counts, overwrite=overwrite
    )
    return source_counts(manifest)


def source_counts(manifest: list[tuple]) -> dict[str, int]:
    """Real and synthetic images in manifest rows (file, label, class_name, source, seed)."""
    return {source: sum(row[3] == source for row in manifest) for source in ("real", "synthetic")}


def write_augmented_dataset(rows, out: Path, info: dict, class_names: Sequence[str], overwrite: bool = False) -> dict:
    """A `datasets` folder (save_to_disk) with image, label (ClassLabel), source and seed columns, plus info.json."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    features = Features(
        {
            "image": ImageFeature(),
            "label": ClassLabel(names=list(class_names)),
            "source": Value("string"),
            "seed": Value("int64"),
        }
    )
    columns = {"image": [], "label": [], "source": [], "seed": []}
    for image, label, source, seed in rows:
        for key, value in zip(columns, (image, label, source, seed)):
            columns[key].append(value)
    dataset = Dataset.from_dict(columns, features=features)
    counts = {s: columns["source"].count(s) for s in ("real", "synthetic")}
    with atomic_path(out, is_dir=True, overwrite=overwrite) as tmp:
        dataset.save_to_disk(str(tmp))
        (tmp / INFO_NAME).write_text(json.dumps({**info, "num_images": counts}, indent=2) + "\n")
    return counts


def augment(
    pipe,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    recipe: Recipe,
    out: Path,
    info: dict,
    output_format: str = "png",
    seed: int = 0,
    batch_size: int = 250,
    overwrite: bool = False,
    **sampling_kwargs,
) -> dict:
    """Write `images` with their labels plus the recipe's synthetic images from `pipe`; returns the counts of
    real and synthetic images. Synthetic image i is drawn with seed `seed + i` (in the manifest)."""
    recipe.check()
    if output_format not in AUGMENT_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(AUGMENT_FORMATS)}, got {output_format!r}")
    real_counts = np.bincount(labels, minlength=len(class_names))
    wanted = synthetic_labels(real_counts, recipe)
    batches = generate(pipe, wanted, seed=seed, batch_size=batch_size, **sampling_kwargs) if len(wanted) else []
    info = {**info, "recipe": recipe.name, "seed": seed, "real_per_class": real_counts.tolist()}
    info["synthetic_per_class"] = recipe.counts(real_counts).tolist()
    writer = write_augmented_folder if output_format == "png" else write_augmented_dataset
    return writer(augmented_rows(images, labels, batches), out, info, class_names, overwrite=overwrite)
