"""TSTR (train on synthetic, test on real) for `bloodgen-hf compare --tstr N`.

For every model, a classifier is trained on N of its synthetic images, and one on N real train images
with the same count per class; both are augment-study's small BloodNet with its steps (`train_classifier`),
and both are scored on the real test split. The report gives accuracy and macro-F1 of each and their
ratio, synthetic / real: 1 means the synthetic images teach the classifier as much as real ones.

A model whose recorded training data may include the test split (or records none) gets no TSTR score: its
synthetic images could carry the test images (bloodgen_hf/provenance.py). It is listed in the report with
the reason, so `compare --models gan vae ddpm --tstr N` still scores the models that qualify; with none
that qualifies, `--tstr` is refused before anything is written.

<out>/tstr/real-<size>/ and <out>/tstr/<model>/ hold each classifier's run and result.json (reused by
`--reuse` when made with the same settings); <out>/tstr.json holds every model's result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bloodgen_hf.data import DEFAULT_DATASET, load_data
from bloodgen_hf.errors import UsageError
from bloodgen_hf.evaluation.augment_study import EVAL_SPLIT, StudyConfig, make_pool, train_classifier
from bloodgen_hf.evaluation.bloodnet import predict
from bloodgen_hf.evaluation.metrics import classification_report
from bloodgen_hf.evaluation.report import write_json
from bloodgen_hf.guard import plain
from bloodgen_hf.provenance import LeakError, check_unseen, pipeline_provenance
from bloodgen_hf.sampling import recorded_sampling, sampling_record

METRICS = ("accuracy", "macro_f1")


@dataclass(frozen=True)
class TSTRConfig:
    n: int
    seed: int = 0
    steps: int = StudyConfig.steps  # augment-study's classifier budget

    def check(self) -> None:
        if self.n < 1 or self.steps < 1:
            raise UsageError(f"--tstr and --tstr-steps must be positive, got {self.n} and {self.steps}")


def split_models(pipes: dict, dataset: str) -> tuple[dict, dict[str, str]]:
    """(the models TSTR may score, label -> why each other model may not); refused (LeakError) when no model
    may be scored, before anything is written."""
    allowed, refused = {}, {}
    for label, pipe in pipes.items():
        try:
            check_unseen(pipeline_provenance(pipe), label, EVAL_SPLIT, dataset, "TSTR")
            allowed[label] = pipe
        except LeakError as err:
            refused[label] = str(err)
    if not allowed:
        raise LeakError(next(iter(refused.values())))
    return allowed, refused


def real_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """N random indices of the train split (its class proportions, up to chance), fixed by (seed, n)."""
    if n > len(labels):
        raise UsageError(f"--tstr {n} asks for more real images than the train split's {len(labels)}")
    return np.sort(np.random.default_rng([seed, n]).choice(len(labels), n, replace=False))


def run_tstr(
    pipes: dict,
    out: Path,
    config: TSTRConfig,
    data_dir=None,
    dataset: str = DEFAULT_DATASET,
    sampling_kwargs: dict | None = None,
    reuse: bool = False,
    log=print,
) -> dict[str, dict]:
    """label -> {"synthetic": {...}, "real": {...}, "ratio": {...}} (accuracy and macro-F1), or {"refused": why}
    for a model that may have seen the test split; writes tstr.json."""
    config.check()
    pipes, refused = split_models(pipes, dataset)
    sampling_kwargs = sampling_kwargs or {}
    study = StudyConfig(protocol="fixed-steps", classifier="bloodnet-small", steps=config.steps)
    splits, results = {}, {}
    for label, pipe in pipes.items():
        size = pipe.resolution
        if size not in splits:
            splits[size] = {name: load_data(dataset, name, size, data_dir) for name in ("train", "val", EVAL_SPLIT)}
        data = splits[size]
        train = data["train"]
        index = real_sample(train.labels, config.n, config.seed)
        counts = np.bincount(train.labels[index], minlength=len(train.class_names))
        settings = {**asdict(config), "size": size, "dataset": dataset, "class_counts": counts.tolist()}

        def real_images(index=index, train=train):
            return train.images[index], train.labels[index]

        def synthetic_images(pipe=pipe, counts=counts):
            pool = make_pool(pipe, counts, sampling_kwargs, study.batch_size, log)
            return pool["images"], pool["labels"]

        real = scored(out / "tstr" / f"real-{size}", real_images, data, study, config.seed, settings, reuse, log)
        sampling = sampling_record(pipe, sampling_kwargs)  # with the precision: fp32 pools do not stand in for bf16
        settings = {**settings, "sampling": sampling, "provenance": pipeline_provenance(pipe)}
        synthetic = scored(out / "tstr" / label, synthetic_images, data, study, config.seed, settings, reuse, log)
        results[label] = {**settings, "synthetic": synthetic, "real": real, "ratio": ratios(synthetic, real)}
        ratio = results[label]["ratio"]["accuracy"]
        log(f"== {label}: TSTR accuracy {synthetic['accuracy']:.4f} vs {real['accuracy']:.4f} real (ratio {ratio})")
    for label, why in refused.items():
        log(f"== {label}: no TSTR score: {why}")
        results[label] = {"refused": why}
    write_json(results, out / "tstr.json")
    return results


def scored(folder: Path, make_data, data: dict, study: StudyConfig, seed: int, settings: dict, reuse, log) -> dict:
    """Accuracy and macro-F1 on the real test split of a classifier trained on `make_data()`; an earlier
    result in `folder` made with the same settings is reused when asked."""
    done = folder / "result.json"
    if reuse and done.is_file():
        saved = json.loads(done.read_text())
        if recorded_sampling(saved.get("settings") or {}) == plain(settings):
            log(f"== TSTR {folder.name}: reusing {done}")
            return saved["scores"]
    images, labels = make_data()
    log(f"== TSTR {folder.name}: training a classifier on {len(labels)} images")
    train = data["train"]
    holdout = (data["val"].images, data["val"].labels)
    classifier = train_classifier(images, labels, holdout, study, seed, folder, train.class_names)[0]
    test = data[EVAL_SPLIT]
    predicted = predict(classifier, test.images, with_features=False)[1].argmax(axis=1)
    report = classification_report(test.labels, predicted, len(train.class_names))
    scores = {key: report[key] for key in METRICS}
    write_json({"settings": plain(settings), "scores": scores, "report": report}, done)
    return scores


def ratios(synthetic: dict, real: dict) -> dict:
    """synthetic / real per metric (None where the real classifier scored 0)."""
    return {key: synthetic[key] / real[key] if real[key] else None for key in METRICS}


def tstr_lines(results: dict) -> list[str]:
    """The compare report's TSTR section: a row per scored model, then why the others have none."""
    scored_models = {label: r for label, r in results.items() if "refused" not in r}
    if not scored_models:
        return []
    first = next(iter(scored_models.values()))
    lines = ["", "## TSTR: train on synthetic, test on real", ""]
    lines.append(
        f"augment-study's small BloodNet ({first['steps']} steps, seed {first['seed']}) trained on {first['n']} "
        "synthetic images of each model, against one trained on as many real train images with the same count "
        "per class; both scored on the real test split. Ratio = synthetic / real."
    )
    lines += ["", "| model | accuracy synthetic | accuracy real | ratio | macro-F1 synthetic | macro-F1 real | ratio |"]
    lines.append("|---|---|---|---|---|---|---|")
    for label, r in scored_models.items():
        cells = []
        for key in METRICS:
            ratio = r["ratio"][key]
            cells += [f"{r['synthetic'][key]:.3f}", f"{r['real'][key]:.3f}", "–" if ratio is None else f"{ratio:.3f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    refused = [f"- {label}: {r['refused']}" for label, r in results.items() if "refused" in r]
    if refused:
        lines += ["", "Not scored (their synthetic images may carry the test split):", *refused]
    return lines
