"""The one training loop every model family shares.

A model family supplies a `TrainTask` (its modules, optimizers, one `training_step`, a sample grid
and how to save its pipeline); this file does the rest: Accelerate set-up and launch checks,
deterministic data order, gradient accumulation, logging, sample grids, atomic checkpoints and
exact resume. Read `train()` top to bottom.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from bloodgen_hf.data import BloodMNIST, DataError
from bloodgen_hf.io import atomic_path, save_image
from bloodgen_hf.training.checkpoint import load_state, rng_state, save_state, set_rng_state


class LaunchError(RuntimeError):
    """The processes were not started the way the user asked."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/model"
    data_dir: str | None = None
    resolution: int = 28
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
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainTask:
    """What a model family hands to `train`. Subclasses fill these in and define the methods."""

    models: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any] = field(default_factory=dict)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, accelerator: Accelerator) -> dict[str, float]:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called once per optimizer step (after accumulation): EMA updates go here."""

    def extra_state(self) -> dict[str, Any]:
        """State besides models and optimizers (e.g. EMA weights) that a checkpoint must hold."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

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

    def ema_model(self, accelerator: Accelerator) -> torch.nn.Module:
        """A copy of the live model (buffers such as batch-norm statistics included) with the EMA weights."""
        live = accelerator.unwrap_model(self.models[self.ema_of])
        copy = type(live).from_config(live.config).to(accelerator.device)
        copy.load_state_dict(live.state_dict())
        self.ema.copy_to(copy.parameters())
        return copy.eval()


