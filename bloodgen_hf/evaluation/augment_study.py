"""`bloodgen-hf augment-study`: does synthetic data help a classifier, and at what real-data size?

For each seed and real-data fraction f (a class-stratified random subset R_f of the train split), a
small BloodNet is trained on
  real            R_f
  real+synthetic  R_f plus synthetic images: `synthetic_ratio` x |R_f| in R_f's class proportions,
                  or with `balance`, per class just enough to top every class up to the largest one
  synthetic       as many synthetic images as R_f has (R_f's proportions, or equal per class with `balance`)
and scored on the real test split (accuracy, macro-F1, class-wise precision/recall/F1, confusion).
Every run is the same number of optimizer steps, so small and large training sets get equal compute.
Synthetic images come from one pool per class, generated once (seeded) and saved as synthetic_pool.npz;
each run draws its own random subset of it. Every finished classifier leaves runs/<name>/result.json,
so a stopped study continues with `resume` (same model and config, checked against study.json):
finished runs and the pool are kept, and only the missing classifiers are trained.

The classifiers are trained by the shared training loop (core.train with BloodNetTask), so each run
folder holds its metrics.jsonl, last checkpoint and saved model.

The study refuses a generator whose recorded training data (its provenance) includes the test split it
scores on, or that records none (bloodgen_hf/provenance.py). With a `GeneratorPlan`
(`--generator-per-fraction FAMILY`), there is no shared generator: for every (seed, fraction) a generator
is trained by the family's train script on exactly that R_f (`--split train --subset-fraction f
--subset-seed seed`), into generators/<f>-seed<seed>/, checked by the indices its provenance records, and
draws its own pool (pools/<f>-seed<seed>.npz). `resume` keeps finished generators and continues one that
was stopped from its last checkpoint. Their training budgets go in the report.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bloodgen_hf.data import CLASS_NAMES, DEFAULT_DATASET, BloodMNIST, describe_classes, load_data, same_classes
from bloodgen_hf.evaluation.bloodnet import predict
from bloodgen_hf.evaluation.metrics import classification_report
from bloodgen_hf.evaluation.protocol import summarize
from bloodgen_hf.evaluation.report import mean_std, write_json, write_markdown_report
from bloodgen_hf.evaluation.runner import image_size
from bloodgen_hf.guard import check_unchanged
from bloodgen_hf.io import atomic_path
from bloodgen_hf.provenance import (
    check_unseen,
    describe_provenance,
    indices_fingerprint,
    pipeline_provenance,
    real_subset,
)
from bloodgen_hf.sampling import generate, pipeline_class_names, sampling_record

SETTINGS = ("real", "real+synthetic", "synthetic")
POOL_SEED = 7_000_000  # generation seeds of the pool start here, away from evaluate's
EVAL_SPLIT = "test"  # what every classifier is scored on, so what no generator may have seen
FAMILIES = ("gan", "ddpm", "vae")
# Train-script flags the study sets for a per-fraction generator: its data (R_f), budget and folder.
STUDY_FLAGS = (
    "--output-dir",
    "--dataset",
    "--data-dir",
    "--resolution",
    "--split",
    "--subset-fraction",
    "--subset-seed",
    "--max-steps",
    "--resume",
    "--overwrite",
    "--init-from",
)


@dataclass
class StudyConfig:
    fractions: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    settings: tuple[str, ...] = SETTINGS
    synthetic_ratio: float = 1.0
    balance: bool = False
    steps: int = 300
    batch_size: int = 128
    channels: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 1
    lr: float = 3e-3

    def check(self) -> None:
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"--fractions must be in (0, 1] (e.g. 0.01,0.1,0.5,1), got {self.fractions}")
        unknown = set(self.settings) - set(SETTINGS)
        if unknown or not self.settings:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}; choose from: {', '.join(SETTINGS)}")
        if not self.seeds or self.steps < 1 or self.batch_size < 1 or self.synthetic_ratio < 0:
            raise ValueError("--seeds, a positive --steps and --batch-size, and --synthetic-ratio >= 0 are needed")


@dataclass(frozen=True)
class GeneratorPlan:
    """--generator-per-fraction: per (seed, fraction), a generator of `family` trained by its train script on
    exactly the classifier's R_f for `steps` optimizer steps; `options` go to the train script too."""

    family: str
    steps: int
    options: str = ""
    resolution: int = 28

    def check(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"--generator-per-fraction must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.steps < 1:
            raise ValueError(f"--generator-steps must be at least 1, got {self.steps}")
        for word in self.words():
            flag = word.split("=", 1)[0]
            if flag in STUDY_FLAGS:
                raise ValueError(
                    f"--generator-options may not set {flag}: the study sets it (each generator trains on R_f of "
                    "--split train, for --generator-steps steps)"
                )

    def words(self) -> list[str]:
        try:
            return shlex.split(self.options)
        except ValueError as err:
            raise ValueError(f"--generator-options {self.options!r}: {err}") from None

    def argv(self, folder: Path, fraction: float, seed: int, dataset: str, data_dir, resume: bool) -> list[str]:
        """The train script's arguments: defaults the options may change, the options, then what the study fixes
        (last, so they win)."""
        defaults = ["--seed", str(seed), "--epochs", str(10**6), "--sample-every", str(self.steps)]
        fixed = ["--output-dir", str(folder), "--dataset", str(dataset), "--resolution", str(self.resolution)]
        fixed += ["--split", "train", "--subset-fraction", repr(float(fraction)), "--subset-seed", str(seed)]
        fixed += ["--max-steps", str(self.steps), *(["--data-dir", str(data_dir)] if data_dir is not None else [])]
        fixed += ["--resume", "latest"] if resume else ["--overwrite"]
        return [*defaults, "--log-with", "none", *self.words(), *fixed]


def synthetic_counts(real_counts: np.ndarray, setting: str, config: StudyConfig) -> np.ndarray:
    """How many synthetic images of each class a run of this setting gets."""
    num_classes = len(real_counts)
    if setting == "real":
        return np.zeros(num_classes, np.int64)
    if setting == "real+synthetic":
        if config.balance:
            return real_counts.max() - real_counts
        return np.round(config.synthetic_ratio * real_counts).astype(np.int64)
    if config.balance:  # synthetic only, balanced: |R_f| images spread evenly
        total = int(real_counts.sum())
        return total // num_classes + (np.arange(num_classes) < total % num_classes)
    return real_counts.copy()


def make_pool(pipe, counts: np.ndarray, sampling_kwargs: dict, batch_size: int, log=print) -> dict[str, np.ndarray]:
    """counts[c] generated images of class c, image i with seed POOL_SEED + i."""
    labels = np.repeat(np.arange(len(counts)), counts)
    log(f"generating a synthetic pool of {len(labels)} images ({', '.join(map(str, counts))} per class)")
    batches = list(generate(pipe, labels, seed=POOL_SEED, batch_size=batch_size, **sampling_kwargs))
    return {"images": np.concatenate([b[0] for b in batches]), "labels": labels}


def record_study(path: Path, study: dict, resume: bool) -> None:
    """Write study.json, or on resume check that the study in `path` was started with the same settings."""
    if resume and path.exists():
        before = json.loads(path.read_text())
        check_unchanged(
            flat_study(before), flat_study(study), f"--resume: {path}", "pass the same options, or a new --out"
        )
        return
    write_json(study, path)


def flat_study(study: dict) -> dict:
    """study.json's config keys beside its model, sampling options, dataset and per-fraction generator plan
    (None for studies of one model, and for those from before plans existed), for one comparison."""
    dataset = study.get("dataset", DEFAULT_DATASET)  # studies from before --dataset were all BloodMNIST
    flat = {**study["config"], "model": study.get("model"), "sampling": study.get("sampling"), "dataset": dataset}
    return {**flat, "generators": study.get("generators")}


def load_or_make_pool(path: Path, pipe, counts: np.ndarray, sampling_kwargs: dict, config: StudyConfig, resume, log):
    """The saved pool when resuming (it must hold `counts` images per class), else a freshly generated one."""
    if not counts.any():
        return None
    if resume and path.exists():
        with np.load(path) as saved:
            pool = {"images": saved["images"], "labels": saved["labels"]}
        if not np.array_equal(np.bincount(pool["labels"], minlength=len(counts)), counts):
            raise ValueError(f"--resume: {path} does not hold the pool this study needs; delete it to regenerate")
        log(f"reusing the synthetic pool in {path} ({len(pool['labels'])} images)")
        return pool
    pool = make_pool(pipe, counts, sampling_kwargs, config.batch_size, log)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **pool)
    return pool


