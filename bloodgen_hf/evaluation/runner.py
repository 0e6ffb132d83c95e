"""What `evaluate` and `compare` share: building the extractor/classifier, settling the resolution everything
is scored at from the models' own (`pipe.resolution`), refusing a model or BloodNet made for another one unless the
model is explicitly upsampled, checking that generator, real data and evaluator share their classes, naming
models, and evaluating one model into a results folder."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from bloodgen_hf.data import DEFAULT_DATASET, describe_classes, same_classes
from bloodgen_hf.errors import UsageError
from bloodgen_hf.evaluation.features import BloodNetExtractor, FeatureExtractor, build_extractor
from bloodgen_hf.evaluation.protocol import UPSAMPLE_METHODS, Protocol, RealData, Upsample, evaluate
from bloodgen_hf.evaluation.report import write_evaluation
from bloodgen_hf.sampling import pipeline_class_names


def build_tools(
    extractor_name: str,
    metrics: tuple[str, ...],
    device: str = "cpu",
    inception_weights: str | None = None,
    bloodnet: str | None = None,
    num_workers: int = 0,
    resolution: int | None = None,
) -> tuple[FeatureExtractor, BloodNetExtractor | None]:
    """The feature extractor, and BloodNet as classifier when class accuracy is asked for (the same
    object when BloodNet is also the extractor). `resolution` is the size scored at: without `bloodnet` (or
    $BLOODGEN_BLOODNET), BloodNet is the bundled one trained at it (None: the 28 px one)."""
    extractor = build_extractor(
        extractor_name,
        device,
        inception_weights=inception_weights,
        bloodnet=bloodnet,
        num_workers=num_workers,
        resolution=resolution,
    )
    if "accuracy" not in metrics:
        return extractor, None
    if extractor.name == "bloodnet":
        return extractor, extractor
    return extractor, BloodNetExtractor.load(bloodnet, device, resolution=resolution)


def check_resolution_option(resolution: int | None) -> None:
    """None (the model's own size) or a positive size."""
    if resolution is not None and (isinstance(resolution, bool) or resolution < 1):
        raise UsageError(f"--resolution must be a positive number of pixels, got {resolution}")


def check_scoring_options(resolution: int | None, upsample: str | None) -> None:
    """--resolution and --upsample, checked before anything is loaded."""
    check_resolution_option(resolution)
    if upsample is not None and upsample not in UPSAMPLE_METHODS:
        raise UsageError(f"unknown --upsample {upsample!r}; choose from: {', '.join(UPSAMPLE_METHODS)}")


def scoring_resolution(sizes: dict[str, int], resolution: int | None, upsample: str | None) -> int:
    """The resolution every model is scored at: --resolution, else the models' own size, which they must share
    (with --upsample, the largest: the smaller ones are upsampled to it)."""
    check_resolution_option(resolution)
    if resolution is not None:
        return resolution
    if len(set(sizes.values())) > 1 and upsample is None:
        made = ", ".join(f"{model_label(m)}: {s} px" for m, s in sizes.items())
        raise UsageError(
            f"the models make images of different sizes ({made}); one table needs one resolution: pass "
            f"--resolution {max(sizes.values())} --upsample bicubic"
        )
    return max(sizes.values())


def upsampling(model: str, size: int, resolution: int, upsample: str | None) -> Upsample | None:
    """How `model`'s `size` px images reach `resolution`: as they are (None), or upsampled by --upsample. A model
    of another size without --upsample, and any downsampling, are refused in one line naming both sizes."""
    if size == resolution:
        return None
    if size > resolution:
        raise UsageError(
            f"{model} makes {size} px images; scoring them at --resolution {resolution} would downsample them, "
            f"which evaluation does not do: score it at --resolution {size}"
        )
    if upsample is None:
        raise UsageError(
            f"{model} makes {size} px images, not {resolution} px (--resolution {resolution}): pass --upsample "
            f"bicubic to score them upsampled, or --resolution {size}"
        )
    return Upsample(upsample, size, resolution)


def check_evaluator_resolution(tools, resolution: int) -> None:
    """BloodNet resizes what it is given to the size it was trained at: scoring at another size would compare
    features of resized images, so a BloodNet of another resolution is refused, saying how to train one."""
    from bloodgen_hf.evaluation.bloodnet import train_bloodnet_hint

    for tool in tools:
        if isinstance(tool, BloodNetExtractor) and tool.resolution != resolution:
            raise UsageError(
                f"BloodNet at {tool.folder} was trained at {tool.resolution} px; scoring at {resolution} px needs one "
                f"trained at {resolution}{bundled_hint(resolution)}: {train_bloodnet_hint(resolution)}"
            )


def bundled_hint(resolution: int) -> str:
    """Where a bundled BloodNet fits `resolution`, that it is the default: the refused one was a needless --bloodnet."""
    from bloodgen_hf.evaluation.bloodnet import BLOODNET_ENV, bundled_bloodnet

    if not bundled_bloodnet(resolution).is_dir():
        return ""
    return f" (the bundled one is used without --bloodnet and ${BLOODNET_ENV}), or train one"


def scored_label(name_or_path: str, upsample: Upsample | None) -> str:
    """The model's name in results and tables, saying how it was upsampled: 'ddpm-fast (28->64 bicubic)'."""
    return model_label(name_or_path) + (upsample.suffix if upsample is not None else "")


def file_stem(label: str) -> str:
    """A label as a file or folder name: 'ddpm-fast (28->64 bicubic)' -> 'ddpm-fast-28to64-bicubic'
    (plain names are kept as they are)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label.replace("->", "to")).strip("-")


def check_classes(pipe, model: str, real: RealData, dataset: str, tools=()) -> None:
    """Refuse (one line naming both class lists) real data or a BloodNet whose classes are not the generator's:
    per-class metrics and class accuracy would silently compare different cells."""
    ours = pipeline_class_names(pipe)
    if not same_classes(ours, real.class_names):
        raise UsageError(
            f"{model} generates {describe_classes(ours)}, but --dataset {dataset} has "
            f"{describe_classes(real.class_names)}; pass the --dataset it was trained on"
        )
    for tool in tools:
        if isinstance(tool, BloodNetExtractor) and not same_classes(tool.class_names, ours):
            raise UsageError(
                f"the evaluator {tool.folder} classifies {describe_classes(tool.class_names)}, but {model} generates "
                f"{describe_classes(ours)}; train one on the model's data (`bloodgen-hf train bloodnet --dataset "
                f"{dataset} --split train --output-dir runs/bloodnet-x`) and pass --bloodnet runs/bloodnet-x/pipeline"
            )


def model_label(name_or_path: str) -> str:
    """A short name for a bundled model or a folder (runs/gan-28/pipeline -> gan-28)."""
    path = Path(name_or_path)
    if len(path.parts) == 1:
        return name_or_path
    return path.parent.name if path.name == "pipeline" else path.name


def parameter_count(pipe) -> dict[str, int]:
    counts = {
        name: sum(p.numel() for p in c.parameters()) for name, c in pipe.components.items() if hasattr(c, "parameters")
    }
    return {**counts, "total": sum(counts.values())}


def kept_runs_folder(out: Path) -> Path:
    """Where `evaluate_to_folder` keeps finished runs: beside `out`, which is only written at the end."""
    out = Path(out)
    return out.parent / f".{out.name}.runs"


def evaluate_to_folder(
    pipe,
    model: str,
    out: Path,
    extractor: FeatureExtractor,
    classifier,
    protocol: Protocol,
    data_dir=None,
    split: str = "all",
    cache_dir=None,
    sampling_kwargs: dict | None = None,
    log=print,
    dataset: str = DEFAULT_DATASET,
    real: RealData | None = None,
    resolution: int | None = None,
    upsample: str | None = None,
) -> dict:
    """Run the protocol for one pipeline against the real data (`real`, else `dataset` loaded at `resolution`,
    by default the pipeline's image size), after checking that the model (upsampled with `upsample`, a method
    name) and the evaluator fit that resolution and the classes agree; write `out`. Finished runs are kept in
    `kept_runs_folder(out)` until `out` is written, so an interrupted evaluation goes on where it stopped."""
    sampling_kwargs = sampling_kwargs or {}
    size = pipe.resolution
    resolution = real.size if real is not None else resolution
    check_resolution_option(resolution)
    plan = upsampling(model, size, resolution or size, upsample)
    real = real or RealData.load(split, resolution or size, data_dir, dataset)
    check_classes(pipe, model, real, dataset, (extractor, classifier))
    check_evaluator_resolution((extractor, classifier), real.size)
    evaluation = evaluate(
        pipe,
        extractor,
        real,
        protocol,
        classifier=classifier,
        cache_dir=cache_dir,
        sampling_kwargs=sampling_kwargs,
        log=log,
        resume_dir=kept_runs_folder(out),
        upsample=plan,
    )
    evaluation.results["parameters"] = parameter_count(pipe)
    label = model + (plan.suffix if plan is not None else "")
    write_evaluation(evaluation, out, label)
    shutil.rmtree(kept_runs_folder(out), ignore_errors=True)
    return {"model": label, **evaluation.results}
