"""One picture of real images and each model's, the same classes and seeds everywhere, and each model's samples
beside their nearest training image: the memorisation check, seen (issue 33).

    python benchmarks/visual_comparison.py --models gan vae ddpm ddpm-fast --data-dir ../shared/data \
        --out docs/images/visual_comparison.png [--seed 0] [--per-class 8] [--split train] [--overwrite]

Top: one block per source (real, then each model in the order given), a row per class and --per-class columns.
A model's images are those of `bloodgen-hf sample --n <classes x per-class> --seed S` on the CPU (its default
sampler settings, --precision as there): balanced labels, so image i is class i mod C and drawn with seed S+i
(bloodgen_hf.sampling.generate), and the cell of class c, column j is image j*C+c. Every model gets those labels
and seeds. Real: --per-class images of each class of --split, chosen at random (numpy seed S).

Bottom: each block's first column (one image per class) over its nearest --split image, as `bloodgen-hf evaluate`'s
memorisation check finds it (evaluation.metrics.nearest_copies: RMS pixel distance in [0, 1], the best of the
sample's 4 flips; the training image is shown flipped to the sample's orientation), the distance under each pair,
in red at or below evaluate's near-copy threshold (the 1% quantile of 2000 real --split images' distances to
their nearest other one). For real, the nearest *other* image. All models must make images of one size.

Writes --out (PNG) and, beside it, <stem>.json: models, seeds, labels, the real images' indices and the nearest
images and distances, so the figure can be made again.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bloodgen_hf.cli import DEFAULT_MODEL  # marked "(default)" in the figure
from bloodgen_hf.data import DEFAULT_DATASET, DataError, describe_classes, load_data, same_classes
from bloodgen_hf.errors import UsageError
from bloodgen_hf.evaluation import metrics as M
from bloodgen_hf.evaluation.protocol import Protocol, pipeline_fingerprint
from bloodgen_hf.io import atomic_path, make_grid, upscale
from bloodgen_hf.registry import ModelLoadError, load_pipeline, read_provenance, resolve_model
from bloodgen_hf.sampling import check_output, configure_sampling, generate, model_labels, pipeline_class_names

PAD = 2  # pixels between images, before enlarging (as make_grid)
GAP = 24  # pixels between blocks
MARGIN = 8
FONT_SIZE = 16
TITLE = 32  # height of a block's title band


@dataclass(frozen=True)
class Panel:
    """One source's images: its block [C, K, R, R, 3], its first column over the nearest training images
    [2, C, R, R, 3] and their distances [C]."""

    title: str
    grid: np.ndarray
    pairs: np.ndarray
    distances: np.ndarray


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="bundled model names or pipeline folders")
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding the MedMNIST archives")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="as `bloodgen-hf train --dataset`")
    parser.add_argument("--out", type=Path, default=Path("docs/images/visual_comparison.png"))
    parser.add_argument("--seed", type=int, default=0, help="image i of each model uses seed+i")
    parser.add_argument("--per-class", type=int, default=8, help="columns per class")
    parser.add_argument("--split", default="train", help="where real images and nearest neighbours come from")
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or auto (as `bloodgen-hf sample`)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out and its .json")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class must be at least 1, got {args.per_class}")
    return args


def json_path(out: Path) -> Path:
    return out.with_suffix(".json")


def check_outputs(out: Path, overwrite: bool) -> None:
    """Refuse before any sampling, not after: a name that is not a .png, or a PNG or JSON already there."""
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {out}")
    for path in (out, json_path(out)):
        check_output(path, overwrite)


def load_models(names: list[str]) -> list[tuple[str, object]]:
    """(name, pipeline on the CPU) for each model; all must make images of one size, else one line naming both."""
    pipes = [(name, load_pipeline(name, "cpu")) for name in names]
    first, first_pipe = pipes[0]
    for name, pipe in pipes[1:]:
        if pipe.resolution != first_pipe.resolution:
            raise UsageError(
                f"the models must make images of one size: {first} makes {first_pipe.resolution} px, "
                f"{name} makes {pipe.resolution} px"
            )
    return pipes


def check_classes(name: str, pipe, class_names: tuple[str, ...]) -> None:
    """Every model must name the data's classes, so one label means one class in every block."""
    theirs = pipeline_class_names(pipe)
    if not same_classes(theirs, class_names):
        raise UsageError(f"{name} has {describe_classes(theirs)}, the data {describe_classes(class_names)}")


def by_class(flat: np.ndarray, num_classes: int) -> np.ndarray:
    """Image j*C+c of a balanced plan -> [c, j]: the plan's order (classes in turn) as class rows."""
    per_class = len(flat) // num_classes
    return np.swapaxes(flat.reshape(per_class, num_classes, *flat.shape[1:]), 0, 1)


