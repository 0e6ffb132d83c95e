"""Issue 33: checkpoints at CPU-minute marks (`--checkpoint-cpu-minutes`), and benchmarks/quality_vs_cpu.py scoring
the checkpoint that stands for each mark (and reporting the marks a run has none for)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from bloodgen_hf.process import cpu_name
from bloodgen_hf.registry import load_pipeline
from bloodgen_hf.training import core, ddpm, vae
from bloodgen_hf.training.core import cpu_minute_marks, crossed_marks
from bloodgen_hf.training.cost import read_training_cost, training_cost, write_training_cost
from bloodgen_hf.training.export import export_checkpoint
from bloodgen_hf.training.gan import main as train_gan
from tests.test_ddpm import train_args as ddpm_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality_vs_cpu  # noqa: E402

TINY = ["--batch-size", "8", "--base-channels", "8", "--latent-dim", "16", "--log-with", "none", "--log-every", "1"]
TINY += ["--cpu-threads", "1"]  # the machine may be busy: two threads on two shared cores crawl


def run_gan(data_dir: Path, out: Path, *extra: str) -> None:
    try:
        train_gan(["--data-dir", str(data_dir), "--output-dir", str(out), *TINY, *extra])
    finally:
        AcceleratorState._reset_state(True)


def fake_run(folder: Path, checkpoints: list[tuple[int, float, list[float]]], logged_minutes: float) -> Path:
    """A run folder with progress.json files only: (step, CPU seconds, marks) per checkpoint."""
    for step, seconds, marks in checkpoints:
        progress = {"step": step, "epoch": 0, "batch_in_epoch": step, "cpu_seconds": seconds}
        progress.update({"cpu_marks": marks} if marks else {})
        (folder / "checkpoints" / f"checkpoint-{step:07d}").mkdir(parents=True)
        (folder / "checkpoints" / f"checkpoint-{step:07d}" / "progress.json").write_text(json.dumps(progress))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "cpu_minutes": logged_minutes}) + "\n")
    return folder


def test_each_mark_gets_its_marked_checkpoint_else_the_latest_not_above_it(tmp_path):
    run = fake_run(
        tmp_path / "run",
        [(100, 500.0, []), (200, 905.0, [15.0]), (300, 1500.0, []), (400, 1790.0, []), (500, 1860.0, [])],
        logged_minutes=31.5,
    )
    chosen = {mark: quality_vs_cpu.choose_checkpoint(run, mark) for mark in (5, 10, 15, 25, 30, 31, 60)}
    assert chosen[5]["status"] == "no checkpoint" and "its first is at 8.3" in chosen[5]["note"]
    assert (chosen[10]["status"], chosen[10]["step"]) == ("before mark", 100)
    # written at the mark, one step past it: chosen although its CPU time is above the mark
    assert (chosen[15]["status"], chosen[15]["step"]) == ("at mark", 200)
    assert chosen[15]["cpu_minutes"] == pytest.approx(905 / 60)
    assert (chosen[25]["step"], chosen[30]["step"], chosen[31]["step"]) == (300, 400, 500)  # not above the mark
    assert chosen[25]["checkpoint"] == str(run / "checkpoints" / "checkpoint-0000300")
    note = "not reached: the run stopped at 31.5 CPU-minutes"
    assert chosen[60] == {"mark": 60, "status": "not reached", "note": note}


def test_crossing_marks_and_parsing_them():
    assert crossed_marks((0.5, 1.0, 2.0), 29.0, 61.0) == [0.5, 1.0]
    assert crossed_marks((0.5,), 30.0, 40.0) == []  # passed at an earlier step
    assert cpu_minute_marks("30, 15,60") == (15.0, 30.0, 60.0)
    for bad in ("15,x", "0", "-1", "inf"):
        with pytest.raises(Exception, match="--checkpoint-cpu-minutes|minutes"):
            cpu_minute_marks(bad)


def test_checkpoint_cpu_minutes_writes_and_keeps_a_checkpoint_at_each_mark(fake_data_dir, tmp_path, capsys):
    out, marks = tmp_path / "run", [0.001, 0.002, 0.003]  # 0.06, 0.12, 0.18 CPU seconds: a few tiny steps each
    run_gan(fake_data_dir, out, "--max-steps", "30", "--checkpoint-every", "1000", "--keep-checkpoints", "1",
            "--checkpoint-cpu-minutes", ",".join(map(str, marks)))  # fmt: skip
    found = quality_vs_cpu.checkpoints(out)
    marked = [c for c in found if c["cpu_marks"]]
    assert sorted(m for c in marked for m in c["cpu_marks"]) == marks  # every mark, once
    assert found[-1]["step"] == 30 and len(found) == len(marked) + 1  # pruning kept them, beside the last
    logged = {r["step"]: r["cpu_minutes"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    for c in marked:  # at the first step past each of its marks
        assert all(logged.get(c["step"] - 1, 0.0) < m <= c["cpu_seconds"] / 60 for m in c["cpu_marks"])
        assert logged[c["step"]] == pytest.approx(c["cpu_seconds"] / 60)
    assert json.loads((out / "train_config.json").read_text())["checkpoint_cpu_minutes"] == marks

    with pytest.raises(SystemExit) as err:  # argparse's own refusal: one usage line and exit 2
        run_gan(fake_data_dir, tmp_path / "bad", "--checkpoint-cpu-minutes", "15,0")
    assert err.value.code == 2
    assert "--checkpoint-cpu-minutes: takes positive minutes, got '15,0'" in capsys.readouterr().err


def test_the_benchmark_scores_the_marked_checkpoints_and_reports_a_mark_never_reached(fake_data_dir, tmp_path):
    run = tmp_path / "gan-run"
    run_gan(fake_data_dir, run, "--max-steps", "20", "--checkpoint-every", "1000", "--keep-checkpoints", "1",
            "--checkpoint-cpu-minutes", "0.001,0.002", "--ema-decay", "0.5")  # fmt: skip
    # the final checkpoint, exported, is the pipeline the run saved
    last = quality_vs_cpu.checkpoints(run)[-1]["folder"]
    exported = export_checkpoint("gan", run, last, tmp_path / "exported", str(fake_data_dir))
    weights = "gan/diffusion_pytorch_model.safetensors"
    ours, theirs = load_file(str(exported / weights)), load_file(str(run / "pipeline" / weights))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((exported / "provenance.json").read_text()) == json.loads(
        (run / "pipeline" / "provenance.json").read_text()
    )
    # both record what the run cost up to there: the checkpoint's CPU time, and the loop's at the end
    progress = json.loads((last / "progress.json").read_text())
    cost, final = read_training_cost(exported), read_training_cost(run / "pipeline")
    assert cost["cpu_minutes"] == pytest.approx(progress["cpu_seconds"] / 60) and cost["steps"] == 20
    assert cost["machines"] == [cpu_name()] and cost["starts_from"] == []
    assert final["cpu_minutes"] == pytest.approx(cost["cpu_minutes"]) and final["steps"] == 20

    scored = []

    def fake_score(model: str, label: str, out: Path) -> dict:
        """Stands for the evaluation: records what it was given, and the loaded pipeline's first weight."""
        scored.append(label)
        first = next(load_pipeline(model).gan.parameters()).flatten()[0].item()
        return {"fd_bloodnet": 10.0 + abs(first), "class_accuracy": 0.5, "recall": 0.3, "precision": 0.6,
                "near_copies": 0.02, "per_class_accuracy": {}}  # fmt: skip

    out = tmp_path / "report"
    argv = ["--runs", f"gan={run}", "--cpu-minutes", "0.001,0.002,1000", "--n", "16"]
    argv += ["--data-dir", str(fake_data_dir), "--out", str(out)]
    results = quality_vs_cpu.main(argv, score=fake_score)
    assert scored == ["gan@0.001min", "gan@0.002min"]
    by_mark = {r["mark"]: r for r in results}
    marked = {m: c for c in quality_vs_cpu.checkpoints(run) for m in c["cpu_marks"]}
    for mark in (0.001, 0.002):
        assert by_mark[mark]["status"] == "at mark" and by_mark[mark]["step"] == marked[mark]["step"]
        assert (out / "points" / "gan" / f"{mark:g}min" / "pipeline" / "model_index.json").is_file()
    assert by_mark[1000]["status"] == "not reached" and "fd_bloodnet" not in by_mark[1000]
    assert by_mark[0.001]["machine"] == cpu_name()  # the CPU that spent the minutes, from the checkpoint
    report = (out / "report.md").read_text()
    assert f"- gan: trained on {cpu_name()}\n" in report and "different CPUs" not in report
    assert "| gan | 1000 | not reached: the run stopped at 0.0 CPU-minutes |" in report
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "quality_vs_cpu.png").stat().st_size > 1000

    scored.clear()  # a rerun keeps the finished points
    assert quality_vs_cpu.main(argv, score=fake_score) == results and scored == []

    # a saved model as one point: at the whole cost its training_cost.json records, or as stated
    argv += ["--point", f"final={run / 'pipeline'}", "--point", f"stated={run / 'pipeline'}@5"]
    points = {r["label"]: r for r in quality_vs_cpu.main(argv, score=fake_score) if r["status"] == "fixed"}
    assert points["final"]["cpu_minutes"] == pytest.approx(read_training_cost(run / "pipeline")["cpu_minutes"])
    assert points["final"]["machine"] == cpu_name() and scored == ["final", "stated"]
    assert points["stated"]["cpu_minutes"] == 5 and points["stated"]["machine"] == "as stated with --point"


