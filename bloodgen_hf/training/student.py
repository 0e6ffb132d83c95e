"""A few-step student of a flow-matching DDPM teacher, as a TrainTask on the shared core.

The student is the teacher's UNet, started from the teacher's weights, trained by one of two methods:

reflow (Liu et al. 2023, "2-rectified flow"): the guided teacher maps noise z to an image x at its
default sampler. `bloodgen-hf sample --format npz` records those images with each image's seed, and
the seed regenerates z exactly (TeacherPairs). The student learns the straight path between them,
x_t = (1 - t) x + t z with target z - x. A straight path needs few Euler steps. The guidance is in the
pairs, so the student samples at guidance 1, with one UNet pass per step. Two options follow Lee et al.
2024 ("Improving the training of rectified flows"): `--reflow-time u-shaped` draws t from the symmetric
U shape p(t) ∝ exp(4t) + exp(4(1 - t)), which puts the training where a few-step sampler evaluates (its
first step at t = 1, its last near 0); `--reflow-loss pseudo-huber` replaces the squared error by
sqrt(|d|² + c²) - c per image (Song & Dhariwal 2023), which lets fewer hard pairs dominate the gradient.
`--adversarial-weight λ` adds a GAN term on the same forward pass (as adversarial diffusion distillation,
Sauer et al. 2023, does): the student's one-step image estimate x_t - t v is scored by a class-conditional
projection discriminator (the GAN family's) that learns, one hinge update per step, to tell those estimates
from real images of the teacher's own training split, drawn to the batch's classes. Regression alone can at
best copy the teacher; the adversarial term pulls the few-step samples towards the real images themselves.

consistency (Song et al. 2023, consistency distillation, with the stop-gradient target of Song &
Dhariwal 2023): on real images, noised to t_{n+1} on a grid of `--cd-intervals`, one guided teacher
Euler step gives x at t_n. The student's image estimate f(x, t) = x - t v(x, t) at t_{n+1} regresses
onto its own no-gradient estimate at the teacher's point. f(x, 0) = x holds by construction, so
f(noise, 1) is an image in one pass.

An LDM teacher (BloodLDMPipeline, training/latent.py) is distilled by reflow in its latent space. Its pairs are
(noise latent, the teacher's output latent, undecoded): the student draws them itself with the teacher's default
sampler, steps and guidance (fp32, output_type="latent") into the folder `--pairs`, `--num-pairs` of them from seed
`--pairs-seed` on (the label of seed s is s mod the class count), PAIRS_CHUNK to a file, each file written whole or
not at all. A stopped draw keeps its finished files and the next run draws only the missing ones; a resumed or
later student reads the same files, refused if other weights drew them. The noise is regenerated from the seeds as
for pixels. The student UNet (the teacher's, copied) trains on them exactly as on pixels. `--adversarial-weight`
decodes the one-step latent estimates through the teacher's frozen decoder, gradients passing through it, and
scores the decoded images against real images at the teacher's image size (`--resolution 64` for 16x16 latents
of a 4x autoencoder): one more decoder pass, forward and backward, per step, which costs about ten times the rest of
a step at 64 px on a CPU (`ldm-64`'s card): there it fine-tunes a finished student (`--init-from`). Consistency
distillation needs a pixel teacher.

Both save the teacher's pipeline class (an LDM teacher's: BloodLDMPipeline with its autoencoder, the same weights
and latent scale): flow DPM-Solver++ (a plain Euler step at 1 step), guidance 1,
`--sampler-steps` steps by default, its sigmas shifted towards noise by `--sampler-shift` (diffusers'
`flow_shift`: sigma' = s sigma / (1 + (s - 1) sigma); at 2 steps, s = 2 moves the middle step from 0.5 to 0.67).
Its provenance is the teacher's data, with the teacher in `distilled_from`, so the checks of
bloodgen_hf/provenance.py follow the teacher (and an LDM teacher's `autoencoder` entry, which the student keeps).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from diffusers import UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from bloodgen_hf.data import CLASS_NAMES, LabelledImages, same_classes
from bloodgen_hf.errors import UsageError
from bloodgen_hf.guard import output_lock
from bloodgen_hf.io import atomic_path, remove_temporaries
from bloodgen_hf.models.gan import ConditionalDiscriminator
from bloodgen_hf.pipelines import BloodLDMPipeline
from bloodgen_hf.pipelines.pipeline_bloodgen_ddpm import BloodDDPMPipeline, in_guidance_interval, is_flow
from bloodgen_hf.provenance import ALL_SPLITS, origin_record, pipeline_provenance, splits_seen
from bloodgen_hf.training.core import TrainConfig, run_training
from bloodgen_hf.training.ddpm import DDPMTask, UNetOptimization, build_noise_scheduler, unet_optimization
from bloodgen_hf.training.gan_losses import discriminator_loss, frozen_scores, generator_loss
from bloodgen_hf.training.latent import LatentImages
from bloodgen_hf.training.options import add_dataclass_arguments, option, options_of
from bloodgen_hf.training.sources import load_training_data, weights_origin

METHODS = ("reflow", "consistency")
REFLOW_TIMES = ("uniform", "u-shaped")  # the first of each is the default
REFLOW_LOSSES = ("mse", "pseudo-huber")
U_SHAPE = 4.0  # a in p(t) ∝ exp(a t) + exp(a (1 - t)); Lee et al. 2024 use a = 4
MINIBATCH_STD_GROUP = 4  # the discriminator's, as the GAN's default
PAIRS_CHUNK = 1000  # an LDM teacher's latent pairs per cache file: a stopped draw loses at most one file's work
DRAW_BATCH = 250  # pairs per teacher call while drawing (fixed: a file's latents must not depend on a setting)


@dataclass
class StudentOptions(UNetOptimization):
    """The student's flags (after UNetOptimization's, whose learning rate and EMA decay are lower here)."""

    lr: float = option(1e-4, "AdamW peak learning rate")
    ema_max_decay: float = option(0.999)
    teacher: str = option(
        "", "the flow-matching DDPM or LDM to distil: a bundled name, folder or Hub id", required=True
    )
    method: str = option("reflow", "see bloodgen_hf/training/student.py", choices=METHODS)
    # A run from before several files recorded one string; load_pairs takes either.
    pairs: list[str] | str | None = option(
        None,
        "reflow: `bloodgen-hf sample --model TEACHER --format npz` output; several files join (seeds apart). "
        "An LDM teacher: one folder, where the student draws --num-pairs latent pairs and keeps them",
        nargs="+",
        metavar="NPZ_OR_DIR",
    )
    num_pairs: int | None = option(
        None, "reflow of an LDM teacher: how many (noise, latent) pairs to draw into --pairs (a stopped draw goes on)"
    )
    pairs_seed: int = option(0, "reflow of an LDM teacher: the seed of its first pair (pair i: seed + i)")
    teacher_guidance: float | None = option(
        None,
        "consistency: guidance of the teacher's steps (default: the teacher's own); reflow takes it from the pairs",
    )
    cd_intervals: int = option(20, "consistency: teacher Euler steps over [0, 1]")
    reflow_time: str = option(REFLOW_TIMES[0], "reflow: how t is drawn (see the module)", choices=REFLOW_TIMES)
    reflow_loss: str = option(REFLOW_LOSSES[0], "reflow: the velocity loss", choices=REFLOW_LOSSES)
    adversarial_weight: float = option(
        0.0, "reflow: weight of the discriminator term on the one-step estimates (0: off; see the module)"
    )
    lr_d: float = option(4e-4, "--adversarial-weight: discriminator Adam LR")
    d_base_channels: int = option(32, "--adversarial-weight: discriminator width (the GAN's is 64)")
    sampler_steps: int = option(2, "saved pipeline's default steps")
    sampler_shift: float = option(1.0, "saved pipeline's flow_shift (above 1: steps nearer noise)")
    grid_per_class: int = option(8, "images per class row in sample grids")


def add_student_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """StudentOptions as --flags, for a parser built by hand (run_training adds them itself)."""
    return add_dataclass_arguments(parser, StudentOptions)


def reflow_times(n: int, kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """n times in [0, 1]: uniform, or U-shaped (a mixture of exp(a t) and its mirror, drawn by inverse CDF)."""
    u = torch.rand(n, device=device)
    if kind == "uniform":
        return u
    t = torch.log1p(u * math.expm1(U_SHAPE)) / U_SHAPE  # density ∝ exp(a t) on [0, 1]
    return torch.where(torch.rand(n, device=device) < 0.5, 1 - t, t)


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over images of sqrt(|d|² + c²) - c, with c = 0.00054 sqrt(dimensions) (Song & Dhariwal 2023)."""
    d = (prediction - target).flatten(1)
    c = 0.00054 * math.sqrt(d.shape[1])
    return (torch.sqrt(d.pow(2).sum(1) + c**2) - c).mean()


