"""What `evaluate` and `compare` share: building the extractor/classifier, reading a model's image size,
checking that generator, real data and evaluator share their classes, naming models, and evaluating one
model into a results folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from bloodgen_hf.data import DEFAULT_DATASET, describe_classes, same_classes
from bloodgen_hf.errors import UsageError
from bloodgen_hf.evaluation.features import BloodNetExtractor, FeatureExtractor, build_extractor
from bloodgen_hf.evaluation.protocol import Protocol, RealData, evaluate
from bloodgen_hf.evaluation.report import write_evaluation
from bloodgen_hf.sampling import generate, pipeline_class_names


def build_tools(
    extractor_name: str,
    metrics: tuple[str, ...],
    device: str = "cpu",
    inception_weights: str | None = None,
    bloodnet: str | None = None,
    num_workers: int = 0,
) -> tuple[FeatureExtractor, BloodNetExtractor | None]:
    """The feature extractor, and BloodNet as classifier when class accuracy is asked for (the same
    object when BloodNet is also the extractor)."""
    extractor = build_extractor(
        extractor_name, device, inception_weights=inception_weights, bloodnet=bloodnet, num_workers=num_workers
    )
    classifier = None
    if "accuracy" in metrics:
        classifier = extractor if extractor.name == "bloodnet" else BloodNetExtractor.load(bloodnet, device)
    return extractor, classifier


def image_size(pipe, sampling_kwargs: dict) -> int:
    """The side of the images a pipeline makes, from one generated image (works for every family)."""
    images, _, _ = next(
        generate(pipe, np.zeros(1, dtype=np.int64), seed=0, batch_size=1, progress=False, **sampling_kwargs)
    )
    return int(images.shape[1])


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
) -> dict:
    """Run the protocol for one pipeline against the real data (`real`, else `dataset` loaded at the
    pipeline's image size), after checking the classes agree; write `out`. Finished runs are kept in
    `kept_runs_folder(out)` until `out` is written, so an interrupted evaluation goes on where it stopped."""
    sampling_kwargs = sampling_kwargs or {}
    real = real or RealData.load(split, image_size(pipe, sampling_kwargs), data_dir, dataset)
    check_classes(pipe, model, real, dataset, (extractor, classifier))
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
    )
    evaluation.results["parameters"] = parameter_count(pipe)
    write_evaluation(evaluation, out, model)
    shutil.rmtree(kept_runs_folder(out), ignore_errors=True)
    return {"model": model, **evaluation.results}
