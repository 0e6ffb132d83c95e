"""Hub cards for models and synthetic datasets, and the evaluation-results file they quote.

Cards are rendered from the Jinja templates in bloodgen_hf/templates/ (package data, so an installed wheel
renders them too; huggingface_hub's `ModelCard.from_template`): YAML metadata from a card-data object, the
body from the template.

An evaluation writes `<model folder>/eval_results.json` with `write_eval_results`:

    {"split": "test", "num_generated": 10000,
     "metrics": [{"type": "fid", "value": 12.3, "name": "FID (Inception-v3)", "config": "inception"},
                 {"type": "kid", "value": 0.004}]}

`type` and `value` are required for each metric; `push` turns every metric into a `model-index`
entry of the card, so the Hub shows the measured numbers next to the model.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData
from PIL import Image

from bloodgen_hf.data import CLASS_NAMES
from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import atomic_path, labelled_class_grid
from bloodgen_hf.provenance import describe_provenance
from bloodgen_hf.sampling import generate, pipeline_class_names

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
EVAL_RESULTS_NAME = "eval_results.json"
TRAIN_CONFIG_NAME = "train_config.json"
SAMPLE_GRID_NAME = "samples.png"
HUB_DATASET = "albertvillanova/medmnist-v2"  # the Hub's MedMNIST mirror; BloodMNIST is its "bloodmnist" config
MODEL_LICENSE = "apache-2.0"
DATA_LICENSE = "cc-by-4.0"  # BloodMNIST's licence, which synthetic images derived from it keep
FAMILY_TITLES = {
    "gan": "GAN (conditional DCGAN)",
    "vae": "variational autoencoder",
    "ddpm": "diffusion model (DDPM)",
    "ldm": "latent diffusion model (LDM)",
}
TAGS = ["bloodgen-hf", "bloodmnist", "medmnist", "medical-imaging", "image-generation", "class-conditional"]


# --- evaluation results ------------------------------------------------------------------------


def write_eval_results(
    folder: str | Path, metrics: Sequence[dict], split: str, num_generated: int | None = None, **details
) -> Path:
    """Record measured metrics next to a model's weights (atomic), in the format the module docstring shows."""
    path = Path(folder) / EVAL_RESULTS_NAME
    results = {"split": split, "num_generated": num_generated, "metrics": list(metrics), **details}
    check_eval_results(results, path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    return path


def read_eval_results(folder: str | Path) -> dict | None:
    """The folder's eval_results.json, checked; None when the model has not been evaluated."""
    path = Path(folder) / EVAL_RESULTS_NAME
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}") from err
    return check_eval_results(results, path)


def check_eval_results(results: object, path: Path) -> dict:
    def bad(problem: str) -> UsageError:
        example = {"split": "test", "metrics": [{"type": "fid", "value": 12.3}]}
        return UsageError(f"{path}: {problem}; expected e.g. {json.dumps(example)}")

    if not isinstance(results, dict):
        raise bad("not a JSON object")
    if not isinstance(results.get("split"), str) or not results["split"]:
        raise bad("'split' must name the real split compared against")
    metrics = results.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        raise bad("'metrics' must be a non-empty list")
    for m in metrics:
        if not isinstance(m, dict) or not isinstance(m.get("type"), str) or not m["type"]:
            raise bad(f"metric {m!r} needs a 'type'")
        value = m.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(f"metric {m['type']!r} needs a finite number 'value', got {value!r}")
    return results


# --- training command and sample grid -----------------------------------------------------------


def find_train_config(folder: Path) -> dict | None:
    """train_config.json in the model folder, or in the run folder around a training run's `pipeline/`."""
    candidates = [folder / TRAIN_CONFIG_NAME]
    if folder.name == "pipeline":
        candidates.append(folder.parent / TRAIN_CONFIG_NAME)
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise UsageError(f"cannot read {path}: {err}") from err
    return None


COMMA_JOINED = ("checkpoint_cpu_minutes",)  # list options whose flag takes one comma-separated value


def training_command(family: str, config: dict) -> str:
    """The recorded command line of the run; for older runs, `bloodgen-hf train <family> ...` rebuilt from
    the saved TrainConfig (resume left out)."""
    if config.get("command"):
        return config["command"]
    skip = ("extra", "resume", "command", "num_processes", "provenance")
    options = {k: v for k, v in config.items() if k not in skip} | dict(config.get("extra") or {})
    words = ["bloodgen-hf", "train", family]
    for key, value in options.items():
        flag = key.replace("_", "-")
        if value is None or value in ((), []):
            continue
        if isinstance(value, bool):
            words.append(f"--{flag}" if value else f"--no-{flag}")
        elif key in COMMA_JOINED:
            words += [f"--{flag}", ",".join(f"{v:g}" for v in value)]
        elif isinstance(value, (list, tuple)):
            words += [f"--{flag}", *map(str, value)]
        else:
            words += [f"--{flag}", str(value)]
    return shlex.join(words)