class TeacherPairs(LabelledImages):
    """Teacher images with the noise each was drawn from: `batch` gives (images, labels, noise).

    Never flipped: a flipped image is not what the teacher made from that noise."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, noise: torch.Tensor, class_names) -> None:
        super().__init__(images, labels, flip=False, class_names=class_names)
        self.noise = noise

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = super().batch(indices)
        return images, labels, self.noise[indices]


class ClassMatchedImages:
    """Real images drawn to a batch's labels, one per label (with replacement, from the global RNG, which a
    checkpoint restores), so the discriminator compares each class's estimates with that class's images."""

    def __init__(self, dataset: LabelledImages, num_classes: int) -> None:
        self.dataset = dataset
        self.order = torch.argsort(dataset.labels, stable=True)
        self.counts = torch.bincount(dataset.labels, minlength=num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        missing = [dataset.class_names[i] for i in range(num_classes) if self.counts[i] == 0]
        if missing:
            raise UsageError(f"--adversarial-weight needs real images of every class; none of {', '.join(missing)}")

    def draw(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.cpu()
        offsets = (torch.rand(len(labels)) * self.counts[labels]).long()
        return self.dataset.batch(self.order[self.starts[labels] + offsets])[0]


def adversarial_images(config: TrainConfig) -> LabelledImages:
    """The real images of --split the discriminator learns from (flipped: cells have no orientation), loaded
    once: the provenance counts them before the task is built, and the task then draws from them."""
    return _load_flipped(config.split, config.resolution, config.data_dir, config.dataset)


@functools.lru_cache(maxsize=1)
def _load_flipped(split: str, resolution: int, data_dir: str | None, dataset: str) -> LabelledImages:
    return LabelledImages.load(split, resolution, data_dir, True, dataset)


def pipeline_noise(seeds: np.ndarray, shape: tuple[int, ...], init_noise_sigma: float = 1.0) -> torch.Tensor:
    """The starting noise BloodDDPMPipeline drew for images made with per-image generators seeded `seeds`
    (bloodgen_hf.sampling.generate): the same randn_tensor call, so the pairs match bit for bit."""
    chunks = []
    for start in range(0, len(seeds), 1024):
        chunk = seeds[start : start + 1024]
        generators = [torch.Generator().manual_seed(int(s)) for s in chunk]
        chunks.append(randn_tensor((len(chunk), *shape), generator=generators) * init_noise_sigma)
    return torch.cat(chunks)


def load_teacher(name: str) -> BloodDDPMPipeline:
    """The teacher: a flow-matching BloodDDPMPipeline (pixel pairs) or BloodLDMPipeline (latent pairs), exactly
    those classes, whose kind decides the pairs and the student's saved class."""
    from bloodgen_hf.registry import load_pipeline, resolve_model

    teacher = load_pipeline(name, PartialState().device)
    if type(teacher) not in (BloodDDPMPipeline, BloodLDMPipeline) or not is_flow(teacher.scheduler.config):
        kind = type(teacher).__name__ + (" without flow matching" if isinstance(teacher, BloodDDPMPipeline) else "")
        raise UsageError(
            f"--teacher {name} ({resolve_model(name)}) is a {kind}; distillation needs a "
            "BloodDDPMPipeline or BloodLDMPipeline trained with --prediction-type flow"
        )
    return teacher


