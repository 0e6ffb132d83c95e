"""A run's checkpoints, without pickle: every tensor goes to safetensors, everything else to JSON.

`save_checkpoint` writes checkpoints/checkpoint-<step>/ atomically (weights, optimizer/scheduler/EMA/RNG
state, progress and the run's settings) and prunes the old ones; `resolve_resume` finds the one `--resume`
names and `load_checkpoint` restores it.

Optimizer, scheduler, EMA and RNG states are nested dicts/lists/tuples of tensors and plain
values; `flatten_state` splits such a tree into {key: tensor} and a JSON skeleton that names the
keys, and `unflatten_state` puts it back together (dict keys keep their type, tuples stay tuples).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from bloodgen_hf.io import fsync_dir, reason, remove, write_durably
from bloodgen_hf.training.launch import LaunchError


def flatten_state(state: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    if isinstance(state, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = state.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(state, np.ndarray):
        return {"__ndarray__": state.tolist(), "dtype": str(state.dtype)}
    if isinstance(state, dict):
        return {"__dict__": [[_key(k), flatten_state(v, tensors, prefix)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        items = [flatten_state(v, tensors, prefix) for v in state]
        return {"__tuple__": items} if isinstance(state, tuple) else items
    if isinstance(state, (np.integer, np.floating)):
        return state.item()
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot checkpoint a {type(state).__name__}")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__ndarray__" in skeleton:
        return np.asarray(skeleton["__ndarray__"], dtype=skeleton["dtype"])
    if "__tuple__" in skeleton:
        return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
    return {_unkey(k): unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}


def _key(k: Any) -> list:
    if isinstance(k, bool) or not isinstance(k, (int, str)):
        raise TypeError(f"cannot checkpoint a dict key of type {type(k).__name__}")
    return ["int" if isinstance(k, int) else "str", k]


def _unkey(k: list) -> Any:
    return int(k[1]) if k[0] == "int" else k[1]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back (damaged, incomplete, or not a checkpoint)."""


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written by Python (so a full disk is a plain OSError) and fsynced."""
    write_durably(path, save(tensors))


def save_state(state: Any, path_stem: Path) -> None:
    """Write `<stem>.json` + `<stem>.safetensors`."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(state, tensors)
    save_tensors(tensors, path_stem.with_suffix(".safetensors"))
    write_durably(path_stem.with_suffix(".json"), json.dumps(skeleton))


def load_state(path_stem: Path) -> Any:
    try:
        tensors = load_file(str(path_stem.with_suffix(".safetensors")))
        skeleton = json.loads(path_stem.with_suffix(".json").read_text())
        return unflatten_state(skeleton, tensors)
    except Exception as err:  # safetensors raises its own error type for damaged files
        raise CheckpointError(f"corrupt or incomplete checkpoint file {path_stem}.*: {err}") from err


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- a run's checkpoints ---------------------------------------------------------------------------


class Checkpointable(Protocol):
    """What a checkpoint holds of a TrainTask (bloodgen_hf.training.core)."""

    models: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]

    def extra_state(self) -> dict[str, Any]: ...

    def load_extra_state(self, state: dict[str, Any]) -> None: ...


def checkpoint_folders(out: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (their seven-digit step names sort as the steps do)."""
    return sorted((out / "checkpoints").glob("checkpoint-???????"))


def checkpoint_steps(out: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoint_folders(out)]


def save_checkpoint(
    task: Checkpointable, accelerator: Accelerator, out: Path, progress: dict, keep: int, settings: dict
) -> Path:
    """checkpoints/checkpoint-<step>/: weights (safetensors), optimizer/EMA/RNG state (safetensors +
    JSON), the run's settings (config.json, checked on resume), written to a temporary folder, fsynced
    and renamed, so a crash or a full disk never leaves a half checkpoint or harms the earlier ones.
    Then all but the last `keep` are deleted, except those written at a CPU-minute mark (`cpu_marks`)."""
    final = out / "checkpoints" / f"checkpoint-{progress['step']:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        write_checkpoint(task, accelerator, tmp, progress, settings)
    except (OSError, SafetensorError) as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write checkpoint {final} ({reason(err)}); the earlier ones are intact") from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(final.parent)
        for old in checkpoint_folders(out)[:-keep]:
            if not cpu_marks(old):
                remove(old)
    accelerator.wait_for_everyone()
    return final


def cpu_marks(checkpoint: Path) -> list[float]:
    """The --checkpoint-cpu-minutes marks a checkpoint was written for (its progress.json's "cpu_marks"):
    such checkpoints are kept when older ones are pruned."""
    try:
        return json.loads((checkpoint / "progress.json").read_text()).get("cpu_marks", [])
    except (OSError, ValueError):  # an unreadable checkpoint is no marked one
        return []


def write_checkpoint(task: Checkpointable, accelerator: Accelerator, tmp: Path, progress: dict, settings: dict) -> None:
    save_state(rng_state(), tmp / f"rng_{accelerator.process_index}")
    if accelerator.is_main_process:
        for name, model in task.models.items():
            save_tensors(accelerator.unwrap_model(model).state_dict(), tmp / f"{name}.safetensors")
        save_state(
            {
                "optimizers": {k: o.state_dict() for k, o in task.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in task.schedulers.items()},
                "extra": task.extra_state(),
            },
            tmp / "training_state",
        )
        write_durably(tmp / "config.json", json.dumps(settings, indent=2))
        write_durably(tmp / "progress.json", json.dumps(progress))


def latest_checkpoint(out: Path) -> Path | None:
    """The run's last checkpoint folder, or None if it has none."""
    found = checkpoint_folders(out)
    return found[-1] if found else None


def resolve_resume(out: Path, resume: str) -> Path:
    if resume != "latest":
        return Path(resume)
    found = latest_checkpoint(out)
    if found is None:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {out / 'checkpoints'}")
    return found


def load_model_weights(task: Checkpointable, accelerator: Accelerator, path: Path) -> None:
    """The checkpoint's weights into the task's (unwrapped) models; a damaged file is named."""
    for name, model in task.models.items():
        file = path / f"{name}.safetensors"
        try:
            accelerator.unwrap_model(model).load_state_dict(load_file(str(file)))
        except Exception as err:  # safetensors raises its own error type for damaged files
            raise CheckpointError(f"cannot load {file}: {err}") from err


def load_checkpoint(
    task: Checkpointable, accelerator: Accelerator, path: Path
) -> tuple[int, int, int, float, list[str]]:
    """Restore the task's state and this rank's RNG; (step, epoch, batch in the epoch, CPU seconds used, the CPUs
    trained on so far: [] for checkpoints older than that record, whose CPU minutes compare only on one CPU)."""
    if not (path / "progress.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no progress.json)")
    load_model_weights(task, accelerator, path)
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
    position = progress["step"], progress["epoch"], progress["batch_in_epoch"]
    return *position, progress.get("cpu_seconds", 0.0), list(progress.get("machines", []))