def sample_images(pipe, per_class: int = 8, seed: int = 0, **pipeline_kwargs) -> np.ndarray:
    """uint8 [classes*per_class, H, W, 3], class-major; image i drawn with seed `seed + i` like `bloodgen-hf sample`."""
    labels = np.repeat(np.arange(len(pipeline_class_names(pipe))), per_class)
    batches = generate(pipe, labels, seed=seed, progress=False, **pipeline_kwargs)
    return np.concatenate([images for images, _, _ in batches])


def grid_image(images: np.ndarray, per_class: int, class_names: Sequence[str] | None = None) -> Image.Image:
    """One row per class with its name on the left; small images enlarged to about 96 px for the Hub page."""
    rows = images.reshape(-1, per_class, *images.shape[1:])
    if class_names is None:  # callers that predate other datasets: BloodMNIST's names, else row numbers
        class_names = CLASS_NAMES if len(rows) == len(CLASS_NAMES) else [str(i) for i in range(len(rows))]
    return labelled_class_grid(rows, list(class_names), scale=max(1, round(96 / images.shape[1])))


# --- cards ---------------------------------------------------------------------------------------


def template(name: str) -> str:
    path = TEMPLATES_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"card template {path} is missing: bloodgen-hf is installed without its package data")
    return str(path)


def metric_rows(eval_results: dict | None) -> list[dict]:
    if not eval_results:
        return []
    return [
        {**m, "name": m.get("name") or m["type"].upper(), "display": f"{m['value']:.4g}"}
        for m in eval_results["metrics"]
    ]


def render_model_card(
    *,
    repo_id: str,
    revision: str,
    pipeline_class: str,
    family: str,
    class_names: Sequence[str],
    parameters: int,
    resolution: int,
    grid_per_class: int,
    train_config: dict | None = None,
    eval_results: dict | None = None,
    provenance: dict | None = None,
) -> ModelCard:
    """The model card: metadata (licence, library, tags, dataset, model-index from eval results) + usage,
    classes, sample grid, training command and data (`provenance`, else the one train_config.json recorded)
    and evaluation, with the usage snippet pinned to `revision`."""
    provenance = provenance or (train_config or {}).get("provenance")
    metrics = metric_rows(eval_results)
    eval_entries = [
        EvalResult(
            task_type="image-generation",
            task_name="Class-conditional image generation",
            dataset_type=HUB_DATASET,
            dataset_name="BloodMNIST",
            dataset_config="bloodmnist",
            dataset_split=eval_results["split"],
            metric_type=m["type"],
            metric_name=m["name"],
            metric_value=m["value"],
            metric_config=m.get("config"),
        )
        for m in metrics
    ]
    card_data = ModelCardData(
        license=MODEL_LICENSE,
        library_name="diffusers",
        tags=[*TAGS, family],
        datasets=[HUB_DATASET],
        model_name=repo_id.split("/")[-1] if eval_entries else None,
        eval_results=eval_entries or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=template("model_card.md"),
        title=f"BloodMNIST {FAMILY_TITLES.get(family, family.upper())}: {repo_id.split('/')[-1]}",
        family_title=FAMILY_TITLES.get(family, family.upper()),
        repo_id=repo_id,
        revision=revision,
        pipeline_class=pipeline_class,
        parameters=f"{parameters:,}",
        resolution=resolution,
        class_names=list(class_names),
        sample_grid=SAMPLE_GRID_NAME,
        grid_per_class=grid_per_class,
        training_command=training_command(family, train_config) if train_config else None,
        training_data=describe_provenance(provenance) if provenance else None,
        metrics=[{"name": m["name"], "value": m["display"]} for m in metrics],
        eval_split=eval_results["split"] if eval_results else None,
        num_generated=eval_results.get("num_generated") if eval_results else None,
    )


def size_category(n: int) -> str:
    """The Hub's size_categories bucket for n examples."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
    return next((label for bound, label in bounds if n < bound), "1M<n<10M")


def render_dataset_card(dataset, repo_id: str, info: dict, data_files: str = "data/train-*") -> DatasetCard:
    """The card of a synthetic dataset: metadata (licence, tags, size, the parquet files as the train
    split) + usage, per-class counts and the sampling settings that made it."""
    names = dataset.features["label"].names
    counts = np.bincount(np.asarray(dataset["label"]), minlength=len(names))
    card_data = DatasetCardData(
        license=DATA_LICENSE,
        task_categories=["image-classification"],
        tags=["synthetic", *TAGS],
        size_categories=[size_category(len(dataset))],
        pretty_name=f"Synthetic BloodMNIST ({info['model']})",
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}],
    )
    return DatasetCard.from_template(
        card_data,
        template_path=template("dataset_card.md"),
        title=f"Synthetic BloodMNIST: {repo_id.split('/')[-1]}",
        repo_id=repo_id,
        num_images=len(dataset),
        resolution=dataset[0]["image"].size[0],
        model=info["model"],
        class_counts=[{"index": i, "name": n, "count": int(c)} for i, (n, c) in enumerate(zip(names, counts))],
        info=json.dumps(info, indent=2),
    )