def is_latent(teacher: BloodDDPMPipeline) -> bool:
    return isinstance(teacher, BloodLDMPipeline)


def teacher_image_shape(teacher: BloodDDPMPipeline) -> tuple[int, int]:
    """(channels, size) of the teacher's images: its samples, or an LDM's samples decoded by its autoencoder."""
    size = teacher.unet.config.sample_size
    if is_latent(teacher):
        return teacher.vae.config.out_channels, size * teacher.vae_scale_factor
    return teacher.unet.config.in_channels, size


# What a teacher's pairs were drawn with; pairs of one student must share them (else it learns two maps).
SAMPLER_SETTINGS = ("guidance_scale", "num_inference_steps", "scheduler", "guidance_interval")


def teacher_interval(teacher) -> list[float] | None:
    """The guidance interval the teacher samples with by default (None: every step guided)."""
    return interval_list(teacher.config.get("default_guidance_interval"))


def interval_list(interval) -> list[float] | None:
    """A guidance interval as JSON records it, so one drawn into a file and a teacher's default compare equal."""
    return None if interval is None else [float(x) for x in interval]


def outside_guidance_interval(t: torch.Tensor, interval: list[float] | None) -> torch.Tensor:
    """Which noise levels t in [0, 1] a teacher with this guidance interval leaves unguided (its pipeline's test)."""
    return ~in_guidance_interval(t, interval)


class PairsFile(NamedTuple):
    """One npz of teacher pairs, checked against the teacher (load_pairs_file)."""

    images: np.ndarray
    labels: np.ndarray
    seeds: np.ndarray
    noise: torch.Tensor
    class_names: tuple[str, ...]
    drawn: dict[str, Any]  # how: file, count, seed, sampler settings, precision


