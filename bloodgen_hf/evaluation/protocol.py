"""The standard protocol: `runs` times, n random real images vs n generated images, every metric.

Run r uses seed `seed + r` to draw n real images (without replacement) from the chosen split and
generates n images whose image i has seed `(seed + r) * 1_000_000 + i`, with the real class
distribution (or balanced). Real features come from the on-disk cache. Every distance is also
measured between two disjoint random halves of the real data of the same size (or N // 2 when the
dataset has fewer than 2n images): the real-vs-real floor a perfect model would get at that n.

Everything is scored at the real data's resolution (`RealData.size`, recorded as the protocol's `size`).
A model that makes smaller images is scored there only through an explicit `Upsample` (its images resized
bicubically first, recorded as `upsample`): the honest baseline a higher-resolution model must beat.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bloodgen_hf.data import CLASS_NAMES, DEFAULT_DATASET, dataset_label, load_data
from bloodgen_hf.errors import UsageError
from bloodgen_hf.evaluation import metrics as M
from bloodgen_hf.evaluation.cache import cached_features
from bloodgen_hf.evaluation.features import FeatureExtractor, Features
from bloodgen_hf.io import atomic_path, make_grid, upscale
from bloodgen_hf.process import cpu_name
from bloodgen_hf.sampling import generate, plan_labels, sampling_record

METRICS = ("fd", "kid", "is", "pr", "dc", "1nn", "memorization", "class-fd", "accuracy")
METRIC_HELP = {
    "fd": "Fréchet distance (FID with the Inception extractor)",
    "kid": "kernel inception distance",
    "is": "Inception Score (class-probability score of the extractor)",
    "pr": "k-NN precision and recall",
    "dc": "density and coverage",
    "1nn": "leave-one-out 1-NN two-sample accuracy (0.5 is ideal)",
    "memorization": "share of generated images that are near-copies of real images (pixels)",
    "class-fd": "Fréchet distance per class",
    "accuracy": "BloodNet accuracy on class-conditional samples",
}
ALIASES = {"fid": "fd", "prdc": None, "precision": "pr", "recall": "pr", "density": "dc", "coverage": "dc"}
GEN_SEED_STRIDE = 1_000_000
UPSAMPLE_METHODS = ("bicubic",)


def parse_metrics(names: Sequence[str] | None) -> tuple[str, ...]:
    """Metric names from the CLI (repeatable and/or comma-separated, aliases allowed), in canonical order."""
    if not names:
        return METRICS
    chosen = set()
    for name in (n.strip().lower() for item in names for n in str(item).split(",") if n.strip()):
        if name == "all":
            return METRICS
        if name == "prdc":
            chosen |= {"pr", "dc"}
            continue
        name = ALIASES.get(name, name)
        if name not in METRICS:
            raise UsageError(f"unknown metric {name!r}; choose from: {', '.join(METRICS)} (or all)")
        chosen.add(name)
    return tuple(m for m in METRICS if m in chosen)


@dataclass
class Protocol:
    runs: int = 5
    n: int = 10_000
    seed: int = 0
    distribution: str = "real"  # class labels of the generated images: 'real' proportions or 'balanced'
    metrics: tuple[str, ...] = METRICS
    with_floor: bool = True  # also score two disjoint real halves (the real-vs-real floor)
    nearest_k: int = 5
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    is_splits: int = 10
    memorization_quantile: float = 0.01
    memorization_calibration: int = 2000
    memorization_n: int = 2000  # generated images per run checked for near-copies (0: all n)
    batch_size: int = 250


@dataclass
class RealData:
    """The real images evaluation compares against; `held_out` marks test-split images (no BloodNet saw them).

    `dataset` is a file-name-safe label of the source (it names feature-cache entries)."""

    images: np.ndarray
    labels: np.ndarray
    split: str = "all"
    size: int = 28
    dataset: str = DEFAULT_DATASET
    held_out: np.ndarray | None = None
    class_names: tuple[str, ...] = CLASS_NAMES

    @classmethod
    def load(cls, split: str = "all", size: int = 28, data_dir=None, dataset: str = DEFAULT_DATASET) -> RealData:
        data = load_data(dataset, split, size, data_dir)
        held_out = data.splits == "test"
        return cls(data.images, data.labels, split, size, dataset_label(dataset), held_out, data.class_names)

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.class_names))


@dataclass(frozen=True)
class Upsample:
    """Generated images resized from `source` to `target` px by `method` (PIL, uint8 in and out) before
    scoring: a small model scored at a larger resolution, and labelled so, never silently."""

    method: str
    source: int
    target: int

    def __post_init__(self) -> None:
        if self.method not in UPSAMPLE_METHODS:
            raise UsageError(f"unknown --upsample {self.method!r}; choose from: {', '.join(UPSAMPLE_METHODS)}")
        if self.target <= self.source:
            raise UsageError(f"--upsample only enlarges: {self.source} px images cannot be upsampled to {self.target}")

    @property
    def suffix(self) -> str:
        """What a model's label gains: ' (28->64 bicubic)'."""
        return f" ({self.source}->{self.target} {self.method})"

    def record(self) -> dict:
        return {"method": self.method, "from": self.source, "to": self.target}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC at `source` -> uint8 NHWC at `target` (PIL's bicubic rounds and clamps to 0..255)."""
        from PIL import Image

        if images.shape[1:3] != (self.source, self.source):
            raise ValueError(f"expected {self.source} px images to upsample, got shape {images.shape}")
        size = (self.target, self.target)
        resized = [np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BICUBIC)) for im in images]
        return np.stack(resized) if resized else np.zeros((0, *size, images.shape[-1]), np.uint8)


