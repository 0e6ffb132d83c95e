"""`bloodgen-hf augment-study`: does synthetic data help a classifier, and at what real-data size?

For each seed and real-data fraction f (a class-stratified random subset R_f of the train split), a
classifier is trained on
  real            R_f
  real+synthetic  R_f plus synthetic images by a recipe: `synthetic_ratio` x |R_f| in R_f's class
                  proportions, or with `balance` just enough per class to top every class up to the largest
                  one; with `filter_threshold`, only synthetic images that the real-only classifier of the same
                  (seed, f) gives at least that probability of their class (a classifier trained on R_f alone)
  synthetic       as many synthetic images as R_f has (R_f's proportions, or equal per class with `balance`)
and scored once on the real test split (accuracy, macro-F1, class-wise precision/recall/F1, confusion).
With `finetune_epochs` K (converged only), every setting's classifier, real only too (its control), then
trains K more epochs on R_f's real images alone, from its chosen weights at a tenth of the learning rate
(synthetic pre-training, real fine-tuning), and val chooses again among the base's choice and those epochs.

Two protocols:
  converged    (default) a fixed number of epochs over the real images (synthetic images ride along in
               the same epochs, so every real image is seen equally often whatever is added), batch size
               by the size of R_f; the epoch with the best macro-F1 on the real val split is kept, and only
               that classifier is scored on the test split. Every val curve is recorded.
  fixed-steps  the earlier protocol: the same number of optimizer steps for every training set, a small
               BloodNet, the last weights scored. It cannot see what data is worth; kept for comparison.

Synthetic images come from one pool per class, generated once per image seed and saved as
synthetic_pool.npz; each run draws its own random subset. Every finished classifier leaves
runs/<name>/result.json, so a stopped study continues with `resume` (same model, protocol and classifier,
checked against study.json). A resumed study may use another recipe: its runs are added beside the
others (the pool grows as needed, earlier images are kept) and the report shows every recipe.

The classifiers are trained by the shared training loop (core.train with BloodNetTask), so each run
folder holds its metrics.jsonl, last checkpoint and saved model. Under the converged protocol a classifier
checkpoints at every val evaluation, and `resume` continues one that was stopped from there, exactly.

The study refuses a generator whose recorded training data (its provenance) includes the test split it
scores on, or that records none (bloodgen_hf/provenance.py). With a `GeneratorPlan`
(`--generator-per-fraction FAMILY`), there is no shared generator: for every (seed, fraction) a generator
is trained by the family's train script on exactly that R_f (`--split train --subset-fraction f
--subset-seed seed`), into generators/<f>-seed<seed>/, checked by the indices its provenance records, and
draws its own pool (pools/<f>-seed<seed>.npz). `resume` keeps finished generators and continues one that
was stopped from its last checkpoint. Their training budgets go in the report.

Everything happens at the generator's image size: real train/val/test images are read at it and the
classifiers are built for it. A `resolution` asked for must be that size (a generator of another size is
refused: its images would have to be resized, which this study does not do); results.json records it.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bloodgen_hf.augment import Recipe
from bloodgen_hf.data import CLASS_NAMES, DEFAULT_DATASET, LabelledImages, describe_classes, load_data, same_classes
from bloodgen_hf.errors import UsageError
from bloodgen_hf.evaluation.bloodnet import predict
from bloodgen_hf.evaluation.bloodnet_train import MODEL_FOLDER, BloodNetOptions, BloodNetTask, load_classifier
from bloodgen_hf.evaluation.metrics import classification_report
from bloodgen_hf.evaluation.protocol import summarize
from bloodgen_hf.evaluation.report import write_json, write_markdown_report
from bloodgen_hf.guard import check_unchanged
from bloodgen_hf.io import atomic_path
from bloodgen_hf.process import cpu_name, native_bf16
from bloodgen_hf.provenance import (
    check_unseen,
    describe_provenance,
    indices_fingerprint,
    pipeline_provenance,
    real_subset,
)
from bloodgen_hf.sampling import generate, pipeline_class_names, sampling_record
from bloodgen_hf.training.core import TrainConfig, make_accelerator, train

SETTINGS = ("real", "real+synthetic", "synthetic")
PROTOCOLS = ("converged", "fixed-steps")
POOL_SEED = 7_000_000  # generation seeds of the pool start here, away from evaluate's
POOL_CLASS_STRIDE = 1_000_000  # image j of class c is drawn with seed POOL_SEED + c * stride + j
EVAL_SPLIT = "test"  # what every classifier is scored on, so what no generator may have seen
SELECT_SPLIT = "val"  # what the converged protocol chooses the epoch on
FAMILIES = ("gan", "ddpm", "vae")
# The classifiers: BloodNet's architecture, the small one of the fixed-steps protocol, MedMNIST's ResNet-18.
CLASSIFIERS = {
    "bloodnet": {"arch": "bloodnet", "channels": [24, 48, 96], "blocks_per_stage": 2},
    "bloodnet-small": {"arch": "bloodnet", "channels": [16, 32, 64], "blocks_per_stage": 1},
    "resnet18": {"arch": "resnet18"},
}
# What a resumed study may change: the recipe of its real+synthetic runs (each recipe's runs are kept apart).
RECIPE_KEYS = ("synthetic_ratio", "balance", "filter_threshold", "synthetic_weight", "finetune_epochs")
# ... and its fractions and seeds: a costly recipe may run on the cheap fractions only, a later session may add
# seeds or fractions (their real runs first). Cells are compared on the seeds they share (paired_change).
SUBSET_KEYS = ("fractions", "seeds")
FILTER_OVERSAMPLE = 1.5  # a filtered recipe's pool holds this many candidates per image it needs
FINETUNE_LR_FACTOR = 0.1  # --finetune-epochs: the fine-tune's peak learning rate, as a share of the study's
FINETUNE_FOLDER = "finetune"  # runs/<name>/finetune/: the fine-tune's checkpoints and model (the base's: runs/<name>)
BASE_RECORD = "base.json"  # runs/<name>/base.json: the base classifier's record, so a resumed study keeps it
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
    # the recipe of real+synthetic (and synthetic) runs
    synthetic_ratio: float = 1.0
    balance: bool = False
    filter_threshold: float = 0.0  # 0: no filter
    synthetic_weight: float = 1.0  # real+synthetic: the loss weight of a synthetic image (a real one's is 1)
    finetune_epochs: int = 0  # converged: then this many epochs on R_f's real images alone (every setting)
    # how every classifier is trained
    protocol: str = "converged"
    classifier: str = "bloodnet"
    epochs: int = 20  # converged: passes over the real images (more for a small R_f, see epochs_for)
    min_steps: int = 1000  # converged: optimizer steps that the real images alone get at least
    max_evaluations: int = 20  # converged: val evaluations per classifier at most (every k epochs, k >= 1)
    steps: int = 300  # fixed-steps: optimizer steps
    batch_size: int = 128  # fixed-steps: the batch; converged: the largest batch (small R_f get smaller ones)
    channels: tuple[int, ...] = (16, 32, 64)  # fixed-steps' small BloodNet (the bloodnet-small classifier)
    blocks_per_stage: int = 1
    lr: float = 3e-3
    select_on: str = "macro_f1"  # converged: the val score that chooses the epoch

    def check(self) -> None:
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise UsageError(f"--fractions must be in (0, 1] (e.g. 0.01,0.1,0.5,1), got {self.fractions}")
        unknown = set(self.settings) - set(SETTINGS)
        if unknown or not self.settings:
            raise UsageError(f"unknown setting(s) {sorted(unknown)}; choose from: {', '.join(SETTINGS)}")
        if not self.seeds or self.steps < 1 or self.batch_size < 1 or self.synthetic_ratio < 0:
            raise UsageError("--seeds, a positive --steps and --batch-size, and --synthetic-ratio >= 0 are needed")
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.classifier not in CLASSIFIERS:
            raise UsageError(f"--classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}")
        if self.epochs < 1 or self.min_steps < 0 or self.max_evaluations < 1:
            raise UsageError("--epochs and --max-evaluations must be at least 1, --min-steps at least 0")
        if not 0 <= self.filter_threshold < 1:
            raise UsageError(f"--filter-threshold must be in [0, 1) (0: no filter), got {self.filter_threshold}")
        if not 0 < self.synthetic_weight <= 1:
            raise UsageError(f"--synthetic-weight must be in (0, 1], got {self.synthetic_weight}")
        if self.filter_threshold and "real" not in self.settings:
            raise UsageError("--filter-threshold filters with the real-only classifiers: keep 'real' in --settings")
        if self.finetune_epochs < 0:
            raise UsageError(f"--finetune-epochs must be at least 0 (0: no fine-tune), got {self.finetune_epochs}")
        if self.finetune_epochs and self.protocol != "converged":
            raise UsageError("--finetune-epochs needs --protocol converged: its epoch is chosen on the val split")
        if self.finetune_epochs and self.filter_threshold:
            raise UsageError("--finetune-epochs and --filter-threshold are separate recipes: pass one of them")

    @property
    def recipe(self) -> str:
        """The recipe's name, part of its runs' names: '1x', '0.5x', 'balance', '2x+filter0.9'."""
        name = "balance" if self.balance else f"{self.synthetic_ratio:g}x"
        name += f"+filter{self.filter_threshold:g}" if self.filter_threshold else ""
        name += f"+w{self.synthetic_weight:g}" if self.synthetic_weight != 1 else ""
        return name + (f"+ft{self.finetune_epochs}" if self.finetune_epochs else "")

    def run_recipe(self, setting: str) -> str:
        """The recipe a run of `setting` records: 'real' for real only (one run serves every recipe), or
        'real+ft5' when fine-tuned (the control of a fine-tuned recipe); the recipe for the other settings."""
        if setting != "real":
            return self.recipe
        return f"real+ft{self.finetune_epochs}" if self.finetune_epochs else "real"

    def classifier_options(self) -> BloodNetOptions:
        """BloodNetTask's options: the architecture and the optimiser every study classifier shares."""
        arch = dict(CLASSIFIERS[self.classifier])
        if self.classifier == "bloodnet-small":
            arch.update(channels=list(self.channels), blocks_per_stage=self.blocks_per_stage)
        return BloodNetOptions(
            **arch,
            dropout=0.1,
            lr=self.lr,
            weight_decay=5e-4,
            label_smoothing=0.05,
            warmup_fraction=0.05,
            keep_best=self.protocol == "converged",
            select_on=self.select_on,
        )

    def epochs_for(self, num_real: int) -> int:
        """converged: `epochs`, or more where R_f alone would get fewer than `min_steps` optimizer steps (1% of
        BloodMNIST is 7 batches an epoch); every training set of one R_f gets the same epochs over its real
        images, so synthetic images add steps and never take real ones away."""
        per_epoch = max(1, num_real // self.batch_for(num_real))
        epochs = max(self.epochs, math.ceil(self.min_steps / per_epoch))
        every = self.epochs_per_evaluation(epochs)
        return math.ceil(epochs / every) * every  # the last epoch is evaluated too

    def epochs_per_evaluation(self, epochs: int) -> int:
        """The val split is scored every k epochs, so that a long run (a small R_f) is not mostly scoring."""
        return max(1, math.ceil(epochs / self.max_evaluations))

    def classifier_batch(self, num_images: int, num_real: int) -> int:
        """The batch a classifier of `num_images` images, `num_real` of them real, trains with."""
        return min(self.batch_for(num_real if self.protocol == "converged" else num_images), num_images)

    def batch_for(self, num_real: int) -> int:
        """converged: the largest power of two up to |R_f| / 32, within [16, batch_size], so a small R_f still
        gets several optimizer steps per epoch; fixed-steps: batch_size (or all images, if fewer)."""
        if self.protocol == "fixed-steps":
            return min(self.batch_size, num_real)
        return int(min(self.batch_size, max(16, 2 ** math.floor(math.log2(max(num_real, 1) / 32)))))


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
            raise UsageError(f"--generator-per-fraction must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.steps < 1:
            raise UsageError(f"--generator-steps must be at least 1, got {self.steps}")
        for word in self.words():
            flag = word.split("=", 1)[0]
            if flag in STUDY_FLAGS:
                raise UsageError(
                    f"--generator-options may not set {flag}: the study sets it (each generator trains on R_f of "
                    "--split train, for --generator-steps steps)"
                )

    def words(self) -> list[str]:
        try:
            return shlex.split(self.options)
        except ValueError as err:
            raise UsageError(f"--generator-options {self.options!r}: {err}") from None

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
    if setting == "real+synthetic":  # the recipe `bloodgen-hf augment` applies
        return Recipe(config.synthetic_ratio, config.balance).counts(real_counts)
    if config.balance:  # synthetic only, balanced: |R_f| images spread evenly
        total = int(real_counts.sum())
        return total // num_classes + (np.arange(num_classes) < total % num_classes)
    return real_counts.copy()


def make_pool(pipe, counts: np.ndarray, sampling_kwargs: dict, batch_size: int, log=print) -> dict[str, np.ndarray]:
    """counts[c] generated images of class c, image i with seed POOL_SEED + i (TSTR's pools)."""
    labels = np.repeat(np.arange(len(counts)), counts)
    log(f"generating a synthetic pool of {len(labels)} images ({', '.join(map(str, counts))} per class)")
    batches = list(generate(pipe, labels, seed=POOL_SEED, batch_size=batch_size, **sampling_kwargs))
    return {"images": np.concatenate([b[0] for b in batches]), "labels": labels}


def grow_pool(pool: dict | None, pipe, counts: np.ndarray, sampling_kwargs: dict, batch_size: int, log) -> dict:
    """`pool` with at least counts[c] images of class c: image j of class c is drawn with seed
    POOL_SEED + c * POOL_CLASS_STRIDE + j, so a pool grown later holds the same images as one made at once."""
    have = np.zeros(len(counts), np.int64) if pool is None else np.bincount(pool["labels"], minlength=len(counts))
    missing = np.maximum(np.asarray(counts) - have, 0)
    if not missing.any():
        return pool
    log(f"generating {int(missing.sum())} synthetic images ({', '.join(map(str, missing))} per class)")
    parts = [] if pool is None else [(pool["images"], pool["labels"], pool["seeds"])]
    for c in np.flatnonzero(missing):
        seed = POOL_SEED + int(c) * POOL_CLASS_STRIDE + int(have[c])
        labels = np.full(missing[c], c, np.int64)
        batches = list(generate(pipe, labels, seed=seed, batch_size=batch_size, **sampling_kwargs))
        parts.append(tuple(np.concatenate([b[i] for b in batches]) for i in range(3)))
    return {key: np.concatenate([part[i] for part in parts]) for i, key in enumerate(("images", "labels", "seeds"))}


def record_study(path: Path, study: dict, resume: bool) -> None:
    """Write study.json, or on resume check that the study in `path` was started with the same settings."""
    if resume and path.exists():
        before = json.loads(path.read_text())
        check_unchanged(
            flat_study(before),
            flat_study(study),
            f"--resume: {path}",
            "pass the same options, or a new --out",
            may_change=SUBSET_KEYS,
        )
        return
    write_json(study, path)


def flat_study(study: dict) -> dict:
    """study.json's config keys beside its model, sampling options, dataset and per-fraction generator plan
    (None for studies of one model, and for those from before plans existed), for one comparison."""
    dataset = study.get("dataset", DEFAULT_DATASET)  # studies from before --dataset were all BloodMNIST
    config = {k: v for k, v in study["config"].items() if k not in RECIPE_KEYS}
    config.setdefault("protocol", "fixed-steps")  # studies from before --protocol
    flat = {**config, "model": study.get("model"), "sampling": study.get("sampling"), "dataset": dataset}
    return {**flat, "generators": study.get("generators")}


def load_or_make_pool(path: Path, pipe, counts: np.ndarray, sampling_kwargs: dict, config: StudyConfig, resume, log):
    """The pool in `path` when resuming, grown to hold `counts` images per class if it holds fewer (an earlier
    recipe needed fewer); else a freshly generated one. Saved atomically whenever it changes."""
    if not counts.any():
        return None
    pool = None
    if resume and path.exists():
        with np.load(path) as saved:
            pool = {key: saved[key] for key in saved.files}
        if "seeds" not in pool:  # a pool from before per-class seeds: usable only as it is
            if (np.bincount(pool["labels"], minlength=len(counts)) < counts).any():
                raise UsageError(f"--resume: {path} holds fewer images than this recipe needs; delete it to regenerate")
            log(f"reusing the synthetic pool in {path} ({len(pool['labels'])} images)")
            return pool
        log(f"reusing the synthetic pool in {path} ({len(pool['labels'])} images)")
    grown = grow_pool(pool, pipe, counts, sampling_kwargs, config.batch_size, log)
    if grown is not pool:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **grown)
    return grown


def draw_synthetic(
    pool: dict, counts: np.ndarray, rng: np.random.Generator, accepted: np.ndarray | None = None, name: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """counts[c] distinct images of class c, drawn at random from the pool (or from its `accepted` images)."""
    allowed = np.ones(len(pool["labels"]), bool)
    if accepted is not None:
        allowed[:] = False
        allowed[accepted] = True
    index = []
    for c in range(len(counts)):
        candidates = np.flatnonzero((pool["labels"] == c) & allowed)
        if len(candidates) < counts[c] and accepted is None:  # the pool is sized for the study: a bug
            raise RuntimeError(f"{name}: the pool holds {len(candidates)} images of class {c}, {counts[c]} are needed")
        if len(candidates) < counts[c]:
            raise UsageError(
                f"{name}: only {len(candidates)} synthetic images of class {c} passed the filter, {counts[c]} are "
                "needed; lower --filter-threshold"
            )
        index.append(rng.choice(candidates, counts[c], replace=False))
    index = np.concatenate(index)
    return pool["images"][index], pool["labels"][index]


def train_classifier(
    images,
    labels,
    holdout,
    config: StudyConfig,
    seed: int,
    folder: Path,
    class_names: tuple[str, ...] = CLASS_NAMES,
    num_real: int | None = None,
    weights: np.ndarray | None = None,
    resume: bool = False,
    epochs: int | None = None,
    lr: float | None = None,
    init_from: Path | None = None,
):
    """One classifier through the shared loop, with flips + transposes and no trackers.

    converged: `config.epochs` passes over the images (batch by `num_real`, the real images among them),
    the best val epoch kept, with a checkpoint at every val evaluation, from which `resume` continues a
    stopped classifier exactly (a ResNet-18 on the whole split takes an hour). fixed-steps: `config.steps`
    optimizer steps, the last weights kept. `weights`: each image's loss weight. `epochs`, `lr` and
    `init_from` (a saved classifier's weights to start from) replace the study's for a fine-tune.
    Returns (classifier in eval mode, its BloodNetTask: the val curve and the chosen epoch)."""
    from accelerate.utils import set_seed

    converged = config.protocol == "converged"
    num_real = len(labels) if num_real is None else num_real
    batch = config.classifier_batch(len(labels), num_real)
    steps = None if converged else config.steps
    epochs = epochs or config.epochs_for(num_real)
    every = config.epochs_per_evaluation(epochs)  # converged: score val after every `every` epochs
    options = replace(config.classifier_options(), epochs_per_evaluation=every, lr=lr or config.lr)
    evaluation_steps = every * (len(labels) // batch)
    train_config = TrainConfig(
        output_dir=str(folder),
        resolution=images.shape[1],
        split="train",
        batch_size=batch,
        epochs=epochs if converged else 10**6,
        max_steps=steps,
        mixed_precision=classifier_precision(config),
        seed=seed,
        checkpoint_every=evaluation_steps if converged else config.steps,
        keep_checkpoints=1,
        resume="latest" if resume else None,
        overwrite=not resume,  # else a classifier that did not finish (no result.json) starts again
        sample_every=evaluation_steps if converged else config.steps,
        log_every=20 if converged else max(1, config.steps // 10),
        log_with="none",
        init_from=None if init_from is None else str(init_from),
        extra=options,
    )
    accelerator = make_accelerator(train_config)
    set_seed(seed)
    task = BloodNetTask.create(train_config, len(labels), holdout, class_names)
    data = LabelledImages(images, labels, flip=True, class_names=class_names)
    if weights is not None:
        data = WeightedImages(images, labels, weights, class_names)
    train(task, train_config, accelerator, data)
    model = task.final_model(accelerator)
    accelerator.free_memory()
    return model, task


class WeightedImages(LabelledImages):
    """Images with a loss weight each, which `batch` hands to BloodNetTask.training_step after the labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, weights: np.ndarray, class_names=CLASS_NAMES):
        super().__init__(images, labels, flip=True, class_names=class_names)
        self.weights = torch.as_tensor(np.asarray(weights, np.float32))

    def batch(self, indices):
        images, labels = super().batch(indices)
        return images, labels, self.weights[indices]


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
    report_only: bool = False,
    resolution: int | None = None,
):
    """Train every (setting, fraction, seed) classifier; write results.json, report.md and plots to `out`.

    The synthetic images come from `pipe`, or with `generator` (and `pipe` None) from one generator per
    (seed, fraction) trained on that R_f. A generator that may have seen the test split, or (with `resolution`)
    that makes images of another size, is refused first. `report_only` trains nothing: it writes the report of
    the runs finished so far (a study still running).
    """
    config.check()
    if (pipe is None) == (generator is None):
        raise UsageError("the study needs one generator: a model, or --generator-per-fraction FAMILY (not both)")
    sampling_kwargs = sampling_kwargs or {}
    if generator is not None:
        generator.check()
        size = generator.resolution
    else:
        check_unseen(pipeline_provenance(pipe), model or "the model", EVAL_SPLIT, dataset, "augment-study")
        size = pipe.resolution
        sampling_kwargs = sampling_record(pipe, sampling_kwargs)  # the precision it will sample at, recorded
    check_study_resolution(model or "the generator", size, resolution)
    train_images, train_labels, names, _ = load_data(dataset, "train", size, data_dir)
    holdout = load_data(dataset, SELECT_SPLIT, size, data_dir)[:2]
    test_images, test_labels = load_data(dataset, EVAL_SPLIT, size, data_dir)[:2]
    if pipe is not None:
        check_generator_classes(pipe, model or "the model", names, dataset)
    num_classes = len(names)

    plans, needs = plan_subsets(train_labels, num_classes, config)
    study = {"model": model, "config": asdict(config), "sampling": sampling_kwargs, "dataset": dataset}
    study["generators"] = asdict(generator) if generator else None
    if report_only:
        if not (out / "study.json").is_file():
            raise UsageError(f"--report-only: {out} holds no study (no study.json)")
        record_study(out / "study.json", study, resume=True)
        return write_results(out, config, model, names, pipe, [], html, sampling_kwargs, size)
    out.mkdir(parents=True, exist_ok=True)
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

    for (seed, fraction), subset in plans.items():
        pool = pools[seed, fraction]
        real_counts = np.bincount(train_labels[subset], minlength=num_classes)
        filtered = None  # with --filter-threshold: the pool's images the real-only classifier accepts
        for setting in (s for s in SETTINGS if s in config.settings):  # real first: the filter needs its classifier
            name = run_name(setting, config, fraction, seed)
            done = out / "runs" / name / "result.json"
            if resume and done.exists() and not filter_needs_retraining(setting, config, out / "runs" / name):
                log(f"== {name}: finished earlier, test accuracy {json.loads(done.read_text())['accuracy']:.4f}")
                continue
            rng = np.random.default_rng([seed, round(fraction * 1e6), SETTINGS.index(setting)])
            parts_x, parts_y = [], []
            if setting != "synthetic":
                parts_x.append(train_images[subset])
                parts_y.append(train_labels[subset])
            counts = synthetic_counts(real_counts, setting, config)
            accepted = None
            if counts.any():
                if config.filter_threshold and filtered is None:  # once per R_f: both settings draw from it
                    filtered = filter_pool(pool, out / "runs" / run_name("real", config, fraction, seed), config)
                accepted = filtered
                x, y = draw_synthetic(pool, counts, rng, accepted, name)
                parts_x.append(x)
                parts_y.append(y)
            images, labels = np.concatenate(parts_x), np.concatenate(parts_y)
            num_real = int(real_counts.sum()) * (setting != "synthetic")
            weights = None
            if setting == "real+synthetic" and config.synthetic_weight != 1:
                weights = np.r_[np.ones(num_real), np.full(len(labels) - num_real, config.synthetic_weight)]
            log(f"== {name}: {num_real} real + {int(counts.sum())} synthetic")
            folder = out / "runs" / name
            record = base_done = finished_base(folder, config, resume and not done.exists())
            if base_done is None:
                earlier = stopped_classifier(folder) if resume and not done.exists() else None
                if earlier:
                    log(f"   continuing its classifier from the checkpoint at step {earlier['step']}")
                cpu, wall = time.process_time(), time.time()
                classifier, task = train_classifier(
                    images,
                    labels,
                    holdout,
                    config,
                    seed,
                    folder,
                    names,
                    num_real or len(labels),
                    weights,
                    resume=earlier is not None,
                )
                cpu, wall = time.process_time() - cpu, time.time() - wall
                record = training_record(config, task, len(labels), num_real or len(labels), cpu, wall, earlier)
            if config.finetune_epochs:
                record = record_base(folder, record, classifier_scores(folder, test_images, test_labels), log)
                subset_data = (train_images[subset], train_labels[subset])
                fine_tune = (holdout, config, seed, folder, names, base_done is not None, log)
                classifier, record = finetune_on_real(record, *subset_data, *fine_tune)
            predicted = predict(classifier, test_images, with_features=False)[1].argmax(axis=1)
            report = classification_report(test_labels, predicted, num_classes)
            log(f"   test accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}")
            run = {"setting": setting, "recipe": config.run_recipe(setting)}
            run.update(fraction=fraction, seed=seed, num_real=int(real_counts.sum()), num_synthetic=int(counts.sum()))
            run.update(record)
            if accepted is not None:
                run["filter_acceptance"] = filter_acceptance(pool, accepted, num_classes)
            write_json({**run, **report}, done)
    return write_results(out, config, model, names, pipe, generators, html, sampling_kwargs, size)


def check_study_resolution(model: str, size: int, resolution: int | None) -> None:
    """--resolution must be the generator's own size: the study reads real images and builds classifiers at it."""
    if resolution is not None and size != resolution:
        raise UsageError(
            f"{model} makes {size} px images, not {resolution} px (--resolution {resolution}): the study trains and "
            f"scores its classifiers at the generator's size; pass a {resolution} px generator, or --resolution {size}"
        )


def write_results(
    out: Path,
    config: StudyConfig,
    model: str,
    names,
    pipe,
    generators: list,
    html: bool,
    sampling: dict,
    resolution: int = 28,
) -> dict:
    """results.json (every finished run of any recipe, and their summary, and the image size of them all),
    report.md and the plots."""
    runs = finished_runs(out / "runs")
    if not runs:
        raise UsageError(f"{out} holds no finished run yet")
    results = {
        "model": model,
        "sampling": sampling,
        "config": asdict(config),
        "protocol": config.protocol,
        "classifier": config.classifier,
        "class_names": list(names),
        "resolution": resolution,
        "provenance": None if pipe is None else pipeline_provenance(pipe),
        "generators": generators,
        "summary": summarize_study(runs),
        "runs": runs,
    }
    write_json(results, out / "results.json")
    write_study_report(results, out, html)
    return results


def run_name(setting: str, config: StudyConfig, fraction: float, seed: int) -> str:
    """runs/<name>: real-0.1-seed0, real+synthetic-2x-0.1-seed0 (real runs serve every recipe), real-ft5-0.1-seed0."""
    recipe = config.run_recipe(setting).removeprefix("real").removeprefix("+")
    return f"{setting}{'-' if recipe else ''}{recipe}-{fraction:g}-seed{seed}"


def classifier_precision(config: StudyConfig) -> str:
    """Converged classifiers train in bf16 autocast where the CPU has bf16 units, else in fp32 ("no")."""
    return "bf16" if config.protocol == "converged" and native_bf16() else "no"


def training_record(
    config: StudyConfig, task, num_images: int, num_real: int, cpu: float, wall: float, earlier: dict | None = None
) -> dict:
    """How a classifier was trained: protocol, budget, batch, the chosen epoch and the val curve, CPU time, and the
    CPU and precision (a cell trained again elsewhere moves by about a seed's spread, so studies name theirs).
    `earlier`: the checkpoint's progress a stopped classifier continued from, whose CPU time and CPUs count too
    (wall time is this session's only)."""
    record = {"protocol": config.protocol, "classifier": config.classifier, "num_images": num_images}
    machines = [*(earlier or {}).get("machines", []), cpu_name()]
    record.update(machine=", ".join(dict.fromkeys(machines)), mixed_precision=classifier_precision(config))
    if earlier:
        record["resumed_at_step"] = earlier["step"]
        cpu += earlier["cpu_seconds"]
    record["batch_size"] = config.classifier_batch(num_images, num_real)
    if config.protocol == "converged":
        chosen = task.chosen()
        record.update(epochs=config.epochs_for(num_real), chosen_epoch=chosen["epoch"], val_at_chosen=chosen)
        record["val_curve"] = task.curve
    else:
        record.update(steps=config.steps)
    return {**record, "cpu_minutes": cpu / 60, "wall_minutes": wall / 60}


def finished_base(folder: Path, config: StudyConfig, resume: bool) -> dict | None:
    """--finetune-epochs: the record of the base classifier that an earlier session finished (its weights and
    base.json both there), or None: it is trained (or continued) first."""
    record = folder / BASE_RECORD
    if not (config.finetune_epochs and resume and record.is_file() and (folder / "pipeline" / MODEL_FOLDER).is_dir()):
        return None
    return json.loads(record.read_text())


def classifier_scores(folder: Path, images: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy and macro-F1 of the classifier saved in `folder` (reported only: nothing is chosen on them)."""
    logits = predict(load_classifier(folder / "pipeline" / MODEL_FOLDER), images, with_features=False)[1]
    report = classification_report(labels, logits.argmax(1), logits.shape[1])
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}


def record_base(folder: Path, record: dict, test: dict, log) -> dict:
    """base.json: how the base classifier trained and what it scored on test before its fine-tune."""
    record = {**record, "before_finetune": test}
    write_json(record, folder / BASE_RECORD)
    log(f"   before its fine-tune: test accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}")
    return record


def finetune_on_real(
    base: dict,
    images: np.ndarray,
    labels: np.ndarray,
    holdout,
    config: StudyConfig,
    seed: int,
    folder: Path,
    class_names: tuple[str, ...],
    resume: bool = False,
    log=print,
) -> tuple[torch.nn.Module, dict]:
    """Synthetic pre-training, real fine-tuning (He et al., ICLR 2023): `finetune_epochs` more epochs on R_f's
    real images alone, from the base classifier's chosen weights, at FINETUNE_LR_FACTOR of the learning rate. Val
    chooses again, among the base's choice and every fine-tune epoch (ties keep the base), so a fine-tune that val
    does not prefer is dropped. Returns the chosen classifier and the run's record: the base's curve up to its
    choice continued by the fine-tune's, epochs counted from the start of the base. `resume` continues a stopped
    fine-tune of the same base (a base trained again starts its fine-tune afresh)."""
    run = folder / FINETUNE_FOLDER
    earlier = stopped_classifier(run) if resume else None
    log(f"   fine-tuning on the {len(labels)} real images for {config.finetune_epochs} epochs")
    cpu, wall = time.process_time(), time.time()
    model, task = train_classifier(
        images,
        labels,
        holdout,
        config,
        seed,
        run,
        class_names,
        resume=earlier is not None,
        epochs=config.finetune_epochs,
        lr=config.lr * FINETUNE_LR_FACTOR,
        init_from=folder / "pipeline" / MODEL_FOLDER,
    )
    cpu = time.process_time() - cpu + (earlier or {}).get("cpu_seconds", 0.0)
    start, key, best = base["chosen_epoch"], config.select_on, task.chosen()
    kept = best[key] > base["val_at_chosen"][key]
    if not kept:
        model = load_classifier(folder / "pipeline" / MODEL_FOLDER)
    curve = [e for e in base["val_curve"] if e["epoch"] <= start] + [
        {**e, "epoch": start + e["epoch"]} for e in task.curve
    ]
    record = {**base, "epochs": base["epochs"] + config.finetune_epochs, "val_curve": curve}
    record["chosen_epoch"] = start + best["epoch"] if kept else start
    record["val_at_chosen"] = {**best, "epoch": start + best["epoch"]} if kept else base["val_at_chosen"]
    record["cpu_minutes"] = base["cpu_minutes"] + cpu / 60
    record["wall_minutes"] = base["wall_minutes"] + (time.time() - wall) / 60
    record["finetune"] = {
        "epochs": config.finetune_epochs,
        "lr": config.lr * FINETUNE_LR_FACTOR,
        "from_epoch": start,
        "kept": kept,
        "chosen_epoch": best["epoch"] if kept else 0,
        "val_curve": task.curve,
        "base_val_curve": base["val_curve"],
        "cpu_minutes": cpu / 60,
    }
    return model.eval(), record


def stopped_classifier(run: Path) -> dict | None:
    """The progress (step, CPU seconds, CPUs) of the last checkpoint of a classifier that stopped before it
    finished, or None: a resumed study continues it from there."""
    from bloodgen_hf.training.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run)
    return None if checkpoint is None else json.loads((checkpoint / "progress.json").read_text())


def finished_runs(folder: Path) -> list[dict]:
    """Every run of the study that finished (any recipe), in a stable order."""
    runs = [json.loads(path.read_text()) for path in sorted(folder.glob("*/result.json"))]
    order = {s: i for i, s in enumerate(SETTINGS)}
    return sorted(runs, key=lambda r: (order[r["setting"]], r.get("recipe", ""), r["fraction"], r["seed"]))


def filter_needs_retraining(setting: str, config: StudyConfig, run: Path) -> bool:
    """A finished real-only run whose classifier weights were deleted (its result.json kept, to save disk) is
    trained again when --filter-threshold needs that classifier: the same seed and data give it back."""
    return setting == "real" and bool(config.filter_threshold) and not (run / "pipeline" / MODEL_FOLDER).is_dir()


def filter_pool(pool: dict, real_run: Path, config: StudyConfig) -> np.ndarray:
    """Indices of the pool's images that the real-only classifier of the same (seed, fraction), trained on
    R_f of the train split only, gives at least `filter_threshold` probability of their own class."""
    folder = real_run / "pipeline" / MODEL_FOLDER
    if not (real_run / "result.json").is_file():
        raise UsageError(f"--filter-threshold needs the real-only classifier {real_run}, which has not finished")
    logits = predict(load_classifier(folder), pool["images"], with_features=False)[1]
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    return np.flatnonzero(probs[np.arange(len(probs)), pool["labels"]] >= config.filter_threshold)


def filter_acceptance(pool: dict, accepted: np.ndarray, num_classes: int) -> list[float]:
    """Per class, the share of the pool's images that passed the filter."""
    kept = np.bincount(pool["labels"][accepted], minlength=num_classes)
    return (kept / np.maximum(np.bincount(pool["labels"], minlength=num_classes), 1)).tolist()


def check_generator_classes(pipe, model: str, names: tuple[str, ...], dataset: str) -> None:
    if not same_classes(pipeline_class_names(pipe), names):
        ours = describe_classes(pipeline_class_names(pipe))
        raise UsageError(f"{model} generates {ours}, but --dataset {dataset} has {describe_classes(names)}")


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
            if config.filter_threshold:  # candidates to filter: more than the recipe draws
                needed = np.ceil(needed * FILTER_OVERSAMPLE).astype(np.int64)
            needs[seed, fraction] = needed
    return plans, needs


def per_fraction_pools(
    plan: GeneratorPlan, plans: dict, needs: dict, out: Path, context: dict, sampling_kwargs: dict, config, resume, log
) -> tuple[dict, list[dict]]:
    """For every (seed, fraction) that needs synthetic images: a generator trained on exactly its R_f, and its
    pool; plus one record per generator (data, budget, command) for the report."""
    from bloodgen_hf.registry import load_pipeline

    pools, records = {}, []
    for (seed, fraction), subset in plans.items():
        pools[seed, fraction] = None
        if not needs[seed, fraction].any():
            continue
        name = f"{fraction:g}-seed{seed}"
        folder = train_generator(plan, out / "generators" / name, fraction, seed, context, resume, log)
        pipe = load_pipeline(str(folder), context["device"])
        label = f"the {plan.family} generator for {name} ({folder})"
        check_study_resolution(label, pipe.resolution, plan.resolution)
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
    from bloodgen_hf.training.checkpoint import checkpoint_steps

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
        raise UsageError(
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


def row_label(setting: str, recipe: str | None) -> str:
    """A table row: 'real', 'real (ft5)', 'synthetic (1x)' or 'real+synthetic (2x)'; runs from before recipes
    count as 1x."""
    if setting == "real":
        return f"real ({recipe.removeprefix('real+')})" if (recipe or "").startswith("real+") else "real"
    return f"{setting} ({recipe or '1x'})"


def summarize_study(runs: list[dict]) -> list[dict]:
    """Per (setting, recipe, fraction): mean ± std of accuracy, macro-F1 and class-wise P/R/F1, mean confusion,
    CPU minutes and chosen epochs."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((row_label(run["setting"], run.get("recipe")), run["fraction"]), []).append(run)
    summary = []
    for (row, fraction), members in groups.items():
        entry = {"row": row, "setting": members[0]["setting"], "recipe": members[0].get("recipe"), "fraction": fraction}
        entry["seeds"] = [m["seed"] for m in members]
        entry["num_real"], entry["num_synthetic"] = members[0]["num_real"], members[0]["num_synthetic"]
        for key in ("accuracy", "macro_f1"):
            entry[key] = summarize([m[key] for m in members])
        entry["by_seed"] = {str(m["seed"]): {k: m[k] for k in ("accuracy", "macro_f1")} for m in members}
        for key in ("precision", "recall", "f1"):
            values = np.asarray([m[key] for m in members])
            entry[key] = {
                "mean": values.mean(0).tolist(),
                "std": values.std(0, ddof=1 if len(members) > 1 else 0).tolist(),
            }
        entry["confusion"] = np.mean([m["confusion"] for m in members], axis=0).tolist()
        if all("cpu_minutes" in m for m in members):
            entry["cpu_minutes"] = float(np.mean([m["cpu_minutes"] for m in members]))
        if all("chosen_epoch" in m for m in members):
            entry["chosen_epochs"] = [m["chosen_epoch"] for m in members]
        summary.append(entry)
    return summary


def protocol_sentence(results: dict) -> str:
    """What every classifier of the study was, how it was trained and how it was scored."""
    config = results["config"]
    protocol = config.get("protocol", "fixed-steps")
    classifier = config.get("classifier", "bloodnet-small")
    arch = CLASSIFIERS.get(classifier, {})
    shape = f"{classifier} {arch.get('channels', '')} x {arch.get('blocks_per_stage', '')}".strip(" x")
    if classifier == "bloodnet-small" or protocol == "fixed-steps" and "classifier" not in config:
        shape = f"small BloodNet ({config['channels']})"
    if protocol == "converged":
        return (
            f"Converged protocol: {shape} trained for {config['epochs']} epochs over the real images, or more where "
            f"R_f alone would get fewer than {config.get('min_steps', 0)} optimizer steps (synthetic images ride "
            f"along in the same epochs; batch up to {config['batch_size']}, smaller for small R_f), the epoch with "
            f"the best val {config.get('select_on', 'macro_f1')} kept, then scored once on the real test split."
        )
    return (
        f"Fixed-steps protocol (earlier; it cannot see what data is worth): {shape} trained for {config['steps']} "
        "steps whatever its data, the last weights scored on the real test split."
    )


def study_table(
    summary: list[dict], key: str, with_cpu: bool = False, only: list[str] | None = None, label: str = "training set"
) -> list[str]:
    """A markdown table of `key` (mean ± std over seeds): one row per setting and recipe (`only`: these rows, in
    this order), one column per fraction; real+synthetic rows add their change against real in points. The
    README's and docs/augmentation.md's tables are these (experiments/update_tables.py writes them)."""
    fractions = sorted({e["fraction"] for e in summary})
    order = {s: i for i, s in enumerate(SETTINGS)}
    rows = sorted({(order[e["setting"]], e["row"]) for e in summary})
    if only is not None:
        missing = sorted(set(only) - {row for _, row in rows})
        if missing:
            raise ValueError(f"no row {missing} in the study; it has {[row for _, row in rows]}")
        rows = [(0, row) for row in only]
    cell = {(e["row"], e["fraction"]): e for e in summary}
    most_seeds = max(len(e["seeds"]) for e in summary)
    lines = [f"| {label} | " + " | ".join(f"{f:.0%} real" for f in fractions) + " |"]
    lines.append("|---" * (len(fractions) + 1) + "|")
    for _, row in rows:
        values = []
        for f in fractions:
            e = cell.get((row, f))
            if e is None:
                values.append("–")
                continue
            text = f"{e[key]['mean']:.3f} ± {e[key]['std']:.3f}"
            change = paired_change(e, cell.get(("real", f)), key)
            if e["row"] != "real" and e["setting"] != "synthetic" and change is not None:
                text += f" ({change:+.1f})"
            if len(e["seeds"]) < most_seeds:
                text += f" [seeds {', '.join(map(str, sorted(e['seeds'])))}]"
            if with_cpu and "cpu_minutes" in e:
                text += f", {e['cpu_minutes']:.1f} CPU-min"
            values.append(text)
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return lines


SAMPLING_WORDS = {
    "num_inference_steps": "steps {}",
    "guidance_scale": "guidance {}",
    "guidance_interval": "interval {}",
}


def chosen_sampling(results: dict) -> dict:
    """The sampling options a study was given that choose its images: all but the precision, which sets speed."""
    return {k: v for k, v in (results.get("sampling") or {}).items() if k != "precision"}


def sampling_words(results: dict) -> str:
    """A study's sampling settings in words ('guidance 2, steps 4'); 'its defaults' where none was set."""
    settings = chosen_sampling(results)
    words = [
        SAMPLING_WORDS.get(k, k + " {}").format(v if not isinstance(v, float) else f"{v:g}")
        for k, v in settings.items()
    ]
    return ", ".join(words) or "its defaults"


def sampling_table(studies: list[dict], fraction: float, row: str) -> list[str]:
    """One line per study, that is per generator and sampling settings: the val and test macro-F1 of `row` at
    `fraction`, each with its change against real only of the same study and seeds. Val chooses the settings (it
    chose each classifier's epoch as well); test is scored once and only reported."""
    lines = ["| generator | sampling | val macro-F1 (change) | test macro-F1 (change) |", "|---|---|---|---|"]
    for results in studies:
        runs = {
            (row_label(r["setting"], r.get("recipe")), r["seed"]): r
            for r in results["runs"]
            if r["fraction"] == fraction
        }
        seeds = sorted(seed for label, seed in runs if label == row and ("real", seed) in runs)
        if not seeds:
            raise ValueError(f"no {row!r} run at {fraction:g} beside a real-only one of its seed ({results['model']})")
        pairs = [(runs[row, seed], runs["real", seed]) for seed in seeds]
        val = paired_cell(pairs, lambda r: r["val_at_chosen"]["macro_f1"])
        test = paired_cell(pairs, lambda r: r["macro_f1"])
        lines.append(f"| `{results['model']}` | {sampling_words(results)} | {val} | {test} |")
    return lines


def paired_cell(pairs: list[tuple[dict, dict]], score) -> str:
    """'mean ± std (change)' of score over (recipe run, real-only run) pairs of one seed each; change in points."""
    values = summarize([score(recipe) for recipe, _ in pairs])
    change = 100 * np.mean([score(recipe) - score(real) for recipe, real in pairs])
    return f"{values['mean']:.3f} ± {values['std']:.3f} ({change:+.1f})"


def paired_change(entry: dict, real: dict | None, key: str) -> float | None:
    """The change against real only, in points, on the seeds both cells have (a recipe run on fewer seeds is
    compared with real on those seeds, not with real's mean over all of them)."""
    if real is None:
        return None
    seeds = sorted(set(entry["by_seed"]) & set(real["by_seed"]))
    if not seeds:
        return None
    return 100 * float(np.mean([entry["by_seed"][s][key] - real["by_seed"][s][key] for s in seeds]))


def write_study_report(results: dict, out: Path, html: bool = False) -> None:
    summary = results["summary"]
    fractions = sorted({e["fraction"] for e in summary})
    lines = ["# Augmentation study", "", protocol_sentence(results)]
    if results.get("resolution"):
        lines[-1] += f" Images at {results['resolution']} px."
    lines[-1] += f" {max(len(e['seeds']) for e in summary)} seeds; mean ± std over seeds."
    if results.get("model"):
        lines[-1] += f" Synthetic images from `{results['model']}`"
        settings = chosen_sampling(results)
        lines[-1] += f" ({', '.join(f'{k}={v}' for k, v in settings.items())})." if settings else "."
    if results.get("provenance"):
        lines[-1] += f" It was trained on {describe_provenance(results['provenance'])}."
    lines += generator_lines(results.get("generators") or [])
    lines += ["", "In brackets: the change against real only on the same seeds, in points; [seeds]: a cell run on"]
    lines[-1] += " fewer seeds than the others."
    for key in ("accuracy", "macro_f1"):
        lines += ["", f"## {key}", "", *study_table(summary, key)]
    lines += ["", "## Cost and chosen epochs", "", "| training set | fraction | CPU minutes | chosen epoch per seed |"]
    lines.append("|---|---|---|---|")
    for e in summary:
        cpu = f"{e['cpu_minutes']:.1f}" if "cpu_minutes" in e else "–"
        lines.append(
            f"| {e['row']} | {e['fraction']:g} | {cpu} | {', '.join(map(str, e.get('chosen_epochs', []))) or '–'} |"
        )
    lines += machine_lines(results["runs"])
    lines += ["", "## Class-wise F1 (mean over seeds)", ""]
    class_names = results.get("class_names") or list(CLASS_NAMES)
    lines += classwise_table(summary, class_names)
    lines += ["", "![accuracy](accuracy.png)", "", "![confusion matrices](confusion.png)"]
    rows = list(dict.fromkeys(e["row"] for e in summary))
    plot_study(summary, rows, fractions, out, class_names)
    if any("val_curve" in r for r in results["runs"]):
        lines += ["", "Validation macro-F1 after every epoch (one line per seed; the dot: the chosen epoch):"]
        lines += ["", "![val curves](val_curves.png)"]
        plot_val_curves(results["runs"], rows, fractions, out)
    write_markdown_report(lines, out, html)


def machine_lines(runs: list[dict]) -> list[str]:
    """Where the classifiers trained, and in which precision (runs from before this was recorded are not named)."""
    precision = {"bf16": "bf16 autocast", "no": "fp32"}
    counts = Counter(f"{r['machine']}, {precision[r['mixed_precision']]}" for r in runs if "machine" in r)
    if not counts:
        return []
    where = "; ".join(f"{key} ({n} of {len(runs)})" for key, n in counts.items())
    return ["", f"Classifiers trained on: {where}."]


def classwise_table(
    summary: list[dict], class_names, only: list[str] | None = None, fractions: list[float] | None = None
) -> list[str]:
    """Class-wise F1 (mean over seeds) per cell: every cell, or the rows `only` (in that order) at `fractions`."""
    cells = summary
    if only is not None:
        rank = {row: i for i, row in enumerate(only)}
        cells = sorted((e for e in summary if e["row"] in rank), key=lambda e: (e["fraction"], rank[e["row"]]))
    cells = [e for e in cells if fractions is None or e["fraction"] in fractions]
    lines = ["| training set | fraction | " + " | ".join(class_names) + " |", "|---" * (len(class_names) + 2) + "|"]
    for e in cells:
        f1 = " | ".join(f"{v:.3f}" for v in e["f1"]["mean"])
        lines.append(f"| {e['row']} | {e['fraction']:.0%} | {f1} |")
    return lines


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
    summary: list[dict], rows: list[str], fractions: list[float], out: Path, class_names=CLASS_NAMES
) -> None:
    """accuracy.png (accuracy and macro-F1 against real fraction, error bars) and confusion.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell = {(e["row"], e["fraction"]): e for e in summary}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key in zip(axes, ("accuracy", "macro_f1")):
        for row in rows:
            xs = [f for f in fractions if (row, f) in cell]
            ax.errorbar(
                xs,
                [cell[row, f][key]["mean"] for f in xs],
                yerr=[cell[row, f][key]["std"] for f in xs],
                marker="o",
                capsize=3,
                label=row,
            )
        ax.set_xscale("log")
        ax.set_xlabel("fraction of the real train split")
        ax.set_title(key)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "accuracy.png")

    fig, axes = plt.subplots(len(rows), len(fractions), figsize=(2.6 * len(fractions), 2.6 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j, f in enumerate(fractions):
            ax = axes[i, j]
            short = [name[:4] for name in class_names]
            ax.set_xticks(range(len(short)), short if i == len(rows) - 1 else [], rotation=90, fontsize=6)
            ax.set_yticks(range(len(short)), short if j == 0 else [], fontsize=6)
            if (row, f) not in cell:
                continue
            confusion = np.asarray(cell[row, f]["confusion"])  # rows: true class, columns: predicted
            ax.imshow(confusion / np.maximum(confusion.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"{row}, {f:.0%}", fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "confusion.png")


def plot_val_curves(runs: list[dict], rows: list[str], fractions: list[float], out: Path) -> None:
    """val_curves.png: one panel per fraction, val macro-F1 against epoch for every run, coloured by row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fractions), figsize=(3.2 * len(fractions), 3.0), squeeze=False)
    colours = {row: f"C{i}" for i, row in enumerate(rows)}
    for ax, f in zip(axes[0], fractions):
        for run in runs:
            if run["fraction"] != f or "val_curve" not in run:
                continue
            row = row_label(run["setting"], run.get("recipe"))
            epochs = [e["epoch"] for e in run["val_curve"]]
            ax.plot(epochs, [e["macro_f1"] for e in run["val_curve"]], color=colours[row], lw=0.8, alpha=0.8)
            ax.plot(run["chosen_epoch"], run["val_at_chosen"]["macro_f1"], "o", color=colours[row], ms=3)
        ax.set_title(f"{f:.0%} real", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    axes[0, 0].set_ylabel("val macro-F1")
    handles = [plt.Line2D([], [], color=c, label=row) for row, c in colours.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=7)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    save_figure(fig, out / "val_curves.png")


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
