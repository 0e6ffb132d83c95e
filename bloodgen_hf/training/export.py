"""A checkpoint as the pipeline its run would have saved had it stopped there.

Runs save a pipeline only at their end; a checkpoint holds the live weights, the EMA and the run's
settings. `export_checkpoint` rebuilds the family's TrainTask from the run's train_config.json (its shared
options and its family's, recorded under "extra"), loads the checkpoint's weights and extra state (the EMA,
a VAE's decoder sigma) into it, and calls the task's own `save_pipeline`, so the folder holds what the run
itself would have saved: the EMA generator or UNet, the sampler and its defaults, and the run's provenance.
benchmarks/quality_vs_cpu.py scores runs this way at several CPU-minute marks.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import atomic_path
from bloodgen_hf.provenance import portable_provenance
from bloodgen_hf.training.checkpoint import load_model_weights, load_state
from bloodgen_hf.training.core import TrainConfig, TrainTask
from bloodgen_hf.training.cost import training_cost, write_training_cost
from bloodgen_hf.training.ddpm import DDPMTask
from bloodgen_hf.training.gan import GANTask
from bloodgen_hf.training.sources import load_training_data
from bloodgen_hf.training.vae import VAETask

# The families whose runs train on the real images (sources.load_training_data) and can be exported.
EXPORTABLE: dict[str, type[TrainTask]] = {"gan": GANTask, "ddpm": DDPMTask, "vae": VAETask}


class NoAccelerator:
    """What a task's `save_pipeline` asks of its Accelerator, for models that were never wrapped (one process, CPU)."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    is_main_process = True

    @staticmethod
    def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
        return model


def run_config(run: Path, data_dir: str | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """The run's TrainConfig (its family's options as the recorded dict in `extra`) and the whole record.

    `data_dir` replaces the recorded one (runs may have been made elsewhere); the config does not resume."""
    file = Path(run) / "train_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{run} holds no training run (no train_config.json)")
    recorded = json.loads(file.read_text())
    shared = {f.name for f in fields(TrainConfig)} - {"extra"}
    config = TrainConfig(**{k: v for k, v in recorded.items() if k in shared}, extra=recorded.get("extra") or {})
    config.output_dir, config.resume = str(run), None
    if data_dir is not None:
        config.data_dir = data_dir
    return config, recorded


def load_weights(task: TrainTask, checkpoint: Path) -> None:
    """The checkpoint's models and extra state (EMA, counters) into the task; optimizers and RNG are left alone."""
    load_model_weights(task, NoAccelerator(), checkpoint)
    task.load_extra_state(load_state(checkpoint / "training_state")["extra"])


def checkpoint_task(family: str, run: Path, checkpoint: Path, data_dir: str | None = None) -> tuple[TrainTask, dict]:
    """The family's task as the run built it (same options, classes and image count), with the checkpoint's
    weights, and the run's recorded train_config.json."""
    if family not in EXPORTABLE:
        raise UsageError(f"cannot export a {family!r} checkpoint; families: {', '.join(EXPORTABLE)}")
    if not (checkpoint / "progress.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint folder (no progress.json)")
    config, recorded = run_config(run, data_dir)
    dataset, provenance = load_training_data(config)  # the class names and count the models were built with
    task = EXPORTABLE[family].build(config, len(dataset), class_names=dataset.class_names)
    task.provenance = recorded.get("provenance") or portable_provenance(provenance)
    load_weights(task, checkpoint)
    return task, recorded


def checkpoint_cost(checkpoint: Path, recorded: dict, provenance: dict | None) -> dict:
    """What the run had cost at `checkpoint` (training/cost.py); no minutes for a multi-process run, whose
    progress.json holds rank 0's CPU time only."""
    progress = json.loads((checkpoint / "progress.json").read_text())
    cpu_seconds = progress.get("cpu_seconds") if recorded.get("num_processes", 1) == 1 else None
    return training_cost(cpu_seconds, progress["step"], progress.get("machines", []), provenance)


def export_checkpoint(family: str, run: Path, checkpoint: Path, folder: Path, data_dir: str | None = None) -> Path:
    """Write (atomically, replacing one there) the pipeline the run would have saved at `checkpoint`."""
    task, recorded = checkpoint_task(family, Path(run), Path(checkpoint), data_dir)
    cost = checkpoint_cost(Path(checkpoint), recorded, task.provenance)
    with atomic_path(Path(folder), is_dir=True, overwrite=True) as tmp:
        task.save_pipeline(NoAccelerator(), tmp)
        write_training_cost(tmp, cost)
    return Path(folder)