def sample_model(pipe, num_classes: int, per_class: int, seed: int, precision: str) -> dict:
    """The images `bloodgen-hf sample --n C*K --seed S` makes, by sampling.py's own path, arranged [C, K, ...]."""
    labels, _ = model_labels(pipe, num_classes * per_class, None, "balanced")
    pipe, kwargs = configure_sampling(pipe, {"precision": precision})
    batches = list(generate(pipe, labels, seed=seed, batch_size=250, progress=False, **kwargs))
    images, plan, seeds = (np.concatenate(part) for part in zip(*batches))
    assert (by_class(plan, num_classes) == np.arange(num_classes)[:, None]).all()  # balanced: classes in turn
    return {
        "grid": by_class(images, num_classes),
        "seeds": by_class(seeds, num_classes),
        "labels": plan,
        "precision": kwargs["precision"],
    }


def real_indices(labels: np.ndarray, num_classes: int, per_class: int, seed: int, split: str) -> np.ndarray:
    """[C, K] indices of random images of each class (numpy seed `seed`), in the order they are drawn."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise UsageError(f"--per-class {per_class}: class {c} has only {len(pool)} images in the {split} split")
        chosen.append(rng.choice(pool, per_class, replace=False))
    return np.stack(chosen)


def nearest_pairs(queries: np.ndarray, reference: np.ndarray, exclude: np.ndarray | None = None) -> tuple:
    """(pairs [2, N, ...]: each query over its nearest reference image flipped to the query's orientation, the
    nearest_copies record)."""
    copies = M.nearest_copies(queries, reference, exclude=exclude)
    matched = np.stack([M.flips(reference[i : i + 1])[f][0] for i, f in zip(copies["index"], copies["flip"])])
    return np.stack([queries, matched]), copies


def copies_record(copies: dict) -> dict:
    return {
        "index": copies["index"].tolist(),
        "flip": copies["flip"].tolist(),
        "distance": [round(float(d), 6) for d in copies["distance"]],
    }


@lru_cache
def font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def text_width(text: str, size: int = FONT_SIZE) -> int:
    return int(np.ceil(font(size).getlength(text)))


def block_picture(images: np.ndarray, scale: int) -> Image.Image:
    """[rows, cols, R, R, 3] -> one enlarged grid, a row per class."""
    rows, cols = images.shape[:2]
    return Image.fromarray(upscale(make_grid(images.reshape(rows * cols, *images.shape[2:]), nrow=cols), scale))


def draw_figure(panels: list[Panel], class_names: tuple[str, ...], threshold: float, split: str) -> Image.Image:
    """Blocks side by side (class names once, on the left), the nearest-image pairs under each block."""
    num_classes, per_class, size = panels[0].grid.shape[:3]
    scale = max(1, 84 // size)  # 3x at 28 px, as evaluate's pairs picture
    cell = (size + PAD) * scale
    column = (max(per_class, num_classes) * (size + PAD) + PAD) * scale
    left = MARGIN + max(text_width(n) for n in (*class_names, "nearest")) + MARGIN
    grid_height = num_classes * cell + PAD * scale
    pairs_top = TITLE + grid_height + GAP + TITLE
    width = left + len(panels) * column + (len(panels) - 1) * GAP + MARGIN
    height = pairs_top + 2 * cell + PAD * scale + FONT_SIZE + 2 * MARGIN
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(class_names):
        draw.text((MARGIN, TITLE + PAD * scale + r * cell + cell // 2), name, fill="black", font=font(), anchor="lm")
    for r, name in enumerate(("sample", "nearest")):
        draw.text(
            (MARGIN, pairs_top + PAD * scale + r * cell + cell // 2), name, fill="black", font=font(), anchor="lm"
        )
    heading = (
        f"first column (one image per class, in class order) over its nearest {split} image, flipped to match; "
        f"RMS pixel distance, red at or below the near-copy threshold {threshold:.3f} "
        f"(1% of real {split} images' distances to their nearest other one)"
    )
    draw.text((left, pairs_top - TITLE // 2), heading, fill="black", font=font(), anchor="lm")
    for k, panel in enumerate(panels):
        x = left + k * (column + GAP)
        draw.text((x + column // 2, TITLE // 2), panel.title, fill="black", font=font(FONT_SIZE + 2), anchor="mm")
        canvas.paste(block_picture(panel.grid, scale), (x, TITLE))
        canvas.paste(block_picture(panel.pairs, scale), (x, pairs_top))
        for c, distance in enumerate(panel.distances):
            colour = "red" if distance <= threshold else "black"
            where = (x + PAD * scale + c * cell + size * scale // 2, pairs_top + 2 * cell + PAD * scale + MARGIN)
            draw.text(where, f"{distance:.3f}", fill=colour, font=font(FONT_SIZE - 2), anchor="mt")
    return canvas


def title(name: str) -> str:
    shown = name if "/" not in name and "\\" not in name else Path(name).name or name
    return f"{shown} (default)" if name == DEFAULT_MODEL else shown


def trained_split(name: str) -> str | None:
    """The split the model's provenance says it was trained on, None if unrecorded."""
    provenance = read_provenance(resolve_model(name))
    return provenance.get("split") if isinstance(provenance, dict) else None


