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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bloodgen_hf.data import CLASS_NAMES, NUM_CLASSES, BloodMNIST, load_arrays
from bloodgen_hf.evaluation.bloodnet import predict
from bloodgen_hf.evaluation.metrics import classification_report
from bloodgen_hf.evaluation.protocol import summarize
from bloodgen_hf.evaluation.report import mean_std, write_json, write_markdown_report
from bloodgen_hf.evaluation.runner import image_size
from bloodgen_hf.io import atomic_path
from bloodgen_hf.sampling import generate

SETTINGS = ("real", "real+synthetic", "synthetic")
POOL_SEED = 7_000_000  # generation seeds of the pool start here, away from evaluate's


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


def stratified_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of round(fraction x count) random images of every class (at least one each)."""
    picked = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        if len(members):
            picked.append(rng.choice(members, max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(picked))


def synthetic_counts(real_counts: np.ndarray, setting: str, config: StudyConfig) -> np.ndarray:
    """How many synthetic images of each class a run of this setting gets."""
    if setting == "real":
        return np.zeros(NUM_CLASSES, np.int64)
    if setting == "real+synthetic":
        if config.balance:
            return real_counts.max() - real_counts
        return np.round(config.synthetic_ratio * real_counts).astype(np.int64)
    if config.balance:  # synthetic only, balanced: |R_f| images spread evenly
        total = int(real_counts.sum())
        return total // NUM_CLASSES + (np.arange(NUM_CLASSES) < total % NUM_CLASSES)
    return real_counts.copy()


def make_pool(pipe, counts: np.ndarray, sampling_kwargs: dict, batch_size: int, log=print) -> dict[str, np.ndarray]:
    """counts[c] generated images of class c, image i with seed POOL_SEED + i."""
    labels = np.repeat(np.arange(NUM_CLASSES), counts)
    log(f"generating a synthetic pool of {len(labels)} images ({', '.join(map(str, counts))} per class)")
    batches = list(generate(pipe, labels, seed=POOL_SEED, batch_size=batch_size, **sampling_kwargs))
    return {"images": np.concatenate([b[0] for b in batches]), "labels": labels}


def record_study(path: Path, study: dict, resume: bool) -> None:
    """Write study.json, or on resume check that the study in `path` was started with the same settings."""
    if resume and path.exists():
        before = json.loads(path.read_text())
        now = json.loads(json.dumps(study, default=str))
        changed = sorted(
            k for k in {**before["config"], **now["config"]} if before["config"].get(k) != now["config"].get(k)
        )
        changed += [k for k in ("model", "sampling") if before.get(k) != now.get(k)]
        if changed:
            raise ValueError(
                f"--resume: {path} was started with other settings ({', '.join(changed)}); "
                "pass the same options, or a new --out"
            )
        return
    write_json(study, path)


def load_or_make_pool(path: Path, pipe, counts: np.ndarray, sampling_kwargs: dict, config: StudyConfig, resume, log):
    """The saved pool when resuming (it must hold `counts` images per class), else a freshly generated one."""
    if not counts.any():
        return None
    if resume and path.exists():
        with np.load(path) as saved:
            pool = {"images": saved["images"], "labels": saved["labels"]}
        if not np.array_equal(np.bincount(pool["labels"], minlength=NUM_CLASSES), counts):
            raise ValueError(f"--resume: {path} does not hold the pool this study needs; delete it to regenerate")
        log(f"reusing the synthetic pool in {path} ({len(pool['labels'])} images)")
        return pool
    pool = make_pool(pipe, counts, sampling_kwargs, config.batch_size, log)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **pool)
    return pool


def draw_synthetic(pool: dict, counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    index = np.concatenate(
        [rng.choice(np.flatnonzero(pool["labels"] == c), counts[c], replace=False) for c in range(NUM_CLASSES)]
    )
    return pool["images"][index], pool["labels"][index]


def train_classifier(images, labels, holdout, config: StudyConfig, seed: int, folder: Path):
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
    task = BloodNetTask.create(train_config, len(labels), holdout)
    train(task, train_config, accelerator, BloodMNIST(images, labels, flip=True))
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
):
    """Train every (setting, fraction, seed) classifier; write results.json, report.md and plots to `out`."""
    config.check()
    sampling_kwargs = sampling_kwargs or {}
    size = image_size(pipe, sampling_kwargs)
    train_images, train_labels = load_arrays("train", size, data_dir)
    holdout = load_arrays("val", size, data_dir)
    test_images, test_labels = load_arrays("test", size, data_dir)

    plans = {}  # (seed, fraction) -> real subset
    needed = np.zeros(NUM_CLASSES, np.int64)
    for seed in config.seeds:
        for fraction in config.fractions:
            subset = stratified_subset(train_labels, fraction, np.random.default_rng([seed, round(fraction * 1e6)]))
            plans[seed, fraction] = subset
            real_counts = np.bincount(train_labels[subset], minlength=NUM_CLASSES)
            for setting in config.settings:
                needed = np.maximum(needed, synthetic_counts(real_counts, setting, config))
    out.mkdir(parents=True, exist_ok=True)
    record_study(out / "study.json", {"model": model, "config": asdict(config), "sampling": sampling_kwargs}, resume)
    pool = load_or_make_pool(out / "synthetic_pool.npz", pipe, needed, sampling_kwargs, config, resume, log)

    runs = []
    for (seed, fraction), subset in plans.items():
        real_counts = np.bincount(train_labels[subset], minlength=NUM_CLASSES)
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
            classifier = train_classifier(images, labels, holdout, config, seed, out / "runs" / name)
            predicted = predict(classifier, test_images, with_features=False)[1].argmax(axis=1)
            report = classification_report(test_labels, predicted, NUM_CLASSES)
            log(f"   test accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}")
            run = {"setting": setting, "fraction": fraction, "seed": seed, "num_real": int(real_counts.sum())}
            runs.append({**run, "num_synthetic": int(counts.sum()), **report})
            write_json(runs[-1], done)
    results = {
        "model": model,
        "config": asdict(config),
        "class_names": list(CLASS_NAMES),
        "summary": summarize_study(runs),
        "runs": runs,
    }
    write_json(results, out / "results.json")
    write_study_report(results, out, html)
    return results


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
    lines.append("| setting | fraction | " + " | ".join(CLASS_NAMES) + " |")
    lines.append("|---" * (NUM_CLASSES + 2) + "|")
    for e in summary:
        lines.append(
            f"| {e['setting']} | {e['fraction']:g} | " + " | ".join(f"{v:.3f}" for v in e["f1"]["mean"]) + " |"
        )
    lines += ["", "![accuracy](accuracy.png)", "", "![confusion matrices](confusion.png)"]
    plot_study(summary, settings, fractions, out)
    write_markdown_report(lines, out, html)


def plot_study(summary: list[dict], settings: list[str], fractions: list[float], out: Path) -> None:
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
            short = [name[:4] for name in CLASS_NAMES]
            ax.set_xticks(range(NUM_CLASSES), short if i == len(settings) - 1 else [], rotation=90, fontsize=6)
            ax.set_yticks(range(NUM_CLASSES), short if j == 0 else [], fontsize=6)
            if (s, f) not in cell:
                continue
            confusion = np.asarray(cell[s, f]["confusion"])  # rows: true class, columns: predicted
            ax.imshow(confusion / np.maximum(confusion.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"{s}, {f:.0%}", fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "confusion.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
