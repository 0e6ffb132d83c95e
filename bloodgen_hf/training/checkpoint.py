"""Checkpoints without pickle: every tensor goes to safetensors, everything else to JSON.

Optimizer, scheduler, EMA and RNG states are nested dicts/lists/tuples of tensors and plain
values; `flatten_state` splits such a tree into {key: tensor} and a JSON skeleton that names the
keys, and `unflatten_state` puts it back together (dict keys keep their type, tuples stay tuples).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from bloodgen_hf.io import write_durably


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