def model_record(name: str, pipe, drawn: dict, copies: dict) -> dict:
    """What the JSON keeps of one model: which weights, how they sampled, its first column's nearest images."""
    nearest = {"seeds": drawn["seeds"][:, 0].tolist(), **copies_record(copies)}
    return {
        "name": name,
        "model_sha256": pipeline_fingerprint(pipe),
        "precision": drawn["precision"],
        "trained_split": trained_split(name),
        "nearest": nearest,
    }


def command(args: argparse.Namespace) -> str:
    """The command that makes this figure again (--overwrite aside)."""
    return (
        f"python benchmarks/visual_comparison.py --models {' '.join(args.models)} --dataset {args.dataset} "
        f"--data-dir {args.data_dir} --out {args.out} --seed {args.seed} --per-class {args.per_class} "
        f"--split {args.split} --precision {args.precision}"
    )


def compare(args: argparse.Namespace) -> dict:
    """Sample, find nearest images, draw and write; the JSON record."""
    check_outputs(args.out, args.overwrite)
    pipes = load_models(args.models)
    resolution = pipes[0][1].resolution
    data = load_data(args.dataset, args.split, resolution, args.data_dir)
    names, num_classes = data.class_names, len(data.class_names)
    for name, pipe in pipes:
        check_classes(name, pipe, names)
    started = time.time()
    threshold = M.memorization_threshold(
        data.images, Protocol.memorization_quantile, Protocol.memorization_calibration, seed=args.seed
    )
    print(f"near-copy threshold {threshold:.4f} from {args.split} ({time.time() - started:.0f} s)", flush=True)

    chosen = real_indices(data.labels, num_classes, args.per_class, args.seed, args.split)
    pairs, copies = nearest_pairs(data.images[chosen[:, 0]], data.images, exclude=chosen[:, 0])
    panels = [Panel(f"real ({args.split})", data.images[chosen], pairs, copies["distance"])]
    record = {
        "command": command(args),
        "dataset": args.dataset,
        "split": args.split,
        "resolution": resolution,
        "seed": args.seed,
        "per_class": args.per_class,
        "class_names": list(names),
        "layout": "labels and seeds [class c][column j]: image j*C+c of `bloodgen-hf sample --n C*per_class --seed S`",
        "near_copy_threshold": {
            "value": threshold,
            "quantile": Protocol.memorization_quantile,
            "calibration_images": Protocol.memorization_calibration,
            "seed": args.seed,
        },
        "real": {"indices": chosen.tolist(), "nearest": copies_record(copies)},
        "models": [],
    }
    for name, pipe in pipes:
        started = time.time()
        drawn = sample_model(pipe, num_classes, args.per_class, args.seed, args.precision)
        pairs, copies = nearest_pairs(drawn["grid"][:, 0], data.images)
        panels.append(Panel(title(name), drawn["grid"], pairs, copies["distance"]))
        record.setdefault("labels", by_class(drawn["labels"], num_classes).tolist())  # the same for every model
        record.setdefault("seeds", drawn["seeds"].tolist())
        record["models"].append(model_record(name, pipe, drawn, copies))
        median = float(np.median(copies["distance"]))
        print(
            f"{name}: {drawn['seeds'].size} images ({drawn['precision']}) in {time.time() - started:.1f} s, "
            f"nearest {args.split} distance median {median:.3f}",
            flush=True,
        )

    picture = draw_figure(panels, names, threshold, args.split)
    with atomic_path(args.out, overwrite=args.overwrite) as tmp:
        picture.save(tmp, format="PNG")
    with atomic_path(json_path(args.out), overwrite=args.overwrite) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({picture.width}x{picture.height}) and {json_path(args.out)}")
    return record


def main(argv: list[str] | None = None) -> dict:
    from bloodgen_hf.process import tune_malloc

    tune_malloc()  # sampling is about 2x faster with it, as in the CLI
    args = parse_args(argv)
    try:
        return compare(args)
    except (UsageError, DataError, ModelLoadError, FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
