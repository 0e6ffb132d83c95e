"""training_cost.json: what a model cost to train, whole where its run started from nothing (issue 33's column)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bloodgen_hf.registry import resolve_model
from bloodgen_hf.training.cost import describe_cost, read_training_cost, training_cost, write_training_cost

SCRATCH = {"dataset": "bloodmnist", "split": "train", "init_from": None}
STUDENT = {**SCRATCH, "init_from": {"model": "ddpm"}, "distilled_from": {"model": "ddpm"}}


def test_a_run_from_nothing_costs_its_own_minutes():
    cost = training_cost(3600.0, 500, ["CPU A"], SCRATCH)
    assert cost["cpu_minutes"] == cost["own_cpu_minutes"] == 60.0
    assert cost["steps"] == 500 and cost["machines"] == ["CPU A"] and cost["starts_from"] == []
    assert describe_cost(cost) == ("60", "CPU A")


def test_a_run_from_another_model_leaves_its_whole_cost_open():
    cost = training_cost(600.0, 10, ["CPU A", "CPU B"], STUDENT)
    assert cost["cpu_minutes"] is None and cost["own_cpu_minutes"] == 10.0
    assert cost["starts_from"] == ["started from", "distilled from"]
    minutes, machines = describe_cost(cost)
    assert minutes.startswith("≥ 10 (this run only") and "distilled from" in minutes
    assert machines == "CPU A; CPU B"


def test_unmeasured_and_missing_costs_say_not_recorded(tmp_path):
    assert read_training_cost(tmp_path) is None
    assert describe_cost(None) == ("not recorded", "not recorded")
    assert describe_cost(training_cost(None, 5, ["CPU A"], STUDENT)) == ("not recorded", "CPU A")


def test_the_record_round_trips_and_replaces_an_older_one(tmp_path):
    write_training_cost(tmp_path, training_cost(60.0, 1, [], SCRATCH))
    write_training_cost(tmp_path, training_cost(120.0, 2, [], SCRATCH))
    assert read_training_cost(tmp_path)["steps"] == 2 and [p.name for p in tmp_path.iterdir()] == ["training_cost.json"]


@pytest.mark.parametrize("name", ["ddpm", "ddpm-fast"])
def test_the_bundled_summed_costs_say_how_they_were_summed_and_cover_their_own_run(name):
    cost = read_training_cost(Path(resolve_model(name)))
    assert cost["summed_from"] and cost["starts_from"]
    assert cost["cpu_minutes"] > cost["own_cpu_minutes"] > 0


def test_the_teachers_sum_is_its_runs_last_logged_minutes():
    """ddpm's file sums the last cpu_minutes of each run in its metrics.jsonl; the student's includes it."""
    folder = Path(resolve_model("ddpm"))
    last: dict[str, float] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        last[row["run"]] = row["cpu_minutes"]
    assert read_training_cost(folder)["cpu_minutes"] == pytest.approx(sum(last.values()), abs=0.05)
    assert read_training_cost(Path(resolve_model("ddpm-fast")))["cpu_minutes"] > sum(last.values())