@dataclass
class Sample:
    """One side of a comparison: features, class labels, uint8 images, and for real images their row
    in RealData (so memorization can leave each image itself out)."""

    features: Features
    labels: np.ndarray
    images: np.ndarray
    real_index: np.ndarray | None = None
    predictions: np.ndarray | None = None


@dataclass
class Evaluation:
    results: dict
    memorization_pairs: np.ndarray | None = None  # uint8 picture: generated row over nearest-real row
    extra: dict = field(default_factory=dict)


def metric_names(extractor_name: str) -> dict[str, str]:
    """Result keys: FID/KID/IS keep their usual names only for Inception; other feature spaces carry
    the extractor's name, so a BloodNet distance can never be quoted as an FID."""
    suffix = "" if extractor_name == "inception" else f"_{extractor_name}"
    fd = "fid" if extractor_name == "inception" else f"fd_{extractor_name}"
    names = {"fd": fd, "class_fd": f"class_{fd}"}
    for base in ("kid", "is", "precision", "recall", "density", "coverage", "one_nn_accuracy"):
        names[base] = base + suffix
    for base in ("one_nn_real_accuracy", "one_nn_fake_accuracy"):
        names[base] = base + suffix
    return names


def summarize(values: Sequence[float]) -> dict:
    """mean, sample std (ddof=1; 0 for one run) and the values of each run."""
    values = [float(v) for v in values]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "runs": values}


def check_protocol(protocol: Protocol, real: RealData, extractor: FeatureExtractor, classifier) -> None:
    n, total = protocol.n, len(real.labels)
    if isinstance(protocol.runs, bool) or protocol.runs < 1:
        raise UsageError(f"--runs must be at least 1, got {protocol.runs}")
    if n < 2 or n > total:
        raise UsageError(f"--n must be between 2 and the {total} real images of split {real.split!r}, got {n}")
    if n > GEN_SEED_STRIDE:
        raise UsageError(f"--n above {GEN_SEED_STRIDE} would reuse generation seeds across runs")
    smallest = min(n, floor_size(protocol, real)) if protocol.with_floor else n
    if {"pr", "dc"} & set(protocol.metrics) and smallest <= protocol.nearest_k:
        raise UsageError(f"precision/recall need more than k={protocol.nearest_k} images per set (also in the floor)")
    if "is" in protocol.metrics and not extractor.has_probs:
        raise UsageError(f"the {extractor.name} extractor gives no class probabilities: leave out 'is'")
    if "is" in protocol.metrics and smallest < protocol.is_splits:
        raise UsageError(f"the Inception Score needs at least {protocol.is_splits} images per set (also in the floor)")
    if "accuracy" in protocol.metrics and classifier is None:
        raise UsageError("'accuracy' needs the BloodNet classifier (--bloodnet PATH), or leave it out with --metrics")


