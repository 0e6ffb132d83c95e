"""`bloodgen-hf compare`: the protocol for several models, and one folder with a markdown report.

<out>/report.md        metric table (mean ± std, real-vs-real floor), model facts, per-class grids
<out>/metrics.png      one bar chart per metric with std error bars
<out>/curves.png       training curves, for models whose folder (or its parent) has metrics.jsonl
<out>/grids/*.png      8 images per class (rows) for the real data and every model
<out>/models/<name>/   each model's results.json, eval_results.json, summary.md
<out>/tstr/, tstr.json with --tstr N: train on N synthetic vs N real images, test on real (evaluation/tstr.py)

Every model is scored at one resolution (`resolution`, by default the size the models share); with
`upsample`, smaller models are upsampled to it and labelled so ('ddpm-fast (28->64 bicubic)', folder
models/ddpm-fast-28to64-bicubic), so a 64 px model and the upsampled 28 px default share one table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bloodgen_hf.data import CLASS_NAMES, DEFAULT_DATASET
from bloodgen_hf.errors import UsageError
from bloodgen_hf.evaluation.protocol import Protocol, RealData, Upsample, pipeline_fingerprint
from bloodgen_hf.evaluation.report import (
    bar_chart,
    comparison_table,
    curves_chart,
    protocol_line,
    write_markdown_report,
)
from bloodgen_hf.evaluation.runner import (
    check_classes,
    check_evaluator_resolution,
    evaluate_to_folder,
    file_stem,
    parameter_count,
    scored_label,
    scoring_resolution,
    upsampling,
)
from bloodgen_hf.evaluation.tstr import TSTRConfig, run_tstr, split_models, tstr_lines
from bloodgen_hf.io import labelled_class_grid, save_image
from bloodgen_hf.sampling import generate, pipeline_class_names, recorded_sampling, sampling_record
from bloodgen_hf.training.cost import describe_cost, read_training_cost

GRID_PER_CLASS = 8
PROTOCOL_KEYS = (
    "runs",
    "n",
    "seed",
    "distribution",
    "metrics",
    "dataset",
    "split",
    "size",
    "upsample",
    "extractor",
    "classifier",
    "sampling",
)


def class_grid(
    images: np.ndarray,
    labels: np.ndarray,
    per_class: int = GRID_PER_CLASS,
    seed: int = 0,
    class_names: tuple[str, ...] = CLASS_NAMES,
):
    """`per_class` random images of every class (repeats where a class has fewer), one labelled row per class."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in range(len(class_names))]
    rows = [images[rng.choice(m, per_class, replace=len(m) < per_class)] for m in members]
    return labelled_class_grid(np.stack(rows), list(class_names), scale=grid_scale(images.shape[1]))


def model_grid(
    pipe, sampling_kwargs: dict, per_class: int = GRID_PER_CLASS, seed: int = 0, upsample: Upsample | None = None
):
    """`per_class` images of every class, upsampled as they were scored."""
    names = pipeline_class_names(pipe)
    labels = np.repeat(np.arange(len(names)), per_class)
    images = np.concatenate([b[0] for b in generate(pipe, labels, seed=seed, progress=False, **sampling_kwargs)])
    images = images if upsample is None else upsample(images)
    rows = images.reshape(len(names), per_class, *images.shape[1:])
    return labelled_class_grid(rows, list(names), scale=grid_scale(images.shape[1]))


