"""What a model cost to train: training_cost.json beside its pipeline, which `compare` puts in its model table.

    {"cpu_minutes": 240.0, "own_cpu_minutes": 240.0, "steps": 7051, "machines": ["AMD EPYC (AVX2, family 25)"],
     "starts_from": []}

The loop measures the process CPU time of training (summed over processes; a resumed run counts its earlier
sessions), as --cpu-budget-minutes counts it, and the CPUs it ran on (a CPU-minute buys different work on another
CPU). A run that starts from nothing records its minutes as the model's whole cost, `cpu_minutes`. A run that starts
from another model (`--init-from`), distils a teacher or decodes with a trained autoencoder cost more than its own
minutes: it names those origins in `starts_from`, and its `cpu_minutes` is null unless someone sums the whole chain
(the bundled `ddpm` and `ddpm-fast` files do, from their cards, and say so in `summed_from`).
"""

from __future__ import annotations

import json
from pathlib import Path

from bloodgen_hf.io import atomic_path
from bloodgen_hf.provenance import ORIGINS

COST_NAME = "training_cost.json"


def training_cost(cpu_seconds: float | None, steps: int, machines: list[str], provenance: dict | None) -> dict:
    """The record of one run: its own CPU minutes (all processes; None: not measured), and its whole cost where
    it started from nothing."""
    origins = [how for key, how in ORIGINS if (provenance or {}).get(key)]
    own = None if cpu_seconds is None else cpu_seconds / 60
    return {
        "cpu_minutes": own if not origins else None,
        "own_cpu_minutes": own,
        "steps": steps,
        "machines": list(machines),
        "starts_from": origins,
    }


def write_training_cost(folder: Path, cost: dict) -> None:
    with atomic_path(Path(folder) / COST_NAME, overwrite=True) as tmp:
        tmp.write_text(json.dumps(cost, indent=2) + "\n")


def read_training_cost(folder: Path) -> dict | None:
    """The folder's record, or None where it has none (a model saved before runs recorded their cost)."""
    file = Path(folder) / COST_NAME
    return json.loads(file.read_text()) if file.is_file() else None


def describe_cost(cost: dict | None) -> tuple[str, str]:
    """(CPU minutes, machines) as a table shows them: "240", "≥ 213" (this run only), or "not recorded"."""
    if cost is None:
        return "not recorded", "not recorded"
    machines = "; ".join(cost.get("machines") or []) or "not recorded"
    if cost.get("cpu_minutes") is not None:
        return f"{cost['cpu_minutes']:,.0f}", machines
    if cost.get("own_cpu_minutes") is None:
        return "not recorded", machines
    origins = " and ".join(cost["starts_from"])
    return f"≥ {cost['own_cpu_minutes']:,.0f} (this run only: what it {origins} is not counted)", machines