def add_train_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Every TrainConfig field as a --flag, so each train script only adds its model's options."""
    config = TrainConfig(**defaults)
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            kind = int if f.type in ("int", "int | None") else str
            parser.add_argument(flag, type=kind, default=value)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)} - {"extra"}
    values = vars(args)
    return TrainConfig(**{k: values[k] for k in names}, extra={k: v for k, v in values.items() if k not in names})


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator that also works multi-process on CPU, and refuses a broken launch."""
    check_launch_environment()  # before Accelerator(), which would wait for ranks that never come
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.log_with == "none" else config.log_with,
        project_dir=config.output_dir,
    )
    check_launch(accelerator)
    return accelerator


def check_launch_environment() -> None:
    """`accelerate launch --cpu --num_processes N` starts ONE process with MASTER_ADDR set but no
    WORLD_SIZE; catch that instead of silently training on one process."""
    env = os.environ
    if "MASTER_ADDR" in env and "WORLD_SIZE" not in env and env.get("ACCELERATE_USE_CPU") is not None:
        raise LaunchError(
            "accelerate started 1 process although more were asked for: on CPU launch with "
            "`accelerate launch --multi_gpu --num_processes N` (not `--cpu --num_processes N`)"
        )


def check_launch(accelerator: Accelerator) -> None:
    """Every rank must see the same world: WORLD_SIZE processes, ranks 0..N-1."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if expected != accelerator.num_processes:
        raise LaunchError(
            f"launched {expected} processes but each sees {accelerator.num_processes}: the ranks "
            "cannot see each other (on CPU use `accelerate launch --multi_gpu --num_processes N`)"
        )
    if accelerator.num_processes > 1:
        ranks = accelerator.gather(torch.tensor([accelerator.process_index], device=accelerator.device))
        if sorted(ranks.tolist()) != list(range(accelerator.num_processes)):
            raise LaunchError(f"process ranks {ranks.tolist()} are not 0..{accelerator.num_processes - 1}")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """[num_batches, batch_size] indices for this rank: a permutation fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator)
    per_step = batch_size * world
    if n < per_step:
        raise ValueError(f"{n} images cannot fill one batch of {batch_size} x {world} processes")
    return order[: n // per_step * per_step].view(-1, world, batch_size)[:, rank]


def total_optimizer_steps(config: TrainConfig, num_images: int, num_processes: int = 1) -> int:
    """The optimizer steps `train` runs (whole batches per process, after accumulation), which
    learning-rate schedules that span the run need to know before it starts."""
    steps_per_epoch = num_images // (config.batch_size * num_processes) // config.gradient_accumulation_steps
    return min(config.max_steps or 10**12, steps_per_epoch * config.epochs)


def train(task: TrainTask, config: TrainConfig, accelerator: Accelerator, dataset: BloodMNIST) -> Path:
    """Train until `epochs` or `max_steps`; returns the folder of the saved pipeline."""
    out = Path(config.output_dir)
    names = list(task.models)
    prepared = accelerator.prepare(*task.models.values(), *task.optimizers.values())
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    task.models = dict(zip(names, prepared[: len(names)]))
    task.optimizers = dict(zip(task.optimizers, prepared[len(names) :]))

    total_steps = total_optimizer_steps(config, len(dataset), accelerator.num_processes)
    step, epoch, batch_in_epoch = 0, 0, 0
    set_seed(config.seed + accelerator.process_index)  # per-rank noise; weights were seeded before
    if config.resume:
        step, epoch, batch_in_epoch = load_checkpoint(task, accelerator, resolve_resume(out, config.resume))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        launch = {"command": launch_command(accelerator.num_processes), "num_processes": accelerator.num_processes}
        (out / "train_config.json").write_text(json.dumps({**config.__dict__, **launch}, indent=2, default=str))
    if config.log_with != "none":
        accelerator.init_trackers("logs", config={k: str(v) for k, v in config.__dict__.items()})

    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    started, seen = time.time(), 0
    while step < total_steps:
        order = epoch_batches(
            len(dataset), config.batch_size, config.seed, epoch, accelerator.process_index, accelerator.num_processes
        )
        for idx in order[batch_in_epoch:]:
            images, labels = dataset.batch(idx)
            images, labels = images.to(accelerator.device), labels.to(accelerator.device)
            with accelerator.accumulate(*task.models.values()):
                metrics = task.training_step(images, labels, accelerator)
            batch_in_epoch += 1
            seen += len(idx) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            task.after_optimizer_step()
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == total_steps:
                metrics = {**metrics, "epoch": epoch, "images_per_s": seen / (time.time() - started)}
                log_metrics(accelerator, out, step, metrics, config.log_with != "none")
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k != "epoch"})
            if config.sample_every and step % config.sample_every == 0:
                save_sample_grid(task, accelerator, out / "samples" / f"step_{step:07d}.png")
            if step % config.checkpoint_every == 0 or step == total_steps:
                save_checkpoint(task, accelerator, out, step, epoch, batch_in_epoch, config.keep_checkpoints)
            if step >= total_steps:
                break
        if batch_in_epoch == len(order):  # the epoch is complete
            epoch, batch_in_epoch = epoch + 1, 0
            if not config.sample_every:
                save_sample_grid(task, accelerator, out / "samples" / f"epoch_{epoch:04d}.png")
    bar.close()
    accelerator.wait_for_everyone()
    pipeline_dir = out / "pipeline"
    if accelerator.is_main_process:
        with atomic_path(pipeline_dir, is_dir=True) as tmp:
            task.save_pipeline(accelerator, tmp)
    accelerator.end_training()
    return pipeline_dir


def launch_command(num_processes: int) -> str:
    """The command line that started this run, as a user would type it (recorded for model cards)."""
    program, *args = sys.argv
    if program.endswith(".py"):
        processes = f"--multi_gpu --num_processes {num_processes} " if num_processes > 1 else ""
        return f"accelerate launch {processes}{shlex.join([program, *args])}"
    return shlex.join([Path(program).name, *args])


def log_metrics(accelerator: Accelerator, out: Path, step: int, metrics: dict, trackers: bool) -> None:
    if trackers:
        accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def save_sample_grid(task: TrainTask, accelerator: Accelerator, path: Path) -> None:
    if accelerator.is_main_process:
        save_image(task.sample_grid(accelerator), path)


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(
    task: TrainTask, accelerator: Accelerator, out: Path, step: int, epoch: int, batch_in_epoch: int, keep: int
) -> Path:
    """checkpoints/checkpoint-<step>/: weights (safetensors), optimizer/EMA/RNG state (safetensors +
    JSON), written to a temporary folder and renamed, so a crash never leaves a half checkpoint."""
    final = out / "checkpoints" / f"checkpoint-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(rng_state(), tmp / f"rng_{accelerator.process_index}")
    if accelerator.is_main_process:
        for name, model in task.models.items():
            save_file(accelerator.unwrap_model(model).state_dict(), str(tmp / f"{name}.safetensors"))
        save_state(
            {
                "optimizers": {k: o.state_dict() for k, o in task.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in task.schedulers.items()},
                "extra": task.extra_state(),
            },
            tmp / "training_state",
        )
        (tmp / "progress.json").write_text(json.dumps({"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(final.parent.glob("checkpoint-???????"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(out: Path, resume: str) -> Path:
    if resume != "latest":
        return Path(resume)
    found = sorted((out / "checkpoints").glob("checkpoint-???????"))
    if not found:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {out / 'checkpoints'}")
    return found[-1]


def load_checkpoint(task: TrainTask, accelerator: Accelerator, path: Path) -> tuple[int, int, int]:
    if not (path / "progress.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no progress.json)")
    for name, model in task.models.items():
        file = path / f"{name}.safetensors"
        try:
            accelerator.unwrap_model(model).load_state_dict(load_file(str(file)))
        except Exception as err:
            raise RuntimeError(f"cannot load {file}: {err}") from err
    state = load_state(path / "training_state")
    for name, optimizer in task.optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    for name, scheduler in task.schedulers.items():
        scheduler.load_state_dict(state["schedulers"][name])
    task.load_extra_state(state["extra"])
    rng_file = path / f"rng_{accelerator.process_index}"
    if not rng_file.with_suffix(".json").exists():
        raise LaunchError(f"{path} was written by fewer processes than the {accelerator.num_processes} running now")
    set_rng_state(load_state(rng_file))
    progress = json.loads((path / "progress.json").read_text())
    return progress["step"], progress["epoch"], progress["batch_in_epoch"]


def run_training(description: str, build_task, add_model_arguments, argv: list[str] | None = None, **defaults) -> Path:
    """What every train script's main() does: parse flags, set up Accelerate, load data, train.

    `build_task(config, num_images)` makes the TrainTask; it gets the image count because learning-rate
    schedules that span the run need the number of steps before it starts.

    Bad input (missing data, bad launch, bad checkpoint) ends with one clear line and exit code 2.
    """
    parser = argparse.ArgumentParser(description=description)
    add_model_arguments(add_train_arguments(parser, **defaults))
    config = config_from_args(parser.parse_args(argv))
    try:
        accelerator = make_accelerator(config)
        set_seed(config.seed)  # identical initial weights on every rank
        dataset = BloodMNIST.load(config.split, config.resolution, config.data_dir, flip=config.flip)
        task = build_task(config, len(dataset))
        pipeline_dir = train(task, config, accelerator, dataset)
    except (LaunchError, DataError, FileNotFoundError, RuntimeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if accelerator.is_main_process:
        print(f"saved pipeline to {pipeline_dir}")
    return pipeline_dir