def load_pairs(
    paths: str | list[str], teacher_name: str, teacher: BloodDDPMPipeline
) -> tuple[TeacherPairs, dict[str, Any]]:
    """The pairs in one or more npz files written by `bloodgen-hf sample --model TEACHER --format npz`, and how
    they were drawn: the settings they share, and each file's count, seed and precision.

    Refused, in one line each: a file of another kind, pairs drawn by another model or by other weights in the
    same folder (a retrained teacher), other classes or image size; across files, another sampler setting (the
    student would learn two different maps) or a seed drawn twice (the same noise would count twice)."""
    files = pairs_paths(paths)
    parts = [load_pairs_file(path, teacher_name, teacher) for path in files]
    first = parts[0].drawn
    for part in parts[1:]:
        for key in SAMPLER_SETTINGS:
            if part.drawn[key] != first[key]:
                raise UsageError(
                    f"{part.drawn['file']} was drawn at {key} {part.drawn[key]}, {first['file']} at {first[key]}; "
                    "pairs of one student need one teacher setting"
                )
    unique, counts = np.unique(np.concatenate([part.seeds for part in parts]), return_counts=True)
    if (counts > 1).any():
        twice = [part.drawn["file"] for part in parts if np.isin(part.seeds, unique[counts > 1]).any()]
        raise UsageError(
            f"seed {int(unique[counts > 1][0])} is in more than one pair (files {', '.join(twice)}): "
            "draw new pairs with a --seed past the others"
        )
    dataset = TeacherPairs(
        np.concatenate([part.images for part in parts]),
        np.concatenate([part.labels for part in parts]),
        torch.cat([part.noise for part in parts]),
        parts[0].class_names,
    )
    record = {
        "num_pairs": len(dataset),
        **{key: first[key] for key in SAMPLER_SETTINGS},
        "files": [{k: v for k, v in part.drawn.items() if k not in SAMPLER_SETTINGS} for part in parts],
    }
    return dataset, record


def load_pairs_file(path: str, teacher_name: str, teacher: BloodDDPMPipeline) -> PairsFile:
    """One npz of pairs (see load_pairs)."""
    from bloodgen_hf.evaluation.protocol import pipeline_fingerprint
    from bloodgen_hf.registry import resolve_model

    file = Path(path).expanduser()
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in ("images", "labels", "seeds", "class_names", "info")}
    except (OSError, KeyError, ValueError) as err:
        raise UsageError(f"{file} is not an archive written by `bloodgen-hf sample --format npz` ({err})") from None
    info = json.loads(str(arrays["info"]))
    drawn_by = resolve_model(str(info.get("model"))).resolve()
    if drawn_by != resolve_model(teacher_name).resolve():
        raise UsageError(f"{file} holds images of {info.get('model')} ({drawn_by}), not of --teacher {teacher_name}")
    drawn_sha, teacher_sha = str(info.get("model_sha256")), pipeline_fingerprint(teacher)
    if drawn_sha != teacher_sha:
        raise UsageError(
            f"{file} was drawn by other weights than --teacher {teacher_name} holds now "
            f"(model_sha256 {drawn_sha[:12]}, not {teacher_sha[:12]}); draw new pairs"
        )
    names = tuple(str(n) for n in arrays["class_names"])
    if not same_classes(names, teacher.class_names or CLASS_NAMES):
        raise UsageError(f"{file} has classes {list(names)}, the teacher {teacher.class_names}")
    images, labels = arrays["images"], arrays["labels"]
    size = teacher.unet.config.sample_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or len(labels) != len(images):
        raise UsageError(f"{file} holds images of shape {images.shape}; the teacher makes {size}x{size} RGB")
    shape = (teacher.unet.config.in_channels, size, size)
    noise = pipeline_noise(arrays["seeds"], shape, getattr(teacher.scheduler, "init_noise_sigma", 1.0))
    drawn = {
        "file": str(file),
        "num_pairs": len(images),
        "seed": info.get("seed"),
        "guidance_scale": info.get("guidance_scale", teacher.config.default_guidance_scale),
        "num_inference_steps": info.get("num_inference_steps", teacher.default_steps()),
        "scheduler": info.get("scheduler", type(teacher.scheduler).__name__),  # `sample` records what was set
        "guidance_interval": interval_list(info.get("guidance_interval", teacher_interval(teacher))),
        "precision": info.get("precision", "fp32"),  # pairs from before --precision were drawn in fp32
    }
    return PairsFile(images, labels, arrays["seeds"], noise, names, drawn)