def draw_synthetic(pool: dict, counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    index = np.concatenate(
        [rng.choice(np.flatnonzero(pool["labels"] == c), counts[c], replace=False) for c in range(len(counts))]
    )
    return pool["images"][index], pool["labels"][index]


def train_classifier(
    images, labels, holdout, config: StudyConfig, seed: int, folder: Path, class_names: tuple[str, ...] = CLASS_NAMES
):
    """One small BloodNet through the shared loop: fixed steps, flips + transposes, no trackers."""
    from accelerate.utils import set_seed

    from bloodgen_hf.evaluation.bloodnet_train import BloodNetTask
    from bloodgen_hf.training.core import TrainConfig, make_accelerator, train

    train_config = TrainConfig(
        output_dir=str(folder),
        resolution=images.shape[1],
        split="train",
        batch_size=min(config.batch_size, len(labels)),
        epochs=10**6,
        max_steps=config.steps,
        seed=seed,
        checkpoint_every=config.steps,
        keep_checkpoints=1,
        overwrite=True,  # a classifier that did not finish (no result.json) starts again
        sample_every=config.steps,
        log_every=max(1, config.steps // 10),
        log_with="none",
        extra={
            "channels": list(config.channels),
            "blocks_per_stage": config.blocks_per_stage,
            "dropout": 0.1,
            "lr": config.lr,
            "weight_decay": 5e-4,
            "label_smoothing": 0.05,
            "warmup_fraction": 0.05,
        },
    )
    accelerator = make_accelerator(train_config)
    set_seed(seed)
    task = BloodNetTask.create(train_config, len(labels), holdout, class_names)
    train(task, train_config, accelerator, BloodMNIST(images, labels, flip=True, class_names=class_names))
    return accelerator.unwrap_model(task.models["classifier"]).eval()


def run_study(
    pipe,
    out: Path,
    config: StudyConfig,
    data_dir=None,
    sampling_kwargs: dict | None = None,
    log=print,
    model: str = "",
    resume: bool = False,
    html: bool = False,
    dataset: str = DEFAULT_DATASET,
    generator: GeneratorPlan | None = None,
    device: str = "cpu",
):
    """Train every (setting, fraction, seed) classifier; write results.json, report.md and plots to `out`.

    The synthetic images come from `pipe`, or with `generator` (and `pipe` None) from one generator per
    (seed, fraction) trained on that R_f. A generator that may have seen the test split is refused first.
    """
    config.check()
    if (pipe is None) == (generator is None):
        raise ValueError("the study needs one generator: a model, or --generator-per-fraction FAMILY (not both)")
    sampling_kwargs = sampling_kwargs or {}
    if generator is not None:
        generator.check()
        size = generator.resolution
    else:
        check_unseen(pipeline_provenance(pipe), model or "the model", EVAL_SPLIT, dataset, "augment-study")
        size = image_size(pipe, sampling_kwargs)
        sampling_kwargs = sampling_record(pipe, sampling_kwargs)  # the precision it will sample at, recorded
    train_images, train_labels, names, _ = load_data(dataset, "train", size, data_dir)
    holdout = load_data(dataset, "val", size, data_dir)[:2]
    test_images, test_labels = load_data(dataset, EVAL_SPLIT, size, data_dir)[:2]
    if pipe is not None:
        check_generator_classes(pipe, model or "the model", names, dataset)
    num_classes = len(names)

    plans, needs = plan_subsets(train_labels, num_classes, config)
    out.mkdir(parents=True, exist_ok=True)
    study = {"model": model, "config": asdict(config), "sampling": sampling_kwargs, "dataset": dataset}
    study["generators"] = asdict(generator) if generator else None
    record_study(out / "study.json", study, resume)
    generators = []
    if generator is None:
        needed = np.max(list(needs.values()), axis=0)
        pool = load_or_make_pool(out / "synthetic_pool.npz", pipe, needed, sampling_kwargs, config, resume, log)
        pools = dict.fromkeys(plans, pool)
    else:
        context = {"dataset": dataset, "data_dir": data_dir, "device": device, "names": names}
        pools, generators = per_fraction_pools(
            generator, plans, needs, out, context, sampling_kwargs, config, resume, log
        )

    runs = []
    for (seed, fraction), subset in plans.items():
        pool = pools[seed, fraction]
        real_counts = np.bincount(train_labels[subset], minlength=num_classes)
        for setting in config.settings:
            rng = np.random.default_rng([seed, round(fraction * 1e6), SETTINGS.index(setting)])
            parts_x, parts_y = [], []
            if setting != "synthetic":
                parts_x.append(train_images[subset])
                parts_y.append(train_labels[subset])
            counts = synthetic_counts(real_counts, setting, config)
            if counts.any():
                x, y = draw_synthetic(pool, counts, rng)
                parts_x.append(x)
                parts_y.append(y)
            images, labels = np.concatenate(parts_x), np.concatenate(parts_y)
            name = f"{setting}-{fraction:g}-seed{seed}"
            done = out / "runs" / name / "result.json"
            if resume and done.exists():
                runs.append(json.loads(done.read_text()))
                log(f"== {name}: finished earlier, test accuracy {runs[-1]['accuracy']:.4f}")
                continue
            log(f"== {name}: {int(real_counts.sum()) * (setting != 'synthetic')} real + {int(counts.sum())} synthetic")
            classifier = train_classifier(images, labels, holdout, config, seed, out / "runs" / name, names)
            predicted = predict(classifier, test_images, with_features=False)[1].argmax(axis=1)
            report = classification_report(test_labels, predicted, num_classes)
            log(f"   test accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}")
            run = {"setting": setting, "fraction": fraction, "seed": seed, "num_real": int(real_counts.sum())}
            runs.append({**run, "num_synthetic": int(counts.sum()), **report})
            write_json(runs[-1], done)
    results = {
        "model": model,
        "config": asdict(config),
        "class_names": list(names),
        "provenance": None if pipe is None else pipeline_provenance(pipe),
        "generators": generators,
        "summary": summarize_study(runs),
        "runs": runs,
    }
    write_json(results, out / "results.json")
    write_study_report(results, out, html)
    return results


def check_generator_classes(pipe, model: str, names: tuple[str, ...], dataset: str) -> None:
    if not same_classes(pipeline_class_names(pipe), names):
        ours = describe_classes(pipeline_class_names(pipe))
        raise ValueError(f"{model} generates {ours}, but --dataset {dataset} has {describe_classes(names)}")


def plan_subsets(train_labels: np.ndarray, num_classes: int, config: StudyConfig) -> tuple[dict, dict]:
    """(seed, fraction) -> R_f (indices into the train split), and -> the synthetic images per class its
    settings need at most (the pool that serves it must hold that many)."""
    plans, needs = {}, {}
    for seed in config.seeds:
        for fraction in config.fractions:
            subset = plans[seed, fraction] = real_subset(train_labels, fraction, seed)
            real_counts = np.bincount(train_labels[subset], minlength=num_classes)
            needed = np.zeros(num_classes, np.int64)
            for setting in config.settings:
                needed = np.maximum(needed, synthetic_counts(real_counts, setting, config))
            needs[seed, fraction] = needed
    return plans, needs


def per_fraction_pools(
    plan: GeneratorPlan, plans: dict, needs: dict, out: Path, context: dict, sampling_kwargs: dict, config, resume, log
) -> tuple[dict, list[dict]]:
    """For every (seed, fraction) that needs synthetic images: a generator trained on exactly its R_f, and its
    pool; plus one record per generator (data, budget, command) for the report."""
    from bloodgen_hf.hub import load_pipeline

    pools, records = {}, []
    for (seed, fraction), subset in plans.items():
        pools[seed, fraction] = None
        if not needs[seed, fraction].any():
            continue
        name = f"{fraction:g}-seed{seed}"
        folder = train_generator(plan, out / "generators" / name, fraction, seed, context, resume, log)
        pipe = load_pipeline(str(folder), context["device"])
        label = f"the {plan.family} generator for {name} ({folder})"
        provenance = check_trained_on_subset(pipe, label, subset, context["dataset"])
        check_generator_classes(pipe, label, context["names"], context["dataset"])
        path = out / "pools" / f"{name}.npz"
        pools[seed, fraction] = load_or_make_pool(
            path, pipe, needs[seed, fraction], sampling_kwargs, config, resume, log
        )
        records.append({"fraction": fraction, "seed": seed, **generator_record(plan, folder, provenance)})
        del pipe
    return pools, records


def train_generator(
    plan: GeneratorPlan, folder: Path, fraction: float, seed: int, context: dict, resume: bool, log
) -> Path:
    """The family's normal train entry point on R_f; on resume a finished generator is kept and a stopped
    one continues from its last checkpoint. Returns the saved pipeline folder."""
    from accelerate.state import AcceleratorState

    from bloodgen_hf.training import TRAIN_ENTRY_POINTS
    from bloodgen_hf.training.core import checkpoint_steps

    pipeline = folder / "pipeline"
    if resume and (pipeline / "model_index.json").is_file():
        log(f"== generator {folder.name}: finished earlier ({pipeline})")
        return pipeline
    again = resume and bool(checkpoint_steps(folder))
    how = ", continuing its last checkpoint" if again else ""
    log(f"== generator {folder.name}: {plan.family} on R_f ({fraction:g}, seed {seed}), {plan.steps} steps{how}")
    argv = plan.argv(folder, fraction, seed, context["dataset"], context["data_dir"], again)
    with command_line(["bloodgen-hf", "train", plan.family, *argv]):
        TRAIN_ENTRY_POINTS[plan.family](argv)
    # The classifiers' Accelerator may differ from the generator's (e.g. its --mixed-precision), which the
    # process-wide Accelerate state would refuse: start them from a fresh one.
    AcceleratorState._reset_state(True)
    return pipeline


@contextlib.contextmanager
def command_line(words: list[str]):
    """The training loop records sys.argv as the run's command (train_config.json, model card): while the
    study trains a generator, that is the equivalent `bloodgen-hf train` command, not the study's."""
    saved = sys.argv
    sys.argv = words
    try:
        yield
    finally:
        sys.argv = saved


def check_trained_on_subset(pipe, label: str, subset: np.ndarray, dataset: str) -> dict:
    """A per-fraction generator's provenance must say: R_f of the train split exactly (the same count and
    indices hash as the classifier's), no other starting weights, no test images."""
    provenance = pipeline_provenance(pipe)
    check_unseen(provenance, label, EVAL_SPLIT, dataset, "augment-study")
    recorded = provenance.get("subset") or {}
    fingerprint = indices_fingerprint(subset)
    exact = recorded.get("size") == len(subset) and recorded.get("indices_sha256") == fingerprint
    if provenance.get("split") != "train" or provenance.get("init_from") or not exact:
        raise ValueError(
            f"{label} was trained on {describe_provenance(provenance)}, not on exactly the classifier's "
            f"{len(subset)} train images (indices sha256 {fingerprint[:12]}); delete its folder to train it again"
        )
    return provenance


def generator_record(plan: GeneratorPlan, pipeline: Path, provenance: dict) -> dict:
    """How a per-fraction generator was trained: its data, optimizer steps, CPU time and command."""
    from bloodgen_hf.model_card import find_train_config

    config = find_train_config(pipeline) or {}
    metrics = pipeline.parent / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    return {
        "family": plan.family,
        "folder": str(pipeline),
        "num_images": provenance["num_images"],
        "steps": last.get("step", config.get("max_steps")),
        "cpu_minutes": last.get("cpu_minutes"),
        "options": plan.options,
        "command": config.get("command"),
        "provenance": provenance,
    }


def summarize_study(runs: list[dict]) -> list[dict]:
    """Per (setting, fraction): mean ± std of accuracy, macro-F1 and class-wise P/R/F1, mean confusion."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["setting"], run["fraction"]), []).append(run)
    summary = []
    for (setting, fraction), members in groups.items():
        entry = {"setting": setting, "fraction": fraction, "seeds": [m["seed"] for m in members]}
        entry["num_real"], entry["num_synthetic"] = members[0]["num_real"], members[0]["num_synthetic"]
        for key in ("accuracy", "macro_f1"):
            entry[key] = summarize([m[key] for m in members])
        for key in ("precision", "recall", "f1"):
            values = np.asarray([m[key] for m in members])
            entry[key] = {
                "mean": values.mean(0).tolist(),
                "std": values.std(0, ddof=1 if len(members) > 1 else 0).tolist(),
            }
        entry["confusion"] = np.mean([m["confusion"] for m in members], axis=0).tolist()
        summary.append(entry)
    return summary


def write_study_report(results: dict, out: Path, html: bool = False) -> None:
    summary, config = results["summary"], results["config"]
    fractions = sorted({e["fraction"] for e in summary})
    settings = [s for s in SETTINGS if any(e["setting"] == s for e in summary)]
    cell = {(e["setting"], e["fraction"]): e for e in summary}
    balance = ", synthetic classes balanced" if config["balance"] else ""
    lines = [
        "# Augmentation study",
        "",
        f"Small BloodNet ({config['channels']}, {config['steps']} steps) trained per setting, real-data fraction "
        f"and seed ({len(config['seeds'])} seeds{balance}); scored on the real test split. Mean ± std over seeds.",
    ]
    if results.get("model"):
        lines[-1] += f" Synthetic images from `{results['model']}`."
    if results.get("provenance"):
        lines[-1] += f" It was trained on {describe_provenance(results['provenance'])}."
    lines += generator_lines(results.get("generators") or [])
    for key in ("accuracy", "macro_f1"):
        lines += ["", f"## {key}", "", "| setting | " + " | ".join(f"{f:.0%} real" for f in fractions) + " |"]
        lines.append("|---" * (len(fractions) + 1) + "|")
        for s in settings:
            lines.append(
                f"| {s} | "
                + " | ".join(mean_std(cell[s, f][key], 3) if (s, f) in cell else "–" for f in fractions)
                + " |"
            )
    lines += ["", "## Class-wise F1 (mean over seeds)", ""]
    class_names = results.get("class_names") or list(CLASS_NAMES)
    lines.append("| setting | fraction | " + " | ".join(class_names) + " |")
    lines.append("|---" * (len(class_names) + 2) + "|")
    for e in summary:
        lines.append(
            f"| {e['setting']} | {e['fraction']:g} | " + " | ".join(f"{v:.3f}" for v in e["f1"]["mean"]) + " |"
        )
    lines += ["", "![accuracy](accuracy.png)", "", "![confusion matrices](confusion.png)"]
    plot_study(summary, settings, fractions, out, class_names)
    write_markdown_report(lines, out, html)


def generator_lines(generators: list[dict]) -> list[str]:
    """The report's table of per-fraction generators: the real images each saw, and its training budget."""
    if not generators:
        return []
    lines = ["", "## Generators", "", "One generator per real subset R_f, trained only on it (its provenance records"]
    lines[-1] += " the indices' count and sha256, checked against the classifier's subset)."
    lines += ["", "| fraction | seed | real images | steps | CPU minutes | command |", "|---|---|---|---|---|---|"]
    for g in generators:
        cpu = f"{g['cpu_minutes']:.1f}" if g.get("cpu_minutes") is not None else "–"
        lines.append(
            f"| {g['fraction']:g} | {g['seed']} | {g['num_images']:,} | {g['steps']} | {cpu} | `{g['command']}` |"
        )
    return lines


def plot_study(
    summary: list[dict], settings: list[str], fractions: list[float], out: Path, class_names=CLASS_NAMES
) -> None:
    """accuracy.png (accuracy and macro-F1 against real fraction, error bars) and confusion.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(e["setting"], e["fraction"]): e for e in summary}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key in zip(axes, ("accuracy", "macro_f1")):
        for s in settings:
            xs = [f for f in fractions if (s, f) in cell]
            ax.errorbar(
                xs,
                [cell[s, f][key]["mean"] for f in xs],
                yerr=[cell[s, f][key]["std"] for f in xs],
                marker="o",
                capsize=3,
                label=s,
            )
        ax.set_xscale("log")
        ax.set_xlabel("fraction of the real train split")
        ax.set_title(key)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "accuracy.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(
        len(settings), len(fractions), figsize=(2.6 * len(fractions), 2.6 * len(settings)), squeeze=False
    )
    for i, s in enumerate(settings):
        for j, f in enumerate(fractions):
            ax = axes[i, j]
            short = [name[:4] for name in class_names]
            ax.set_xticks(range(len(short)), short if i == len(settings) - 1 else [], rotation=90, fontsize=6)
            ax.set_yticks(range(len(short)), short if j == 0 else [], fontsize=6)
            if (s, f) not in cell:
                continue
            confusion = np.asarray(cell[s, f]["confusion"])  # rows: true class, columns: predicted
            ax.imshow(confusion / np.maximum(confusion.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"{s}, {f:.0%}", fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "confusion.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