def floor_size(protocol: Protocol, real: RealData) -> int:
    return min(protocol.n, len(real.labels) // 2)


def evaluate(
    pipe,
    extractor: FeatureExtractor,
    real: RealData,
    protocol: Protocol,
    *,
    classifier=None,
    cache_dir: Path | None = None,
    sampling_kwargs: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume_dir: Path | None = None,
    upsample: Upsample | None = None,
) -> Evaluation:
    """Run the protocol for one pipeline; `classifier` (a BloodNetExtractor) scores class accuracy.

    The generated images must come out at `real.size`, or be brought there by `upsample`. With `resume_dir`,
    each finished run is kept there, so an interrupted evaluation goes on from the next run; a kept run is
    only used for the same protocol and the same weights (`run_key`)."""
    check_protocol(protocol, real, extractor, classifier)
    sampling_kwargs = sampling_kwargs or {}
    names = metric_names(extractor.name)
    real_features = cached_features(
        extractor,
        real.images,
        dataset=real.dataset,
        size=real.size,
        split=real.split,
        cache_dir=cache_dir,
        progress=progress,
        log=log,
    )
    threshold = None
    if "memorization" in protocol.metrics:
        count = min(protocol.memorization_calibration, len(real.labels))
        log(f"memorization: calibrating the near-copy threshold on {count} real images")
        threshold = M.memorization_threshold(
            real.images, protocol.memorization_quantile, protocol.memorization_calibration, seed=protocol.seed
        )
    real_accuracy = reference_accuracy(real, classifier, extractor, real_features, protocol)

    sampling = sampling_record(pipe, sampling_kwargs)
    record = protocol_record(protocol, real, extractor, classifier, threshold, sampling, upsample)
    fingerprint = pipeline_fingerprint(pipe)
    key = run_key(record, fingerprint)
    runs, pairs = [], None
    for r in range(protocol.runs):
        seed = protocol.seed + r
        kept = kept_run(resume_dir, r, key)
        if kept is not None:
            run, kept_pairs = kept
            runs.append(run)
            pairs = kept_pairs if r == 0 else pairs
            log(f"run {r + 1}/{protocol.runs} (seed {seed}): kept from {resume_dir}")
            continue
        rng = np.random.default_rng(seed)
        index = rng.choice(len(real.labels), protocol.n, replace=False)
        real_sample = Sample(real_features.subset(index), real.labels[index], real.images[index], index)
        fake, timing = generated_sample(
            pipe, extractor, protocol, seed * GEN_SEED_STRIDE, sampling_kwargs, progress, real, upsample
        )
        if "accuracy" in protocol.metrics:
            fake.predictions = predictions(classifier, extractor, fake)
        scores, per_class, best = score_pair(real_sample, fake, real, protocol, names, threshold, rng)
        run = {"seed": seed, "gen_seed": seed * GEN_SEED_STRIDE, "metrics": scores, "per_class": per_class}
        run["timing"] = timing
        if protocol.with_floor:
            run["floor"] = real_floor(real, real_features, protocol, names, threshold, rng)
        runs.append(run)
        if r == 0 and best is not None:
            pairs = pairs_picture(fake.images, real.images, best)
        if resume_dir is not None:
            keep_run(resume_dir, r, key, run, pairs if r == 0 else None)
        log(f"run {r + 1}/{protocol.runs} (seed {seed}): " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    results = {
        "protocol": record,
        "model_sha256": fingerprint,
        "metrics": {k: summarize([run["metrics"][k] for run in runs]) for k in runs[0]["metrics"]},
        "per_class": aggregate_per_class(runs, real.class_names),
        "timing": {k: summarize([run["timing"][k] for run in runs]) for k in runs[0]["timing"]},
        "machine": cpu_name(),  # timings compare only on one machine; reused results may come from others
        "runs": runs,
    }
    if protocol.with_floor:
        results["floor"] = {k: summarize([run["floor"][k] for run in runs]) for k in runs[0]["floor"]}
    if real_accuracy is not None:
        results.setdefault("floor", {})["class_accuracy"] = summarize([real_accuracy])
    return Evaluation(results, pairs)


def pipeline_fingerprint(pipe) -> str:
    """sha256 of every component's weights and config, and of the pipeline's own settings (its default
    guidance and steps; not its provenance): what makes two pipelines the same model."""
    import torch

    digest = hashlib.sha256()
    settings = {k: v for k, v in dict(pipe.config).items() if not k.startswith("_") and k not in pipe.components}
    settings.pop("provenance", None)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, component in sorted(pipe.components.items()):
        config = {k: v for k, v in dict(getattr(component, "config", None) or {}).items() if not k.startswith("_")}
        digest.update(f"{name}|{json.dumps(config, sort_keys=True, default=str)}".encode())
        if isinstance(component, torch.nn.Module):
            for key, tensor in component.state_dict().items():
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_key(record: dict, fingerprint: str) -> dict:
    """What a kept run must match to be used again: the protocol and the model's weights."""
    return json.loads(json.dumps({"protocol": record, "model_sha256": fingerprint}, default=float))


def keep_run(folder: Path, r: int, key: dict, run: dict, pairs: np.ndarray | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if pairs is not None:
        with atomic_path(folder / "pairs.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, pairs, allow_pickle=False)
    with atomic_path(folder / f"run_{r}.json") as tmp:
        tmp.write_text(json.dumps({"key": key, "run": run}, default=float))


def kept_run(folder: Path | None, r: int, key: dict | None) -> tuple[dict, np.ndarray | None] | None:
    """Run r as kept by `keep_run`, or None where it is absent, unreadable or made differently."""
    file = None if folder is None else folder / f"run_{r}.json"
    if file is None or not file.is_file():
        return None
    try:
        kept = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if kept.get("key") != key:
        return None
    pairs_file = folder / "pairs.npy"
    pairs = np.load(pairs_file, allow_pickle=False) if r == 0 and pairs_file.is_file() else None
    return kept["run"], pairs


def generated_sample(
    pipe,
    extractor,
    protocol: Protocol,
    gen_seed: int,
    sampling_kwargs: dict,
    progress: bool,
    real: RealData,
    upsample: Upsample | None = None,
):
    """n generated images, their classes in the real data's proportions or balanced, at the real data's size
    (upsampled first with `upsample`; the sampling time leaves the resize out)."""
    labels = plan_labels(protocol.n, None, protocol.distribution, real.class_counts)
    started = time.perf_counter()
    batches = list(
        generate(pipe, labels, seed=gen_seed, batch_size=protocol.batch_size, progress=progress, **sampling_kwargs)
    )
    sampling_s = time.perf_counter() - started
    images = np.concatenate([b[0] for b in batches])
    images = at_real_size(images, real.size, upsample)
    started = time.perf_counter()
    features = extractor.extract(images, progress=progress, desc=f"generated {extractor.name}")
    timing = {
        "sampling_s": sampling_s,
        "images_per_s": len(images) / max(sampling_s, 1e-9),
        "features_s": time.perf_counter() - started,
    }
    return Sample(features, labels, images), timing


def at_real_size(images: np.ndarray, size: int, upsample: Upsample | None) -> np.ndarray:
    """Generated images at the real data's `size`: as they are, or upsampled; any other size is refused (a
    feature extractor would resize them silently and the pixel metrics could not compare them)."""
    made = images.shape[1]
    if upsample is not None and made == upsample.source:
        images = upsample(images)
    if images.shape[1:3] != (size, size):
        how = f" after --upsample to {upsample.target} px" if upsample is not None else ""
        raise UsageError(f"the model makes {made} px images{how}, but the real images are {size} px")
    return images


def predictions(classifier, extractor: FeatureExtractor, sample: Sample) -> np.ndarray:
    """Class predictions; when the classifier is the extractor, its probabilities are already there."""
    if classifier is extractor:
        return sample.features.probs.argmax(axis=1)
    return classifier.classify(sample.images)


def reference_accuracy(real: RealData, classifier, extractor, real_features: Features, protocol) -> float | None:
    """BloodNet's accuracy on real held-out (test-split) images: the value a perfect generator would get."""
    if "accuracy" not in protocol.metrics:
        return None
    mask = real.held_out if real.held_out is not None and real.held_out.any() else np.ones(len(real.labels), bool)
    if classifier is extractor:
        predicted = real_features.probs[mask].argmax(axis=1)
    else:
        predicted = classifier.classify(real.images[mask])
    return float((predicted == real.labels[mask]).mean())


def score_pair(real: Sample, fake: Sample, data: RealData, protocol: Protocol, names: dict, threshold, rng):
    """All chosen metrics for one real/generated pair: (scalars, per-class values, nearest copies)."""
    chosen, scores, per_class, copies = set(protocol.metrics), {}, {}, None
    rf, ff = real.features.features, fake.features.features
    if "fd" in chosen:
        scores[names["fd"]] = M.fd_from_features(rf, ff)
    if "kid" in chosen:
        scores[names["kid"]] = M.kernel_inception_distance(
            rf, ff, protocol.kid_subsets, protocol.kid_subset_size, seed=protocol.seed
        )
    if "is" in chosen:
        scores[names["is"]] = M.inception_score(fake.features.probs, protocol.is_splits)[0]
    if {"pr", "dc"} & chosen:
        prdc = M.precision_recall_density_coverage(rf, ff, protocol.nearest_k)
        keys = (["precision", "recall"] if "pr" in chosen else []) + (["density", "coverage"] if "dc" in chosen else [])
        scores.update({names[k]: prdc[k] for k in keys})
    if "1nn" in chosen:
        scores.update({names[k]: v for k, v in M.one_nn_accuracy(rf, ff).items()})
    if "class-fd" in chosen:
        by_class = M.per_class_fd(rf, real.labels, ff, fake.labels, len(data.class_names))
        per_class[names["fd"]] = {data.class_names[c]: v for c, v in by_class.items()}
        scores[names["class_fd"]] = float(np.mean(list(by_class.values())))
    if "memorization" in chosen:
        limit = protocol.memorization_n or len(fake.labels)
        picked = np.sort(rng.choice(len(fake.labels), min(limit, len(fake.labels)), replace=False))
        exclude = None if fake.real_index is None else fake.real_index[picked]  # real images skip themselves
        copies = M.nearest_copies(fake.images[picked], data.images, exclude=exclude)
        copies["query"] = picked
        scores["memorization"] = float((copies["distance"] <= threshold).mean())
        scores["nearest_real_distance_median"] = float(np.median(copies["distance"]))
    if "accuracy" in chosen and fake.predictions is not None:
        correct = fake.predictions == fake.labels
        scores["class_accuracy"] = float(correct.mean())
        per_class["class_accuracy"] = {
            data.class_names[c]: float(correct[fake.labels == c].mean())
            for c in range(len(data.class_names))
            if (fake.labels == c).any()
        }
    return scores, per_class, copies


def real_floor(real: RealData, features: Features, protocol: Protocol, names: dict, threshold, rng) -> dict:
    """The same metrics between two disjoint random halves of the real data (the second half plays 'generated')."""
    size = floor_size(protocol, real)
    order = rng.permutation(len(real.labels))
    a, b = order[:size], order[size : 2 * size]
    half_a = Sample(features.subset(a), real.labels[a], real.images[a], a)
    half_b = Sample(features.subset(b), real.labels[b], real.images[b], b)
    chosen = tuple(m for m in protocol.metrics if m != "accuracy")
    floor_protocol = Protocol(**{**asdict(protocol), "n": size, "metrics": chosen})
    return score_pair(half_a, half_b, real, floor_protocol, names, threshold, rng)[0]


def aggregate_per_class(runs: list[dict], class_names: tuple[str, ...] = CLASS_NAMES) -> dict:
    """metric -> class -> summary over the runs in which the class had enough images."""
    out = {}
    for metric in runs[0]["per_class"]:
        out[metric] = {}
        for name in class_names:
            values = [run["per_class"][metric][name] for run in runs if name in run["per_class"][metric]]
            if values:
                out[metric][name] = summarize(values)
    return out


def pairs_picture(generated: np.ndarray, reference: np.ndarray, copies: dict, count: int = 16) -> np.ndarray:
    """The `count` generated images closest to a real image (top row, oriented like their match) over
    those real images (bottom row), enlarged for viewing."""
    closest = np.argsort(copies["distance"])[:count]
    top = np.stack(
        [M.flips(generated[q : q + 1])[copies["flip"][i]][0] for i, q in zip(closest, copies["query"][closest])]
    )
    bottom = reference[copies["index"][closest]]
    scale = max(1, 84 // reference.shape[1])  # 3x at 28 px, as they are from 64 px on
    return upscale(make_grid(np.concatenate([top, bottom]), nrow=len(closest)), scale)


def protocol_record(
    protocol: Protocol, real: RealData, extractor, classifier, threshold, sampling_kwargs, upsample=None
) -> dict:
    """The protocol as results record it: `size` is the resolution everything was scored at, `upsample` how
    the generated images got there (None: made at that size)."""
    record = asdict(protocol)
    record.update(
        dataset=real.dataset,
        class_names=list(real.class_names),
        split=real.split,
        size=real.size,
        upsample=None if upsample is None else upsample.record(),
        num_real_images=len(real.labels),
        metrics=list(protocol.metrics),
        seeds=[protocol.seed + r for r in range(protocol.runs)],
        gen_seeds=[(protocol.seed + r) * GEN_SEED_STRIDE for r in range(protocol.runs)],
        extractor={"name": extractor.name, "identity": extractor.identity},
        classifier=None if classifier is None else {"name": "bloodnet", "identity": classifier.identity},
        floor_n=floor_size(protocol, real) if protocol.with_floor else None,
        memorization_threshold=threshold,
        sampling=sampling_kwargs,
    )
    return record