class LatentPairs(LatentImages):
    """An LDM teacher's output latents with the noise latent each was drawn from: `batch` gives (latents, labels,
    noise). Never flipped: a flipped latent is not what the teacher made from that noise."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor, class_names) -> None:
        super().__init__(latents.unsqueeze(0), labels, flip=False, class_names=class_names)
        self.noise = noise

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latents, labels = super().batch(indices)
        return latents, labels, self.noise[indices]


def pair_files(folder: Path, first_seed: int, count: int) -> list[tuple[Path, np.ndarray]]:
    """The cache files of seeds first_seed .. first_seed + count - 1, PAIRS_CHUNK a file, each with its seeds; a
    file is named by its first and last seed, so other counts or seeds add files and never change one."""
    end = first_seed + count
    chunks = [np.arange(start, min(start + PAIRS_CHUNK, end)) for start in range(first_seed, end, PAIRS_CHUNK)]
    return [(folder / f"pairs-{seeds[0]:09d}-{seeds[-1]:09d}.npz", seeds) for seeds in chunks]


def latent_pairs_info(teacher_name: str, teacher: BloodLDMPipeline) -> dict[str, Any]:
    """How latent pairs are drawn, as each cache file records it: the weights (and settings) by their hash."""
    from bloodgen_hf.evaluation.protocol import pipeline_fingerprint

    return {
        "model": teacher_name,
        "model_sha256": pipeline_fingerprint(teacher),
        "guidance_scale": teacher.config.default_guidance_scale,
        "num_inference_steps": teacher.default_steps(),
        "scheduler": type(teacher.scheduler).__name__,
        "guidance_interval": teacher_interval(teacher),
        "precision": "fp32",
    }


@torch.no_grad()
def teacher_latents(teacher: BloodLDMPipeline, seeds: np.ndarray) -> torch.Tensor:
    """The teacher's output latents [N, C, h, w] at its default sampler, steps and guidance (fp32), image i of
    class seeds[i] mod the class count, drawn with its own CPU generator seeded seeds[i]: pipeline_noise
    regenerates its starting noise bit for bit, on any device."""
    parts = []
    for start in range(0, len(seeds), DRAW_BATCH):
        batch = seeds[start : start + DRAW_BATCH]
        generators = [torch.Generator().manual_seed(int(s)) for s in batch]
        labels = (batch % teacher.num_classes).tolist()
        parts.append(teacher(class_labels=labels, generator=generators, output_type="latent").images.float().cpu())
    return torch.cat(parts)


def draw_missing_pairs(files: list[tuple[Path, np.ndarray]], info: dict[str, Any], teacher: BloodLDMPipeline) -> None:
    """Draw the cache files not there yet, holding the folder's lock (a second drawer is refused), after clearing
    the temporaries of a killed draw; each file is written whole or not at all, and none is replaced."""
    if all(path.exists() for path, _ in files):
        return
    folder = files[0][0].parent
    folder.mkdir(parents=True, exist_ok=True)
    with output_lock(folder):
        for path, _ in files:
            remove_temporaries(path)
        missing = [(path, seeds) for path, seeds in files if not path.exists()]
        teacher.set_progress_bar_config(disable=True)
        with tqdm(total=sum(len(seeds) for _, seeds in missing), desc="pairs", unit="pair") as bar:
            for path, seeds in missing:
                arrays = {
                    "latents": teacher_latents(teacher, seeds).numpy(),
                    "labels": seeds % teacher.num_classes,
                    "seeds": seeds,
                    "info": np.asarray(json.dumps(info)),
                }
                with atomic_path(path, overwrite=False) as tmp, open(tmp, "wb") as f:
                    np.savez(f, **arrays)
                bar.update(len(seeds))


def load_latent_pairs_file(
    path: Path, seeds: np.ndarray, info: dict[str, Any], teacher: BloodLDMPipeline
) -> torch.Tensor:
    """The latents [N, C, h, w] of one cache file, refused in one line unless these weights drew them for `seeds`."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("latents", "labels", "seeds", "info")}
        drawn = json.loads(str(arrays["info"]))
    except (OSError, KeyError, ValueError) as err:
        raise UsageError(f"{path} is not a file of latent pairs drawn by `train student` ({err}); delete it") from None
    drawn_sha, teacher_sha = str(drawn.get("model_sha256")), info["model_sha256"]
    if drawn_sha != teacher_sha:
        raise UsageError(
            f"{path} was drawn by other weights than --teacher {info['model']} holds now "
            f"(model_sha256 {drawn_sha[:12]}, not {teacher_sha[:12]}); pass another --pairs folder"
        )
    size = teacher.unet.config.sample_size
    shape = (len(seeds), teacher.unet.config.in_channels, size, size)
    labels = seeds % teacher.num_classes
    same_seeds = np.array_equal(arrays["seeds"], seeds) and np.array_equal(arrays["labels"], labels)
    if arrays["latents"].shape != shape or not same_seeds:
        raise UsageError(
            f"{path} does not hold the latents {shape} of seeds {seeds[0]}-{seeds[-1]} its name says; delete it"
        )
    return torch.from_numpy(arrays["latents"]).float()


def latent_pairs(o: StudentOptions, teacher: BloodLDMPipeline) -> tuple[LatentPairs, dict[str, Any]]:
    """An LDM teacher's pairs from the folder --pairs, the missing files drawn first (by the main process, the
    others waiting), and how they were drawn, as load_pairs records pixel pairs."""
    folder = Path(pairs_paths(o.pairs)[0]).expanduser()
    files = pair_files(folder, o.pairs_seed, o.num_pairs)
    info = latent_pairs_info(o.teacher, teacher)
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            draw_missing_pairs(files, info, teacher)
    latents = torch.cat([load_latent_pairs_file(path, seeds, info, teacher) for path, seeds in files])
    seeds = np.concatenate([seeds for _, seeds in files])
    noise = pipeline_noise(seeds, tuple(latents.shape[1:]), getattr(teacher.scheduler, "init_noise_sigma", 1.0))
    labels = torch.from_numpy(seeds % teacher.num_classes)
    dataset = LatentPairs(latents, labels, noise, tuple(teacher.class_names or CLASS_NAMES))
    shared = {key: info[key] for key in SAMPLER_SETTINGS}
    drawn = {"file": str(folder), "num_pairs": len(seeds), "seed": o.pairs_seed, "precision": info["precision"]}
    return dataset, {"num_pairs": len(seeds), **shared, "space": "latent", "files": [drawn]}