def grid_scale(size: int) -> int:
    """Grids are enlarged to be readable: 2x at 28 px, as they are from 56 px on."""
    return max(1, 56 // size)


def training_curves(folder: Path) -> list[dict]:
    """Rows of metrics.jsonl from a model folder or its parent (runs/<name>/pipeline -> runs/<name>)."""
    for candidate in (folder / "metrics.jsonl", folder.parent / "metrics.jsonl"):
        if candidate.is_file():
            rows = [json.loads(line) for line in candidate.read_text().splitlines() if line.strip()]
            return [r for r in rows if "step" in r]
    return []


def reusable(folder: Path, protocol: dict, fingerprint: str) -> dict | None:
    """Earlier results in `folder` made with the same protocol and the same weights (`model_sha256`), so
    an interrupted compare can go on and a retrained model is never scored by its predecessor's results."""
    file = folder / "results.json"
    if not file.is_file():
        return None
    results = json.loads(file.read_text())
    old = recorded_sampling(results.get("protocol", {}))
    same = all(old.get(k) == protocol.get(k) for k in PROTOCOL_KEYS if k in protocol)
    return results if same and results.get("model_sha256") == fingerprint else None


def expected_protocol(
    protocol: Protocol, extractor, classifier, split: str, sampling: dict, dataset: str, size: int = 28, upsample=None
) -> dict:
    return {
        "runs": protocol.runs,
        "n": protocol.n,
        "seed": protocol.seed,
        "distribution": protocol.distribution,
        "metrics": list(protocol.metrics),
        "dataset": dataset,
        "split": split,
        "size": size,
        "upsample": None if upsample is None else upsample.record(),
        "extractor": {"name": extractor.name, "identity": extractor.identity},
        "classifier": None if classifier is None else {"name": "bloodnet", "identity": classifier.identity},
        "sampling": sampling,
    }


def compare(
    models: list[str],
    out: Path,
    extractor,
    classifier,
    protocol: Protocol,
    *,
    load_pipeline,
    data_dir=None,
    split: str = "all",
    cache_dir=None,
    sampling_kwargs: dict | None = None,
    reuse: bool = False,
    html: bool = False,
    log=print,
    dataset: str = DEFAULT_DATASET,
    tstr: TSTRConfig | None = None,
    resolution: int | None = None,
    upsample: str | None = None,
) -> Path:
    """Every model is loaded, and checked against the resolution (`resolution`, else the models' shared size;
    smaller models are upsampled with `upsample`, a method name), the real data and the evaluator (and with
    `tstr`, against the test split it would be scored on), before anything is written."""
    from bloodgen_hf.registry import resolve_model

    sampling_kwargs = sampling_kwargs or {}
    pipes = {model: load_pipeline(model) for model in models}
    sizes = {model: pipe.resolution for model, pipe in pipes.items()}
    resolution = scoring_resolution(sizes, resolution, upsample)
    plans = {model: upsampling(model, sizes[model], resolution, upsample) for model in models}
    labels = [scored_label(m, plans[m]) for m in models]
    if len({file_stem(label) for label in labels}) != len(labels):
        raise UsageError(f"two models share a name ({', '.join(labels)}); give their folders distinct names")
    real = RealData.load(split, resolution, data_dir, dataset)
    for model in models:
        check_classes(pipes[model], model, real, dataset, (extractor, classifier))
    check_evaluator_resolution((extractor, classifier), resolution)
    if tstr is not None:
        tstr.check()
        split_models({label: pipes[model] for model, label in zip(models, labels)}, dataset)
    out.mkdir(parents=True, exist_ok=True)
    entries, facts, grids, curves = {}, {}, {}, {}
    for model, label in zip(models, labels):
        pipe, plan = pipes[model], plans[model]
        folder = out / "models" / file_stem(label)
        sampling = sampling_record(pipe, sampling_kwargs)  # each model's precision, as its results record it
        expected = expected_protocol(protocol, extractor, classifier, split, sampling, real.dataset, real.size, plan)
        results = reusable(folder, expected, pipeline_fingerprint(pipe)) if reuse else None
        if results is None:
            log(f"== {label}: evaluating")
            results = evaluate_to_folder(
                pipe,
                model,
                folder,
                extractor,
                classifier,
                protocol,
                data_dir,
                split,
                cache_dir,
                sampling_kwargs,
                log,
                dataset=dataset,
                real=real,
                upsample=upsample,
            )
        else:
            log(f"== {label}: reusing {folder / 'results.json'}")
        entries[label] = results
        timing = results["timing"]["images_per_s"]
        machine = results.get("machine", "not recorded")
        model_folder = resolve_model(model)  # its training_cost.json and metrics.jsonl
        facts[label] = {
            "parameters": parameter_count(pipe)["total"],
            "images_per_s": timing,
            "machine": machine,
            "training_cost": read_training_cost(model_folder),
        }
        grids[label] = model_grid(pipe, sampling_kwargs, seed=protocol.seed, upsample=plan)
        curves[label] = training_curves(model_folder)
    grids = {"real": class_grid(real.images, real.labels, seed=protocol.seed, class_names=real.class_names), **grids}
    tstr_results = {}
    if tstr is not None:
        labelled = {label: pipes[model] for model, label in zip(models, labels)}
        tstr_results = run_tstr(labelled, out, tstr, data_dir, dataset, sampling_kwargs, reuse, log)
    return write_report(out, entries, facts, grids, curves, html, tstr_results)


def write_report(
    out: Path, entries: dict, facts: dict, grids: dict, curves: dict, html: bool = False, tstr: dict | None = None
) -> Path:
    for name, grid in grids.items():
        save_image(grid, out / "grids" / f"{file_stem(name)}.png")
    bar_chart(entries, out / "metrics.png")
    curves_file = curves_chart(curves, out / "curves.png")
    first = next(iter(entries.values()))
    shared = {**first["protocol"], "upsample": None}  # each model's label says whether it was upsampled
    lines = ["# Model comparison", "", protocol_line(shared), "", *comparison_table(entries), ""]
    lines += ["![metrics](metrics.png)", *tstr_lines(tstr or {}), ""]
    lines += ["## Models", "", "| " + " | ".join(MODEL_COLUMNS) + " |", "|---" * len(MODEL_COLUMNS) + "|"]
    lines += [model_row(name, fact) for name, fact in facts.items()]
    lines += ["", "## Samples per class", ""]
    lines.append("| " + " | ".join(grids) + " |")
    lines.append("|---" * len(grids) + "|")
    lines.append("| " + " | ".join(f"![{n}](grids/{file_stem(n)}.png)" for n in grids) + " |")
    if curves_file is not None:
        lines += ["", "## Training curves", "", "![training curves](curves.png)"]
    return write_markdown_report(lines, out, html)


MODEL_COLUMNS = (
    "model",
    "parameters",
    "sampling (images/s)",
    "ms/image",
    "measured on",
    "training CPU-minutes",
    "trained on",
)


def model_row(name: str, fact: dict) -> str:
    """One row of the model table: size, sampling speed and where it was timed, and what training cost
    (training_cost.json in the model's folder; "not recorded" for models saved before runs wrote it)."""
    speed = fact["images_per_s"]["mean"]
    cpu, trained_on = describe_cost(fact.get("training_cost"))
    return (
        f"| {name} | {fact['parameters']:,} | {speed:.1f} | {1000 / speed:.2f} | {fact['machine']} | {cpu} "
        f"| {trained_on} |"
    )


QUALITY_MARGIN = 0.10  # a model this close to the best in FD and class accuracy counts as equally good


def choose_default(results: dict[str, dict]) -> str:
    """The rule for `bloodgen-hf sample`'s default model (stated in the README): quality first, then speed.

    `results` maps a model name to its compare results.json. The best model has the lowest mean
    fd_bloodnet. Among the models within QUALITY_MARGIN of it in both mean fd_bloodnet and mean class
    accuracy, the default is the one that samples the most images per second."""
    if not results:
        raise UsageError("no compare results to choose a default model from")

    def mean(name: str, metric: str) -> float:
        return float(results[name]["metrics"][metric]["mean"])

    best = min(results, key=lambda name: mean(name, "fd_bloodnet"))
    close = [
        name
        for name in results
        if mean(name, "fd_bloodnet") <= (1 + QUALITY_MARGIN) * mean(best, "fd_bloodnet")
        and mean(name, "class_accuracy") >= (1 - QUALITY_MARGIN) * mean(best, "class_accuracy")
    ]
    return max(close, key=lambda name: np.mean([r["timing"]["images_per_s"] for r in results[name]["runs"]]))
