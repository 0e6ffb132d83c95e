"""The one training loop every model family shares.

A model family supplies a `TrainTask` (its modules, optimizers, one `training_step`, a sample grid and how
to save its pipeline) and its options (a dataclass whose fields are its flags: training/options.py); this
file does the rest: Accelerate set-up, deterministic data order, gradient accumulation, logging, sample
grids, checkpoints and exact resume. Read `train()` top to bottom.

Its parts have their own modules: launch.py checks how the processes were started; run_folder.py guards
the output folder (one run writes it at a time, a folder that holds a run is only continued with
`--resume` or replaced with `--overwrite`); checkpoint.py writes and reads atomic checkpoints; resume.py
checks a resumed run's settings against those its checkpoint recorded; sources.py loads the images a run
trains on and records their provenance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError
from tqdm.auto import tqdm

from bloodgen_hf.data import DataError, LabelledImages
from bloodgen_hf.errors import UsageError, explain
from bloodgen_hf.guard import OutputLockedError, output_lock, plain
from bloodgen_hf.io import atomic_path, reason, save_image
from bloodgen_hf.process import cpu_name, native_bf16, sigterm_exits, tune_malloc
from bloodgen_hf.provenance import LeakError, portable_provenance
from bloodgen_hf.training.checkpoint import CheckpointError, load_checkpoint, resolve_resume, save_checkpoint
from bloodgen_hf.training.cost import training_cost, write_training_cost
from bloodgen_hf.training.launch import LaunchError, check_launch, check_launch_environment, cpu_threads, launch_command
from bloodgen_hf.training.options import add_dataclass_arguments, option, options_from_args, options_record
from bloodgen_hf.training.resume import check_resume_settings
from bloodgen_hf.training.run_folder import prepare_output_dir, trim_metrics


class ErrorExit(SystemExit):
    """Prints `error: <message>` on stderr and exits with `code` (2: bad input or usage, 1: a failure
    while working or a bug, see bloodgen_hf/errors.py); str() is that line, so callers and tests can read it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code)
        self.message = f"error: {message}"
        print(self.message, file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return self.message


def cpu_minute_marks(text: str) -> tuple[float, ...]:
    """`--checkpoint-cpu-minutes 15,30,60`: positive CPU minutes, sorted ('' = none)."""
    try:
        marks = tuple(sorted({float(m) for m in text.split(",") if m.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated minutes such as 15,30,60, got {text!r}") from None
    if not all(math.isfinite(m) and m > 0 for m in marks):
        raise argparse.ArgumentTypeError(f"takes positive minutes, got {text!r}")
    return marks


@dataclass
class TrainConfig:
    output_dir: str = "runs/model"
    dataset: str = "bloodmnist"  # a MedMNIST flag, an ImageFolder, a `datasets` folder or Hub id (bloodgen_hf.data)
    data_dir: str | None = None
    resolution: int = 28  # images are centre-cropped and resized to this size
    split: str = "all"
    batch_size: int = 64
    epochs: int = 10
    max_steps: int | None = None  # optimizer steps; stops before `epochs` if reached
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    flip: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0  # steps between sample grids; 0 = once per epoch
    log_every: int = 20
    log_with: str = "tensorboard"  # or "none"
    resume: str | None = None  # a checkpoint folder, or "latest"
    overwrite: bool = False  # replace a run already in output_dir (deletes its checkpoints and pipeline)
    init_from: str | None = None  # start from a bundled model, a saved pipeline folder or a Hub repo's weights
    balanced_batches: bool = False  # draw every class equally often (with replacement), not in proportion
    # Train on the class-stratified subset of --split that augment-study gives its classifier at this fraction
    # and seed (bloodgen_hf.provenance.real_subset); the pipeline's provenance records the indices' count and hash.
    subset_fraction: float | None = None
    subset_seed: int = 0
    cpu_budget_minutes: float | None = None  # stop after this much process CPU time (ablations at equal cost)
    # Also checkpoint at the first step past each of these process CPU minutes (benchmarks/quality_vs_cpu.py
    # scores them); such checkpoints record their marks and are kept whatever --keep-checkpoints says.
    checkpoint_cpu_minutes: tuple[float, ...] = option(
        (),
        "also write a checkpoint when the run's process CPU time first passes each of these minutes, e.g. "
        "15,30,60,120,240; those checkpoints are never pruned by --keep-checkpoints",
        type=cpu_minute_marks,
        metavar="M1,M2,...",
    )
    # Torch threads per process on CPU; None = the usable cores / processes. `accelerate launch` sets
    # OMP_NUM_THREADS=1, which left one of two cores idle in a single-process run.
    cpu_threads: int | None = None
    # The model family's own options: its options dataclass (DDPMOptions, GANOptions, ...; a plain dict of them
    # is read as one), recorded flat under "extra" in train_config.json.
    extra: Any = option(factory=dict, flag=False)


@dataclass
class TrainTask:
    """What a model family hands to `train`. Subclasses fill these in and define the methods."""

    models: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any] = field(default_factory=dict)
    # `--init-from`: model key -> the saved pipeline's component holding its weights ("" = the folder
    # is that model itself, as for BloodNet). Models not named here start from scratch.
    init_components: dict[str, str] = field(default_factory=dict)
    # The data it trains on (bloodgen_hf.provenance); run_training fills it, save_pipeline saves it (provenance.json).
    provenance: dict[str, Any] | None = None

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, accelerator: Accelerator) -> dict[str, float]:
        """One (micro-)batch; a dataset whose `batch` gives more per-image tensors passes them on after
        `accelerator` (the distillation pairs' noise)."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called once per optimizer step (after accumulation): EMA updates go here."""

    def extra_state(self) -> dict[str, Any]:
        """State besides models and optimizers (e.g. EMA weights) that a checkpoint must hold."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def after_init_from(self) -> None:
        """Called after `--init-from` replaced the weights (so an EMA can start from them)."""

    def sample_grid(self, accelerator: Accelerator) -> torch.Tensor:
        """uint8 [N,H,W,3] images for the progress grid, one row per class."""
        raise NotImplementedError

    def save_pipeline(self, accelerator: Accelerator, path: Path) -> None:
        raise NotImplementedError


@dataclass
class EMATask(TrainTask):
    """A TrainTask that samples and saves an EMA (diffusers EMAModel) of `models[ema_of]`."""

    ema: EMAModel | None = None
    ema_of: str = ""

    def after_optimizer_step(self) -> None:
        self.ema.step(self.models[self.ema_of].parameters())

    def extra_state(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
        self.ema.to(next(self.models[self.ema_of].parameters()).device)

    def after_init_from(self) -> None:
        for shadow, param in zip(self.ema.shadow_params, self.models[self.ema_of].parameters()):
            shadow.data.copy_(param.data)

    def ema_model(self, accelerator: Accelerator) -> torch.nn.Module:
        """A copy of the live model (buffers such as batch-norm statistics included) with the EMA weights."""
        live = accelerator.unwrap_model(self.models[self.ema_of])
        copy = type(live).from_config(live.config).to(accelerator.device)
        copy.load_state_dict(live.state_dict())
        self.ema.copy_to(copy.parameters())
        return copy.eval()


def crossed_marks(marks: tuple[float, ...], cpu_before: float, cpu_now: float) -> list[float]:
    """The CPU-minute marks a step passed: above the CPU seconds before it, at or below those after it."""
    return [m for m in marks if cpu_before < m * 60 <= cpu_now]


def add_train_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Every TrainConfig field as a --flag, so each train script only adds its model's options."""
    return add_dataclass_arguments(parser, TrainConfig, **defaults)


def config_from_args(args: argparse.Namespace, options: type | None = None) -> TrainConfig:
    """The TrainConfig of parsed flags, its `extra` the family's `options` dataclass (without one: a dict of
    the flags that are not TrainConfig's)."""
    config = options_from_args(args, TrainConfig)
    if options is not None:
        config.extra = options_from_args(args, options)
    else:
        names = {f.name for f in fields(TrainConfig)}
        config.extra = {k: v for k, v in vars(args).items() if k not in names}
    return config


def config_record(config: TrainConfig) -> dict[str, Any]:
    """The config as train_config.json records it: the shared options, and the family's as a dict under "extra"."""
    return {**config.__dict__, "extra": options_record(config.extra)}


def run_settings(config: TrainConfig, num_processes: int) -> dict[str, Any]:
    """Everything that defines the run, flat (shared and model options), as recorded in each checkpoint."""
    shared = {k: v for k, v in config.__dict__.items() if k != "extra"}
    return plain({**shared, **options_record(config.extra), "num_processes": num_processes})


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator that also works multi-process on CPU, and refuses a broken launch."""
    check_launch_environment()  # before Accelerator(), which would wait for ranks that never come
    try:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=None if config.log_with == "none" else config.log_with,
            project_dir=config.output_dir,
        )
    except ValueError as err:  # Accelerate's refusal of --mixed-precision or --log-with, with the valid choices
        raise UsageError(str(err)) from err
    check_launch(accelerator)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(config.cpu_threads, accelerator.num_processes))
        if config.mixed_precision == "bf16" and not native_bf16() and accelerator.is_main_process:
            print(f"warning: {cpu_name()} has no bf16 units; bf16 is emulated there and slower than fp32", flush=True)
    return accelerator


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """[num_batches, batch_size] indices for this rank: a permutation fixed by (seed, epoch).

    With `labels`, the epoch is n draws with replacement in which every class is equally likely
    (rare classes repeat, common ones are subsampled), still fixed by (seed, epoch).
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if labels is None:
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.multinomial(class_balanced_weights(labels), n, replacement=True, generator=generator)
    per_step = batch_size * world
    if n < per_step:
        raise UsageError(f"{n} images cannot fill one batch of {batch_size} x {world} processes")
    return order[: n // per_step * per_step].view(-1, world, batch_size)[:, rank]


def class_balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-image sampling weights 1 / (count of its class): each class gets the same total weight."""
    counts = torch.bincount(labels)
    return 1.0 / counts[labels].double()


def total_optimizer_steps(config: TrainConfig, num_images: int, num_processes: int = 1) -> int:
    """The optimizer steps `train` runs (whole batches per process, after accumulation), which
    learning-rate schedules that span the run need to know before it starts."""
    steps_per_epoch = num_images // (config.batch_size * num_processes) // config.gradient_accumulation_steps
    return min(config.max_steps or 10**12, steps_per_epoch * config.epochs)


def check_whole_batch(config: TrainConfig, num_images: int, num_processes: int) -> None:
    """Refuse data too small for one optimizer step, which would otherwise save an untrained model."""
    if total_optimizer_steps(config, num_images, num_processes) == 0 and config.epochs > 0:
        per_step = config.batch_size * num_processes * config.gradient_accumulation_steps
        raise UsageError(
            f"{num_images} training images make no whole batch of {per_step} (--batch-size {config.batch_size}"
            f" x {num_processes} processes x {config.gradient_accumulation_steps} accumulation); lower --batch-size"
        )


def train(task: TrainTask, config: TrainConfig, accelerator: Accelerator, dataset: LabelledImages) -> Path:
    """Train until `epochs` or `max_steps`; returns the folder of the saved pipeline.

    The main process holds the output folder's lock throughout, so a second run into it is refused.
    SIGTERM stops the run as Ctrl-C does (exit 143); the next run clears what a killed one left.
    """
    out = Path(config.output_dir)
    Path(os.path.abspath(out)).parent.mkdir(parents=True, exist_ok=True)
    with sigterm_exits(), output_lock(out) if accelerator.is_main_process else contextlib.nullcontext():
        return train_locked(task, config, accelerator, dataset)


def train_locked(task: TrainTask, config: TrainConfig, accelerator: Accelerator, dataset: LabelledImages) -> Path:
    out = Path(config.output_dir)
    check_whole_batch(config, len(dataset), accelerator.num_processes)
    settings = run_settings(config, accelerator.num_processes)
    prepare_output_dir(out, config.resume, config.overwrite, accelerator.is_main_process)
    checkpoint = resolve_resume(out, config.resume) if config.resume else None
    if checkpoint is not None:
        check_resume_settings(checkpoint, settings)
    accelerator.wait_for_everyone()
    if config.init_from and not config.resume:  # a resumed run takes its weights from the checkpoint
        init_from_pretrained(task, config.init_from)
    names = list(task.models)
    prepared = accelerator.prepare(*task.models.values(), *task.optimizers.values())
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    task.models = dict(zip(names, prepared[: len(names)]))
    task.optimizers = dict(zip(task.optimizers, prepared[len(names) :]))

    total_steps = total_optimizer_steps(config, len(dataset), accelerator.num_processes)
    step, epoch, batch_in_epoch, cpu_used, machines = 0, 0, 0, 0.0, []
    set_seed(config.seed + accelerator.process_index)  # per-rank noise; weights were seeded before
    if checkpoint is not None:
        step, epoch, batch_in_epoch, cpu_used, machines = load_checkpoint(task, accelerator, checkpoint)
        if accelerator.is_main_process:
            trim_metrics(out / "metrics.jsonl", step)
    check_cpu_budget(config, accelerator)
    if cpu_name() not in machines:  # CPU minutes buy different work on another CPU
        machines.append(cpu_name())
    cpu_started = time.process_time() - cpu_used
    cpu_before = cpu_used  # CPU seconds at the last step, for --checkpoint-cpu-minutes
    balance_labels = dataset.labels if config.balanced_batches else None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        launch = {"command": launch_command(accelerator.num_processes), "num_processes": accelerator.num_processes}
        with atomic_path(out / "train_config.json") as tmp:
            recorded = {**config_record(config), **launch, "provenance": task.provenance}
            tmp.write_text(json.dumps(recorded, indent=2, default=str))
    if config.log_with != "none":
        accelerator.init_trackers("logs", config={k: str(v) for k, v in config_record(config).items()})

    with tqdm(
        total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train"
    ) as bar:  # closed on errors too, so an error line starts a line
        started, seen = time.time(), 0
        while step < total_steps:
            order = epoch_batches(
                len(dataset),
                config.batch_size,
                config.seed,
                epoch,
                accelerator.process_index,
                accelerator.num_processes,
                balance_labels,
            )
            for idx in order[batch_in_epoch:]:
                # (images, labels) and whatever else a dataset holds per image (TeacherPairs: the noise)
                images, labels, *extra = (t.to(accelerator.device) for t in dataset.batch(idx))
                with accelerator.accumulate(*task.models.values()):
                    metrics = task.training_step(images, labels, accelerator, *extra)
                batch_in_epoch += 1
                seen += len(idx) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                task.after_optimizer_step()
                step += 1
                bar.update(1)
                cpu_used = time.process_time() - cpu_started
                if config.cpu_budget_minutes and cpu_used >= config.cpu_budget_minutes * 60:
                    total_steps = step  # the budget is spent: log, checkpoint and save as at a planned end
                if step % config.log_every == 0 or step == total_steps:
                    metrics = {
                        **metrics,
                        "epoch": epoch,
                        "images_per_s": seen / (time.time() - started),
                        "cpu_minutes": cpu_used / 60,
                    }
                    log_metrics(accelerator, out, step, metrics, config.log_with != "none")
                    bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k != "epoch"})
                if config.sample_every and step % config.sample_every == 0:
                    save_sample_grid(task, accelerator, out / "samples" / f"step_{step:07d}.png")
                marks = crossed_marks(tuple(config.checkpoint_cpu_minutes), cpu_before, cpu_used)
                cpu_before = cpu_used
                if step % config.checkpoint_every == 0 or step == total_steps or marks:
                    progress = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "cpu_seconds": cpu_used}
                    progress["machines"] = machines
                    progress.update({"cpu_marks": marks} if marks else {})  # kept by save_checkpoint's pruning
                    save_checkpoint(task, accelerator, out, progress, config.keep_checkpoints, settings)
                if step >= total_steps:
                    break
            if batch_in_epoch == len(order):  # the epoch is complete
                epoch, batch_in_epoch = epoch + 1, 0
                if not config.sample_every:
                    save_sample_grid(task, accelerator, out / "samples" / f"epoch_{epoch:04d}.png")
    accelerator.wait_for_everyone()
    pipeline_dir = out / "pipeline"
    cpu_own = torch.tensor([cpu_used], dtype=torch.float64, device=accelerator.device)  # float64: as progress.json
    cpu_all = accelerator.reduce(cpu_own, reduction="sum").item()
    if accelerator.is_main_process:
        cost = training_cost(cpu_all, step, machines, task.provenance)
        save_final_pipeline(task, accelerator, pipeline_dir, cost, replace=checkpoint is not None)
    accelerator.end_training()
    return pipeline_dir


def save_final_pipeline(task: TrainTask, accelerator: Accelerator, folder: Path, cost: dict, replace: bool) -> None:
    """Write pipeline/ atomically, with what the run cost (training/cost.py). Only a resumed run replaces one; a
    fresh run refuses a pipeline that appeared while it trained (the folder held none when it started)."""
    try:
        with atomic_path(folder, is_dir=True, overwrite=replace) as tmp:
            task.save_pipeline(accelerator, tmp)
            write_training_cost(tmp, cost)
    except FileExistsError:
        raise
    except (OSError, SafetensorError) as err:
        raise OSError(
            f"could not save the pipeline to {folder} ({reason(err)}); the checkpoints are kept, so "
            "`--resume latest` saves it once there is room"
        ) from err


def init_from_pretrained(task: TrainTask, source: str) -> None:
    """Copy the weights of a bundled model, saved folder or Hub repo into the task's models (step 0),
    refusing a source whose architecture differs from the one this command builds."""
    from bloodgen_hf.registry import load_pretrained_component

    if not task.init_components:
        raise UsageError("--init-from is not supported for this model family")
    for key, component in task.init_components.items():
        model = task.models[key]
        pretrained = load_pretrained_component(source, component, type(model))
        check_same_architecture(model, pretrained, f"--init-from {source}" + (f" ({component})" if component else ""))
        model.load_state_dict(pretrained.state_dict())
    task.after_init_from()


# Config keys that a run measures from its data rather than builds (AutoencoderKL's latent scale, which
# training/autoencoder.py writes at the end): a model that starts from another may differ in them.
FITTED_CONFIG_KEYS = frozenset({"scaling_factor", "shift_factor"})


def check_same_architecture(model: torch.nn.Module, pretrained: torch.nn.Module, what: str) -> None:
    """Both models' configs (ConfigMixin) must agree on every public key but the fitted ones."""
    ours = {k: v for k, v in dict(model.config).items() if not k.startswith("_") and k not in FITTED_CONFIG_KEYS}
    theirs = {k: v for k, v in dict(pretrained.config).items() if not k.startswith("_") and k not in FITTED_CONFIG_KEYS}
    differing = sorted(k for k in ours.keys() | theirs.keys() if normalise(ours.get(k)) != normalise(theirs.get(k)))
    if differing:
        shown = ", ".join(
            f"{k}: {normalise(theirs.get(k))!r} there, {normalise(ours.get(k))!r} here" for k in differing[:4]
        )
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        raise UsageError(f"{what} has a different architecture from this run's ({shown}{more})")


def normalise(value: Any) -> Any:
    """Configs read back from JSON hold lists where freshly built ones hold tuples."""
    return [normalise(v) for v in value] if isinstance(value, (list, tuple)) else value


def log_metrics(accelerator: Accelerator, out: Path, step: int, metrics: dict, trackers: bool) -> None:
    if trackers:
        accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def save_sample_grid(task: TrainTask, accelerator: Accelerator, path: Path) -> None:
    if accelerator.is_main_process:
        save_image(task.sample_grid(accelerator), path)


def check_cpu_budget(config: TrainConfig, accelerator: Accelerator) -> None:
    """--cpu-budget-minutes and --checkpoint-cpu-minutes: positive, and with one process (each rank has its
    own CPU time, so ranks would stop or checkpoint at different steps and wait for each other forever)."""
    marks = tuple(config.checkpoint_cpu_minutes)
    if not all(isinstance(m, (int, float)) and math.isfinite(m) and m > 0 for m in marks):
        raise UsageError(f"--checkpoint-cpu-minutes takes positive minutes, got {list(marks)}")
    if marks and accelerator.num_processes > 1:
        raise UsageError("--checkpoint-cpu-minutes works with one process; use --checkpoint-every with several")
    if config.cpu_budget_minutes is None:
        return
    if not config.cpu_budget_minutes > 0:
        raise UsageError(f"--cpu-budget-minutes must be positive, got {config.cpu_budget_minutes}")
    if accelerator.num_processes > 1:  # each rank would stop at its own step and the others would wait forever
        raise UsageError("--cpu-budget-minutes works with one process; use --max-steps with several")


# Refusals besides UsageError (bloodgen_hf/errors.py): exit 2. Another OSError is a failure while working (exit 1).
BAD_INPUT = (
    LaunchError,
    DataError,
    CheckpointError,
    OutputLockedError,
    LeakError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
)


def train_parser(description: str, options: type, prog: str | None = None, **defaults) -> argparse.ArgumentParser:
    """A train script's flags: TrainConfig's (`defaults` replacing its own defaults), the family's `options`
    dataclass and --debug. `prog` names the command in usage and error lines (`bloodgen-hf train <family>`);
    None: argparse's own, the script's file name (`train_ldm.py`, under `accelerate launch` too)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_dataclass_arguments(add_train_arguments(parser, **defaults), options)
    parser.add_argument("--debug", action="store_true", help="On an error, print its traceback (BLOODGEN_DEBUG=1).")
    return parser


def run_training(
    description: str,
    build_task,
    options: type,
    load_data,
    argv: list[str] | None = None,
    prog: str | None = None,
    **defaults,
) -> Path:
    """What every train script's main() does: parse flags, set up Accelerate, load data, train.

    `options` is the family's options dataclass, whose fields become its flags (beside TrainConfig's, with
    `defaults` replacing TrainConfig's own defaults) and which arrives as `config.extra`; `prog` is the command
    that usage and error lines name (`train_parser`).
    `load_data(config)` gives the data and its provenance (most families: the real images,
    `sources.load_training_data`). `build_task(config, num_images, class_names)` makes the TrainTask; it
    gets the image count because learning-rate schedules that span the run need the number of steps before
    it starts, and the class names of the data, which size the models and are saved with them.

    Bad input (missing data, bad launch, bad checkpoint, a folder that holds a run or is in use) ends
    with one clear line and exit code 2; a failure while working (a full disk) with one line and 1; any
    other error, a bug, with one line that says so and 1 (--debug or BLOODGEN_DEBUG=1: its traceback too).
    """
    tune_malloc()
    args = train_parser(description, options, prog, **defaults).parse_args(argv)
    debug = vars(args).pop("debug")  # not a setting of the run: never recorded nor compared on --resume
    config = config_from_args(args, options)
    try:
        accelerator = make_accelerator(config)
        set_seed(config.seed)  # identical initial weights on every rank
        dataset, provenance = load_data(config)
        task = build_task(config, len(dataset), class_names=dataset.class_names)
        task.provenance = portable_provenance(provenance)  # no absolute paths in provenance.json
        pipeline_dir = train(task, config, accelerator, dataset)
    except Exception as err:
        from bloodgen_hf.registry import ModelLoadError  # lazily, as init_from_pretrained imports the registry

        code, message = explain(err, (*BAD_INPUT, ModelLoadError), debug=debug)
        raise ErrorExit(message, code) from None
    if accelerator.is_main_process:
        print(f"saved pipeline to {pipeline_dir}")
    return pipeline_dir