def pairs_paths(pairs: list[str] | str | None) -> list[str]:
    """--pairs as a list (a run from before several files recorded one string)."""
    return [pairs] if isinstance(pairs, str) else list(pairs or [])


def load_student_data(config: TrainConfig) -> tuple[LabelledImages, dict[str, Any]]:
    """reflow: the teacher's pairs, with the teacher's provenance; consistency: the real images of --split.
    Either way `distilled_from` names the teacher and its own provenance, and `init_from` the student's
    --init-from (on --resume, the one its run started with)."""
    o = options_of(StudentOptions, config.extra)
    teacher = load_teacher(o.teacher)
    check_student_options(o, config, teacher)
    if o.method == "consistency":
        dataset, provenance = load_training_data(config)
        provenance["distilled_from"] = origin_record(o.teacher)
        return dataset, provenance
    dataset, drawn = latent_pairs(o, teacher) if is_latent(teacher) else load_pairs(o.pairs, o.teacher, teacher)
    provenance = dict(pipeline_provenance(teacher) or {})
    if not provenance:
        raise UsageError(f"--teacher {o.teacher} records no training data (provenance); retrain it with a script")
    provenance["distilled_from"] = {**origin_record(o.teacher), "pairs": drawn}
    provenance["init_from"] = origin_record(weights_origin(config))  # the student's own start, not the teacher's
    if o.adversarial_weight > 0:
        provenance["adversarial"] = adversarial_record(config, provenance)
    return dataset, provenance


def adversarial_record(config: TrainConfig, teacher_provenance: dict[str, Any]) -> dict[str, Any]:
    """What the discriminator saw: real images of a split the teacher was trained on, so the student's
    provenance (the teacher's data) stays true; any other split is refused."""
    seen = splits_seen(teacher_provenance)
    if (ALL_SPLITS not in seen and config.split not in seen) or config.dataset != teacher_provenance.get("dataset"):
        raise UsageError(
            f"--adversarial-weight trains on --split {config.split} of {config.dataset}, but the teacher saw split "
            f"{teacher_provenance.get('split')!r} of {teacher_provenance.get('dataset')}; pass its split"
        )
    real = adversarial_images(config)
    return {"dataset": config.dataset, "split": config.split, "resolution": config.resolution, "num_images": len(real)}


def check_student_options(o: StudentOptions, config: TrainConfig, teacher: BloodDDPMPipeline) -> None:
    """Refuse, in one line and before any pair is drawn, options that do not fit the method or the teacher."""
    latent = is_latent(teacher)
    if latent and o.method != "reflow":
        raise UsageError(f"--method {o.method} needs a pixel teacher; distil an LDM teacher with --method reflow")
    if not latent and (o.num_pairs is not None or o.pairs_seed != 0):
        raise UsageError(
            "--num-pairs and --pairs-seed draw an LDM teacher's latent pairs; draw a pixel teacher's with "
            "`bloodgen-hf sample --model TEACHER --format npz`"
        )
    if o.method == "reflow":
        if latent:
            check_latent_pairs_options(o)
        elif not o.pairs:
            raise UsageError(
                "--method reflow needs --pairs, teacher images with their seeds: "
                "`bloodgen-hf sample --model TEACHER --format npz --n 20000 --out pairs.npz`"
            )
        if config.flip:
            raise UsageError("--flip would break the (noise, image) pairs of --method reflow; leave it off")
        if config.subset_fraction is not None:
            raise UsageError("--subset-fraction picks real images; --method reflow trains on the teacher's pairs")
        if o.adversarial_weight < 0 or not math.isfinite(o.adversarial_weight):
            raise UsageError(f"--adversarial-weight must be >= 0 (0 turns it off), got {o.adversarial_weight}")
        if o.d_base_channels < 1:
            raise UsageError(f"--d-base-channels must be at least 1, got {o.d_base_channels}")
        if o.adversarial_weight > 0 and config.batch_size % MINIBATCH_STD_GROUP:
            raise UsageError(
                f"--adversarial-weight needs a --batch-size divisible by {MINIBATCH_STD_GROUP} (the discriminator's "
                f"minibatch-std groups), got {config.batch_size}"
            )
        size = teacher_image_shape(teacher)[1]
        if o.adversarial_weight > 0 and config.resolution != size:
            raise UsageError(
                f"--adversarial-weight compares the student's {size}x{size} images with real ones at --resolution "
                f"{config.resolution}; pass --resolution {size}"
            )
    elif o.pairs:
        raise UsageError("--pairs is for --method reflow; consistency distillation trains on the real images")
    elif o.adversarial_weight:
        raise UsageError("--adversarial-weight is for --method reflow")
    elif (o.reflow_time, o.reflow_loss) != (REFLOW_TIMES[0], REFLOW_LOSSES[0]):  # set away from the defaults
        raise UsageError("--reflow-time and --reflow-loss are for --method reflow")
    if o.cd_intervals < 1:
        raise UsageError(f"--cd-intervals must be at least 1, got {o.cd_intervals}")
    if o.sampler_steps < 1:
        raise UsageError(f"--sampler-steps must be at least 1, got {o.sampler_steps}")
    if not (math.isfinite(o.sampler_shift) and o.sampler_shift > 0):
        raise UsageError(f"--sampler-shift must be above 0 (1 leaves the sigmas as they are), got {o.sampler_shift}")