def test_a_point_needs_a_stated_cost_or_a_whole_recorded_one(tiny_gan_dir, tmp_path):
    assert quality_vs_cpu.parse_point("a=b") == ("a", "b", None)
    assert quality_vs_cpu.parse_point("a=runs/x@2@3") == ("a", "runs/x@2", 3.0)
    for bad in ("a=b@0", "a=b@x", "=b@3", "a=", "a"):
        with pytest.raises(argparse.ArgumentTypeError, match="--point takes LABEL=MODEL or LABEL=MODEL@CPU_MINUTES"):
            quality_vs_cpu.parse_point(bad)

    def never(*_):
        raise AssertionError("nothing is scored before every point's cost is known")

    argv = ["--runs", f"gan={tmp_path}", "--point", f"p={tiny_gan_dir}", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="records no training_cost.json; give its total as LABEL=.*@CPU_MINUTES"):
        quality_vs_cpu.main(argv, score=never)
    write_training_cost(tiny_gan_dir, training_cost(600.0, 1, ["CPU A"], {"init_from": {"model": "gan"}}))
    with pytest.raises(SystemExit, match="records only its own run's minutes, not its origins'"):
        quality_vs_cpu.main(argv, score=never)


VAE_TINY = ["--batch-size", "16", "--block-out-channels", "8,16", "--norm-num-groups", "4", "--class-embed-dim", "4"]
VAE_TINY += ["--latent-dim", "8", "--latent-channels", "2", "--log-with", "none", "--cpu-threads", "1"]


