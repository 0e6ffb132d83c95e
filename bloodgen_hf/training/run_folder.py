"""The output folder of a training run, guarded.

One run writes it at a time (`core.train` holds a lock beside it). A folder that holds a run is only
continued (`--resume`, checked against the settings the checkpoint recorded: bloodgen_hf.training.resume) or
replaced (`--overwrite`, which deletes the old run first so none of it can be resumed by mistake). A run
killed while writing leaves temporaries, which the next one clears, and metrics.jsonl lines past its last
checkpoint, which a resumed run drops before logging them again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import atomic_path, remove
from bloodgen_hf.training.checkpoint import checkpoint_steps

# What a run leaves in its folder; `--overwrite` deletes these (checkpoints first).
RUN_OUTPUTS = ("checkpoints", "pipeline", "metrics.jsonl", "samples", "logs", "train_config.json")


def existing_run(out: Path) -> str | None:
    """What an earlier run left in `out`, in words (None if nothing): its last checkpoint, its pipeline."""
    steps = checkpoint_steps(out)
    finished = (out / "pipeline").exists()
    if not steps and not finished and not any((out / name).exists() for name in ("train_config.json", "metrics.jsonl")):
        return None
    last = f"last checkpoint at step {steps[-1]}" if steps else "no checkpoint"
    return f"{last}, {'a' if finished else 'no'} final pipeline/"


def prepare_output_dir(out: Path, resume: str | None, overwrite: bool, main: bool) -> None:
    """Refuse to start a new run over an old one unless asked (`resume`, `overwrite`: the run's --resume and
    --overwrite); with `overwrite`, delete the old run.

    The main process (which holds the lock) also removes temporaries that killed runs left behind.
    """
    if resume and overwrite:
        raise UsageError("--resume continues the run in --output-dir and --overwrite deletes it: pass one of them")
    found = existing_run(out)
    if found and not resume and not overwrite:
        raise UsageError(
            f"{out} already holds a training run ({found}); pass --resume latest to continue it, "
            "or --overwrite to delete it and start again"
        )
    if not main:
        return
    remove_leftovers(out)
    if found and overwrite:
        for name in RUN_OUTPUTS:  # checkpoints first: nothing of the old run stays resumable
            remove(out / name)


def remove_leftovers(out: Path) -> None:
    """Temporaries of runs that were killed while writing (only ours: the lock says no one else writes)."""
    patterns = [".pipeline.*", ".*.deleted.tmp", ".metrics.jsonl.*.tmp", ".train_config.json.*.tmp"]
    found = [p for pattern in patterns for p in out.glob(pattern)]
    found += [*(out / "checkpoints").glob("*.tmp"), *(out / "samples").glob(".*.tmp")]
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def trim_metrics(path: Path, step: int) -> None:
    """Keep the log lines up to the resumed step (the later ones are logged again), dropping a line that
    a kill cut short, so a resumed run's metrics.jsonl equals an uninterrupted one's."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept))