def check_latent_pairs_options(o: StudentOptions) -> None:
    """An LDM teacher's --pairs is one folder (not `bloodgen-hf sample` output) with --num-pairs to draw there."""
    paths = pairs_paths(o.pairs)
    if not paths or o.num_pairs is None:
        raise UsageError(
            "--method reflow of an LDM teacher needs --pairs DIR and --num-pairs N: the folder where the student "
            "draws N (noise, latent) pairs with the teacher and keeps them"
        )
    if len(paths) != 1:
        raise UsageError(f"an LDM teacher's --pairs is one folder (its latent pairs are kept there), got {len(paths)}")
    if Path(paths[0]).expanduser().is_file():
        raise UsageError(
            f"--pairs {paths[0]} is a file; an LDM teacher's --pairs is the folder where the student draws the "
            "teacher's latents (`bloodgen-hf sample` writes decoded images, not those)"
        )
    if o.num_pairs < 1:
        raise UsageError(f"--num-pairs must be at least 1, got {o.num_pairs}")
    if o.pairs_seed < 0:
        raise UsageError(f"--pairs-seed must be >= 0, got {o.pairs_seed}")


@dataclass
class StudentTask(DDPMTask):
    options: StudentOptions = field(default_factory=StudentOptions)
    teacher: BloodDDPMPipeline | None = None
    teacher_guidance: float = 1.0  # consistency: of the teacher's steps (--teacher-guidance, else the teacher's own)
    real: ClassMatchedImages | None = None  # --adversarial-weight: what the discriminator learns from

    @classmethod
    def build(cls, config: TrainConfig, num_images: int, class_names: tuple[str, ...] = CLASS_NAMES) -> StudentTask:
        o = options_of(StudentOptions, config.extra)
        teacher = load_teacher(o.teacher)
        for model in teacher.components.values():  # the UNet, and an LDM's autoencoder (decoded through, not trained)
            if isinstance(model, torch.nn.Module):
                model.requires_grad_(False).eval()
        if not same_classes(tuple(class_names), teacher.class_names or CLASS_NAMES):
            raise UsageError(f"the data's classes {list(class_names)} are not the teacher's {teacher.class_names}")
        unet = UNet2DModel.from_config(teacher.unet.config)
        unet.load_state_dict(teacher.unet.state_dict())
        optimizer, lr_scheduler, ema = unet_optimization(unet, o, config, num_images)
        steps = teacher.scheduler.config["num_train_timesteps"]
        guidance = teacher.config.default_guidance_scale if o.teacher_guidance is None else o.teacher_guidance
        models, optimizers, real = {"unet": unet}, {"unet": optimizer}, None
        if o.method == "reflow" and o.adversarial_weight > 0:
            channels, size = teacher_image_shape(teacher)  # --resolution (check_student_options)
            models["discriminator"] = ConditionalDiscriminator(
                resolution=size,
                num_classes=len(class_names),
                base_channels=o.d_base_channels,
                in_channels=channels,
                minibatch_std_group=MINIBATCH_STD_GROUP,
            )
            optimizers["discriminator"] = torch.optim.Adam(
                models["discriminator"].parameters(),
                lr=o.lr_d,
                betas=(0.0, 0.9),  # the GAN's TTUR settings
            )
            real = ClassMatchedImages(adversarial_images(config), len(class_names))
        return cls(
            init_components={"unet": "unet"},
            models=models,
            optimizers=optimizers,
            schedulers={"lr": lr_scheduler},
            noise_scheduler=build_noise_scheduler("squaredcos_cap_v2", "flow", steps),
            ema=ema,
            ema_of="unet",
            options=o,
            class_names=tuple(teacher.class_names or class_names),
            sampler_shift=o.sampler_shift,  # saved with dpm++ at guidance 1: the teacher's guidance is distilled in
            teacher=teacher,
            teacher_guidance=guidance,
            real=real,
        )

    @property
    def pipeline_class(self) -> type[BloodDDPMPipeline]:
        """What it saves: the teacher's class (BloodDDPMPipeline, or BloodLDMPipeline for an LDM teacher)."""
        return type(self.teacher)

    def pipeline_components(self, accelerator: Accelerator) -> dict[str, torch.nn.Module]:
        """The EMA UNet with the teacher's other models: an LDM teacher's autoencoder (its latents and scale)."""
        kept = {name: c for name, c in self.teacher.components.items() if name not in ("unet", "scheduler")}
        return {**kept, **super().pipeline_components(accelerator)}

    def training_step(
        self, images: torch.Tensor, labels: torch.Tensor, accelerator: Accelerator, noise: torch.Tensor | None = None
    ) -> dict[str, float]:
        if self.options.method == "consistency":
            return self.optimize(self.consistency_loss(images, labels), accelerator)
        loss, estimate = self.reflow_loss(images, labels, noise)
        if self.real is None:
            return self.optimize(loss, accelerator)
        # the estimate as an image: an LDM's latents decoded, with gradients through the frozen decoder
        adversarial, metrics = self.adversarial_loss(self.teacher.decode(estimate), labels, accelerator)
        total = loss + self.options.adversarial_weight * adversarial
        return {**self.optimize(total, accelerator), "loss_reflow": loss.item(), **metrics}

    def velocity(self, unet, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return unet(x, t * self.noise_scheduler.config.num_train_timesteps, class_labels=labels).sample

    def reflow_loss(
        self, images: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The velocity loss on the straight path, and the one-step image estimate x_t - t v it implies."""
        t = reflow_times(len(images), self.options.reflow_time, images.device).view(-1, 1, 1, 1)
        noisy = (1 - t) * images + t * noise
        prediction = self.velocity(self.models["unet"], noisy, t.flatten(), labels).float()
        target = (noise - images).float()
        estimate = noisy - t * prediction
        if self.options.reflow_loss == "pseudo-huber":
            return pseudo_huber(prediction, target), estimate
        return F.mse_loss(prediction, target), estimate

    def adversarial_loss(
        self, estimate: torch.Tensor, labels: torch.Tensor, accelerator: Accelerator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One hinge update of the discriminator on class-matched real images against the (detached) estimated
        images, then the student's hinge term through the frozen discriminator (as GANTask does)."""
        d, optimizer = self.models["discriminator"], self.optimizers["discriminator"]
        real = self.real.draw(labels).to(estimate.device)
        scores = d(torch.cat([real, estimate.detach()]), torch.cat([labels, labels])).float()
        real_scores, fake_scores = scores[: len(labels)], scores[len(labels) :]
        d_loss = discriminator_loss("hinge", real_scores, fake_scores)
        accelerator.backward(d_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        adversarial = generator_loss("hinge", frozen_scores(accelerator, d, estimate, labels).float())
        metrics = {
            "loss_d": d_loss.item(),
            "score_real": real_scores.mean().item(),
            "score_fake": fake_scores.mean().item(),
        }
        return adversarial, {**metrics, "loss_adversarial": adversarial.item()}

    def consistency_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, intervals = len(images), self.options.cd_intervals
        step = torch.randint(0, intervals, (n,), device=images.device)
        t_low, t_high = step / intervals, (step + 1) / intervals
        low, high = t_low.view(-1, 1, 1, 1), t_high.view(-1, 1, 1, 1)
        x_high = (1 - high) * images + high * torch.randn_like(images)
        unet = self.models["unet"]
        with torch.no_grad():
            scale = self.teacher_guidance
            timesteps = t_high * self.noise_scheduler.config.num_train_timesteps
            v = self.teacher.guided_prediction(x_high, timesteps, labels, scale)
            unguided = outside_guidance_interval(t_high, teacher_interval(self.teacher))
            if scale != 1 and unguided.any():  # the teacher's own sampler runs its model alone at these levels
                v[unguided] = self.teacher.guided_prediction(
                    x_high[unguided], timesteps[unguided], labels[unguided], 1.0
                )
            x_low = x_high - (high - low) * v
            target = x_low - low * self.velocity(unet, x_low, t_low, labels)
        estimate = x_high - high * self.velocity(unet, x_high, t_high, labels)
        return F.mse_loss(estimate.float(), target.float())


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    """Entry point of `train_scripts/train_student.py` and `bloodgen-hf train student`."""
    return run_training(
        "Distil a flow-matching DDPM or LDM teacher into a few-step student (reflow or consistency distillation).",
        StudentTask.build,
        StudentOptions,
        load_student_data,
        argv,
        prog,
        output_dir="runs/ddpm-student",
        epochs=10,
        batch_size=64,
        flip=False,
        split="train",  # consistency: the real images the study may use; `all` would add the test split
    )