@pytest.mark.parametrize("family", ["ddpm", "vae"])
def test_an_exported_checkpoint_is_the_pipeline_the_run_saved(family, fake_data_dir, tmp_path):
    """The DDPM's EMA UNet, sampler and defaults, and the VAE's decoder sigma, come back as the run saved them."""
    run = tmp_path / family
    if family == "ddpm":
        ddpm.main(ddpm_args(fake_data_dir, run, "--max-steps", "2", "--cpu-threads", "1"))
    else:
        vae.main(["--data-dir", str(fake_data_dir), "--output-dir", str(run), *VAE_TINY, "--max-steps", "2"])
    AcceleratorState._reset_state(True)
    last = quality_vs_cpu.checkpoints(run)[-1]["folder"]
    exported = export_checkpoint(family, run, last, tmp_path / "exported", str(fake_data_dir))
    saved = sorted(p.relative_to(run / "pipeline") for p in (run / "pipeline").rglob("*") if p.is_file())
    assert saved == sorted(p.relative_to(exported) for p in exported.rglob("*") if p.is_file())
    for name in saved:
        if name.suffix == ".safetensors":
            ours, theirs = load_file(str(exported / name)), load_file(str(run / "pipeline" / name))
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
        else:
            assert (exported / name).read_bytes() == (run / "pipeline" / name).read_bytes(), name


def test_checkpoints_record_every_cpu_the_run_trained_on(fake_data_dir, tmp_path, monkeypatch):
    """A run resumed on another CPU says so; the report warns when its lines trained on different CPUs."""
    run, common = tmp_path / "run", ["--checkpoint-every", "2", "--keep-checkpoints", "5"]
    run_gan(fake_data_dir, run, "--max-steps", "2", *common)
    monkeypatch.setattr(core, "cpu_name", lambda: "Other CPU (AVX2, family 1)")
    run_gan(fake_data_dir, run, "--max-steps", "4", "--resume", "latest", *common)
    found = quality_vs_cpu.checkpoints(run)
    assert [c["machines"] for c in found] == [[cpu_name()], [cpu_name(), "Other CPU (AVX2, family 1)"]]
    assert quality_vs_cpu.choose_checkpoint(run, 1000)["status"] == "not reached"

    points = [
        {"label": "gan", "status": "at mark", "machine": "CPU A"},
        {"label": "ddpm", "status": "before mark", "machine": "CPU B"},
        {"label": "ddpm-fast", "status": "fixed", "machine": "as stated with --point"},
    ]
    lines = quality_vs_cpu.machine_lines(points)
    assert lines[:2] == ["- gan: trained on CPU A", "- ddpm: trained on CPU B"]
    assert "different CPUs" in lines[2] and len(lines) == 3
    assert len(quality_vs_cpu.machine_lines(points[:1])) == 1
