"""Issue 34: benchmarks/student_agreement.py samples teacher and student from the same labels and seeds and says
which cells the student lost; it refuses pairs that cannot be compared, and existing outputs, in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bloodgen_hf.registry import save_pipeline
from tests.conftest import saved_bloodnet, tiny_ddpm_pipeline, tiny_ldm_64

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import student_agreement as sa  # noqa: E402

N_PER_CLASS = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("agreement")
    return {
        "teacher": save_pipeline(tiny_ddpm_pipeline(seed=0), root / "teacher"),
        "other": save_pipeline(tiny_ddpm_pipeline(seed=1), root / "other"),
        "ldm-64": save_pipeline(tiny_ldm_64(), root / "ldm-64"),
        "bloodnet": saved_bloodnet(root / "bloodnet", 28),
    }


def run(models: dict, out: Path, teacher: str, student: str, *extra: str) -> dict:
    argv = ["--teacher", str(models[teacher]), "--student", str(models[student]), "--bloodnet", str(models["bloodnet"])]
    return sa.main([*argv, "--n-per-class", str(N_PER_CLASS), "--out", str(out), "--precision", "fp32", *extra])


def test_a_student_identical_to_its_teacher_loses_nothing_and_draws_the_same_cells(models, tmp_path):
    teacher_steps = json.loads((models["teacher"] / "model_index.json").read_text())["default_num_inference_steps"]
    results = run(models, tmp_path / "same", "teacher", "teacher", "--student-steps", str(teacher_steps))
    mean = results["students"][teacher_steps]["mean_over_classes"]
    assert mean["lost"] == mean["gained"] == 0 and mean["teacher"] == mean["student"]
    assert mean["same_seed_distance"] == pytest.approx(0, abs=1e-6) and mean["other_seed_distance"] > 0
    report = (tmp_path / "same" / "report.md").read_text()
    assert f"## Student at {teacher_steps} steps" in report and "| mean |" in report
    assert json.loads((tmp_path / "same" / "results.json").read_text())["n_per_class"] == N_PER_CLASS


def test_other_weights_draw_other_cells_at_each_step_count(models, tmp_path):
    results = run(models, tmp_path / "other", "teacher", "other", "--student-steps", "1,2")
    assert list(results["students"]) == [1, 2]
    for result in results["students"].values():
        per_class = result["per_class"]
        assert set(per_class) == set(results["class_names"])
        assert all(r["same_seed_distance"] > 0 for r in per_class.values())
        assert all(r["lost"] <= r["teacher"] and r["gained"] <= r["student"] for r in per_class.values())


def test_refusals_are_one_line(models, tmp_path):
    with pytest.raises(SystemExit, match="^error: the teacher makes 28 px images, the student 64 px$"):
        run(models, tmp_path / "sizes", "teacher", "ldm-64")
    (tmp_path / "kept").mkdir()
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        run(models, tmp_path / "kept", "teacher", "teacher")
    with pytest.raises(SystemExit):  # argparse: exit code 2, its usage line
        run(models, tmp_path / "steps", "teacher", "teacher", "--student-steps", "0")
