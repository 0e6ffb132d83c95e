"""`--resume` continues the run a checkpoint recorded, with the settings it was started with.

Each checkpoint records the run's settings (its config.json: `core.run_settings`, the shared options and the
family's flat beside them, and the number of processes). A resumed run may change only RESUME_MAY_CHANGE;
any other difference is refused by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bloodgen_hf.guard import check_unchanged, plain

# Options that `--resume` may change: how long to run, where things are, what to log and keep. Every
# other option (and the number of processes) shapes the run, so a change is refused by name.
RESUME_MAY_CHANGE = frozenset(
    {
        "output_dir",
        "data_dir",
        "epochs",
        "max_steps",
        "cpu_budget_minutes",
        "cpu_threads",
        "resume",
        "overwrite",
        "init_from",
        "checkpoint_every",
        "checkpoint_cpu_minutes",
        "keep_checkpoints",
        "sample_every",
        "log_every",
        "log_with",
        "grid_per_class",
    }
)


def check_resume_settings(checkpoint: Path, settings: dict[str, Any]) -> None:
    """The checkpoint's recorded settings must match this command's, but for RESUME_MAY_CHANGE.

    Checkpoints from before settings were recorded fall back to their run's train_config.json. Only
    keys the record has are compared: an option added later cannot have been set then.
    """
    before = recorded_settings(checkpoint)
    if before is None:
        print(f"warning: {checkpoint} records no settings; resuming without checking them", file=sys.stderr)
        return
    now = {k: v for k, v in settings.items() if k in before}
    check_unchanged(
        before,
        now,
        f"--resume: {checkpoint}",
        "pass the options it was started with (only the run's length, logging and checkpointing may change), "
        "or train into a new --output-dir",
        RESUME_MAY_CHANGE,
    )


def recorded_settings(checkpoint: Path) -> dict[str, Any] | None:
    """The settings `checkpoint` recorded, flat as `core.run_settings` makes them (None if it records none)."""
    own = checkpoint / "config.json"
    if own.is_file():
        return json.loads(own.read_text())
    legacy = checkpoint.parent.parent / "train_config.json"
    if not legacy.is_file():
        return None
    config = json.loads(legacy.read_text())
    config.pop("command", None)
    config.pop("provenance", None)
    extra = config.pop("extra", None) or {}
    return plain({**config, **extra})
