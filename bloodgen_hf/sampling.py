"""Generating many images from any bloodgen pipeline and writing them as a PNG folder or one .npz.

Every image i is drawn with its own torch.Generator seeded `seed + i`, so an image can be
regenerated alone from the manifest, whatever batch size made it.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from bloodgen_hf.data import CLASS_COUNTS, CLASS_NAMES
from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import atomic_path

FORMATS = ("png", "npz", "hf-dataset")
INFO_NAME = "info.json"
PRECISIONS = ("auto", "fp32", "bf16")


def plan_labels(
    n: int,
    classes: Sequence[int] | None = None,
    distribution: str = "balanced",
    class_counts: Sequence[int] = CLASS_COUNTS,
) -> np.ndarray:
    """The label of each of n images, among len(class_counts) classes.

    balanced: the chosen classes (default all) in turn, so counts differ by at most one.
    real: proportional to `class_counts` (default BloodMNIST's; largest-remainder rounding), in class order.
    """
    check_count(n)
    classes = list(classes) if classes else list(range(len(class_counts)))
    if distribution == "balanced":
        return np.asarray(classes, dtype=np.int64)[np.arange(n) % len(classes)]
    if distribution == "real":
        weights = np.asarray([class_counts[c] for c in classes], dtype=np.float64)
        exact = n * weights / weights.sum()
        counts = np.floor(exact).astype(np.int64)
        counts[np.argsort(counts - exact)[: n - counts.sum()]] += 1
        return np.repeat(np.asarray(classes, dtype=np.int64), counts)
    raise UsageError(f"unknown class distribution {distribution!r}; use 'balanced' or 'real'")


def check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"--n must be a positive number of images, got {n}")


def model_labels(pipe, n: int, classes: Sequence[str] | None, distribution: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """(labels, the model's class names) for n images of the chosen classes, named as the model names them.

    Only BloodMNIST's class counts are known without the data, so 'real' needs a BloodMNIST model."""
    from bloodgen_hf.data import class_index, describe_classes, same_classes

    names = pipeline_class_names(pipe)
    chosen = [class_index(c, names) for c in classes or []]
    if distribution == "real" and not same_classes(names, CLASS_NAMES):
        theirs = describe_classes(names)
        raise UsageError(f"--real-distribution knows BloodMNIST's proportions only; this model has {theirs}")
    counts = CLASS_COUNTS if distribution == "real" else [1] * len(names)
    return plan_labels(n, chosen, distribution, counts), names


def pipeline_class_names(pipe) -> tuple[str, ...]:
    """The classes a pipeline was trained on: its saved names, else '0', '1', ... for its class count."""
    names = getattr(pipe, "class_names", None)
    if names:
        return tuple(names)
    count = getattr(pipe, "num_classes", None)
    for component in pipe.components.values():
        if count is None and "num_classes" in getattr(component, "config", {}):
            count = component.config.num_classes
    if count is None:
        raise UsageError(f"{type(pipe).__name__} records neither class names nor a class count")
    return tuple(str(i) for i in range(count))


def configure_sampling(pipe, options: dict) -> tuple[object, dict]:
    """Split CLI sampling options into a configured pipeline and keyword arguments for its __call__.

    `scheduler` swaps the pipeline's scheduler (pipelines that have one define `with_scheduler`);
    `precision` (default auto) comes back resolved for this pipeline, for `generate`; every other option
    must be a parameter of the pipeline's __call__, else it is refused by name.
    """
    options = dict(options)
    scheduler = options.pop("scheduler", None)
    precision = options.pop("precision", "auto")
    if scheduler is not None:
        if not hasattr(pipe, "with_scheduler"):
            raise UsageError(f"--scheduler does not apply to {type(pipe).__name__}")
        pipe = pipe.with_scheduler(scheduler)
    accepted = inspect.signature(pipe.__call__).parameters
    for name in options:
        if name not in accepted:
            flag = {"num_inference_steps": "steps", "guidance_scale": "guidance"}.get(name, name).replace("_", "-")
            raise UsageError(f"--{flag} does not apply to {type(pipe).__name__}")
    return pipe, {**options, "precision": resolve_precision(precision, pipe)}


def resolve_precision(precision: str, pipe) -> str:
    """fp32 or bf16 for `precision`. auto: bf16 for a diffusion pipeline (one with a scheduler, whose many UNet
    passes are the cost) on a CPU that computes bf16 in hardware (bloodgen_hf.process.native_bf16), else fp32.
    A GAN or VAE makes an image in one cheap pass; there bf16 would only round the pixels."""
    from bloodgen_hf.process import native_bf16

    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(getattr(pipe, "device", "cpu"))
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16 asked for, but this GPU has no bfloat16 support")
    if precision != "auto":
        return precision
    diffusion = "scheduler" in getattr(pipe, "components", {})
    return "bf16" if device.type == "cpu" and diffusion and native_bf16() else "fp32"


def precision_context(precision: str, device) -> contextlib.AbstractContextManager:
    """bf16: torch.autocast, so convolutions and matmuls run in bf16 while the pipeline keeps its sample and
    scheduler arithmetic in fp32 (BloodDDPMPipeline casts each UNet output back); fp32: nothing."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def generate(
    pipe,
    labels: np.ndarray,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    precision: str = "auto",
    **pipeline_kwargs,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (uint8 images [B,H,W,3], labels [B], seeds [B]) batch by batch, at `precision` (resolve_precision)."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    device = pipe.device
    autocast = precision_context(resolve_precision(precision, pipe), device)
    if hasattr(pipe, "set_progress_bar_config"):  # one bar over all images, not one per batch's denoising loop
        pipe.set_progress_bar_config(disable=True)
    with tqdm(total=len(labels), unit="img", desc="sample", disable=not progress) as bar:
        for start in range(0, len(labels), batch_size):
            batch = labels[start : start + batch_size]
            seeds = np.arange(start, start + len(batch), dtype=np.int64) + seed
            generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
            with autocast:
                images = pipe(
                    num_images=len(batch),
                    class_labels=batch.tolist(),
                    generator=generators,
                    output_type="pt",
                    **pipeline_kwargs,
                ).images.float()
            yield (images.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy(), batch, seeds
            bar.update(len(batch))


def sampling_record(pipe, sampling_kwargs: dict) -> dict:
    """The sampling settings as results and caches record them: the options given, with the precision
    resolved for this pipeline on this machine (an fp32 result must not stand in for a bf16 one)."""
    return {**sampling_kwargs, "precision": resolve_precision(sampling_kwargs.get("precision", "auto"), pipe)}


def recorded_sampling(record: dict) -> dict:
    """A record read back from results or caches (an evaluation protocol, TSTR settings), with the sampling
    settings it holds as they would be written now: those written before --precision were all fp32."""
    if not isinstance(record.get("sampling"), dict):
        return record
    return {**record, "sampling": {"precision": "fp32", **record["sampling"]}}


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise FileNotFoundError(f"cannot write {out}: folder {out.parent} does not exist")


def write_class_folder(
    records: Iterable[tuple[np.ndarray, int, str, tuple]],
    out: Path,
    info: dict,
    class_names: Sequence[str],
    columns: Sequence[str],
    *,
    num_images: Callable[[list[tuple]], object] = len,
    overwrite: bool,
) -> list[tuple]:
    """<out>/<class name>/<name>.png for each (image, label, name, values) record, manifest.csv (file, label,
    class_name, *columns; a row per image, ending in its `values`) and info.json (`info`, num_images = `num_images`
    of the manifest rows); returns the rows. The one PNG writer of `sample` and `augment`.

    Written to a hidden temporary folder renamed into place at the end: an interrupted run
    leaves nothing behind, and an old output is replaced only by a complete new one (and, with
    `overwrite=False`, an output that another process wrote meanwhile not at all).
    """
    with atomic_path(out, is_dir=True, overwrite=overwrite) as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        for class_name in class_names:
            (tmp / class_name).mkdir()
        manifest, pending = [], []
        for image, label, name, values in records:
            rel = f"{class_names[label]}/{name}.png"
            pending.append(pool.submit(Image.fromarray(image).save, tmp / rel, format="PNG", compress_level=1))
            manifest.append((rel, int(label), class_names[label], *values))
        for job in pending:
            job.result()
        with open(tmp / "manifest.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "label", "class_name", *columns])
            writer.writerows(manifest)
        (tmp / INFO_NAME).write_text(json.dumps({**info, "num_images": num_images(manifest)}, indent=2) + "\n")
    return manifest


def write_png_folder(
    batches, out: Path, info: dict, class_names: Sequence[str] = CLASS_NAMES, *, overwrite: bool = True
) -> Path:
    """<out>/<class name>/<index>.png, manifest.csv (file,label,class_name,seed) and info.json, written
    atomically (write_class_folder)."""
    images = itertools.chain.from_iterable(zip(*batch) for batch in batches)
    records = ((image, label, f"{i:06d}", (int(seed),)) for i, (image, label, seed) in enumerate(images))
    write_class_folder(records, out, info, class_names, ("seed",), overwrite=overwrite)
    return out


def write_npz(
    batches, out: Path, info: dict, class_names: Sequence[str] = CLASS_NAMES, *, overwrite: bool = True
) -> Path:
    """One .npz: images uint8 [N,H,W,3], labels int64 [N], seeds int64 [N], class_names, info (JSON)."""
    parts = list(batches)
    arrays = {
        "images": np.concatenate([p[0] for p in parts]),
        "labels": np.concatenate([p[1] for p in parts]).astype(np.int64),
        "seeds": np.concatenate([p[2] for p in parts]),
        "class_names": np.asarray(class_names),
        "info": np.asarray(json.dumps(info)),
    }
    with atomic_path(out, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return out


def hf_dataset_features(class_names: Sequence[str] = CLASS_NAMES):
    """image (PNG, lossless), label (ClassLabel with the model's class names), model (name or path) and seed."""
    from datasets import ClassLabel, Features, Image, Value

    labels = ClassLabel(names=list(class_names))
    return Features({"image": Image(), "label": labels, "model": Value("string"), "seed": Value("int64")})


def write_hf_dataset(
    batches, out: Path, info: dict, class_names: Sequence[str] = CLASS_NAMES, *, overwrite: bool = True
) -> Path:
    """A `datasets.Dataset` (see hf_dataset_features) saved with save_to_disk, plus info.json.

    Batches are PNG-encoded as they come, so memory holds compressed images only; the folder is
    written to a temporary sibling and renamed into place, like the other writers.
    """
    from datasets import Dataset, concatenate_datasets

    features = hf_dataset_features(class_names)
    parts = [
        Dataset.from_dict(
            {"image": list(images), "label": labels, "model": [str(info["model"])] * len(labels), "seed": seeds},
            features=features,
        )
        for images, labels, seeds in batches
    ]
    dataset = concatenate_datasets(parts)
    with atomic_path(out, is_dir=True, overwrite=overwrite) as tmp:
        dataset.save_to_disk(str(tmp))
        (tmp / INFO_NAME).write_text(json.dumps({**info, "num_images": len(dataset)}, indent=2) + "\n")
    return out


def read_hf_dataset(folder: Path):
    """(Dataset, info) from a folder written by write_hf_dataset; a clear error for anything else."""
    from datasets import load_from_disk

    if not (folder / INFO_NAME).is_file() or not (folder / "dataset_info.json").is_file():
        raise FileNotFoundError(f"{folder} is not a dataset written by `bloodgen-hf sample --format hf-dataset`")
    from datasets import ClassLabel

    dataset = load_from_disk(str(folder))
    label = dataset.features.get("label")
    expected = hf_dataset_features(label.names if isinstance(label, ClassLabel) else CLASS_NAMES)
    if dataset.features != expected:
        raise UsageError(f"{folder}: unexpected columns {dataset.features}; expected {expected}")
    return dataset, json.loads((folder / INFO_NAME).read_text())
