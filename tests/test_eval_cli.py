"""`evaluate`, `compare` and `augment-study` end to end on tiny fixtures (a tiny GAN, tiny BloodNet, fake data)."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bloodgen_hf.cli import app
from bloodgen_hf.data import CLASS_NAMES
from bloodgen_hf.evaluation import features as F
from bloodgen_hf.evaluation.bloodnet import BloodNet
from bloodgen_hf.model_card import read_eval_results
from bloodgen_hf.process import cpu_name
from tests.conftest import tiny_gan_pipeline

SMALL = ["--runs", "2", "--n", "20", "--memorization-n", "10", "--batch-size", "8"]


@pytest.fixture
def tiny_bloodnet_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / "bloodnet"
    BloodNet(channels=[4, 8], blocks_per_stage=1, class_names=list(CLASS_NAMES)).save_pretrained(folder / "classifier")
    return folder


@pytest.fixture
def common(fake_data_dir, tiny_bloodnet_dir, tmp_path) -> list[str]:
    return [
        "--extractor",
        "bloodnet",
        "--bloodnet",
        str(tiny_bloodnet_dir),
        "--data-dir",
        str(fake_data_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
    ]


@pytest.fixture
def train_split_gan_dir(tmp_path: Path) -> Path:
    """The tiny GAN, recorded as trained on the train split only: the augmentation study accepts it."""
    from bloodgen_hf.provenance import training_provenance
    from bloodgen_hf.registry import save_pipeline

    pipe = tiny_gan_pipeline()
    provenance = training_provenance("bloodmnist", 28, "train", 48)
    return save_pipeline(type(pipe)(gan=pipe.gan, provenance=provenance), tmp_path / "tiny_gan")


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_evaluate_writes_results_hub_file_summary_and_pairs(tiny_gan_dir, common, tmp_path):
    out = tmp_path / "eval"
    result = invoke("evaluate", "--model", tiny_gan_dir, *SMALL, *common, "--out", out)
    assert result.exit_code == 0, result.output
    assert "fd_bloodnet" in result.stdout and "real vs real" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2 and results["protocol"]["n"] == 20
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".eval")) == []  # kept runs cleared
    assert results["parameters"]["total"] == sum(p.numel() for p in tiny_gan_pipeline().gan.parameters())
    hub = read_eval_results(out)  # the Hub helper's reader and checks
    assert hub["split"] == "all" and hub["num_generated"] == 20
    entries = {m["type"]: m for m in hub["metrics"]}
    fd = results["metrics"]["fd_bloodnet"]
    assert entries["fd_bloodnet"]["value"] == fd["mean"] and entries["fd_bloodnet"]["runs"] == fd["runs"]
    assert entries["fd_bloodnet"]["floor"] == results["floor"]["fd_bloodnet"]["mean"]
    assert "bloodnet features" in entries["fd_bloodnet"]["name"]
    assert "fid" not in entries  # BloodNet distances are never reported as FID
    assert (out / "memorization_pairs.png").is_file() and "| fd_bloodnet |" in (out / "summary.md").read_text()
    assert not (tiny_gan_dir / "eval_results.json").exists()  # only with --record


def test_evaluate_record_puts_results_where_push_reads_them(tiny_gan_dir, common, tmp_path):
    result = invoke("evaluate", "--model", tiny_gan_dir, *SMALL, *common, "--out", tmp_path / "e", "--record")
    assert result.exit_code == 0, result.output
    assert read_eval_results(tiny_gan_dir) == read_eval_results(tmp_path / "e")


def test_evaluate_does_not_overwrite_without_the_flag(tiny_gan_dir, common, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    result = invoke("evaluate", "--model", tiny_gan_dir, *SMALL, *common, "--out", out)
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_evaluate_without_inception_weights_fails_in_one_line(tiny_gan_dir, monkeypatch, tmp_path, fake_data_dir):
    import cleanfid.downloads_helper

    def no_network(fpath="./"):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(F, "CLEANFID_DOWNLOAD_DIR", tmp_path / "cleanfid")
    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", no_network)
    monkeypatch.delenv(F.INCEPTION_ENV, raising=False)
    result = invoke("evaluate", "--model", tiny_gan_dir, "--data-dir", fake_data_dir, "--out", tmp_path / "e")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Inception-v3 weights for FID are unavailable")
    assert "--inception-weights" in lines[0] and "--extractor bloodnet" in lines[0]
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metrics", "fid,lpips"], "unknown metric 'lpips'"),
        (["--n", "500"], "--n must be between 2 and the 80 real images"),
        (["--steps", "5"], "--steps does not apply to BloodGANPipeline"),
    ],
)
def test_evaluate_bad_input_is_one_error_line(tiny_gan_dir, common, tmp_path, extra, message):
    result = invoke("evaluate", "--model", tiny_gan_dir, *SMALL, *common, "--out", tmp_path / "e", *extra)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_compare_writes_one_report_folder(tiny_gan_dir, common, tmp_path):
    from bloodgen_hf.registry import save_pipeline
    from bloodgen_hf.training.cost import training_cost, write_training_cost

    other = save_pipeline(tiny_gan_pipeline(seed=1), tmp_path / "other_gan")
    (other / "metrics.jsonl").write_text('{"step": 1, "loss_g": 2.0}\n{"step": 2, "loss_g": 1.5}\n')
    cost = training_cost(90 * 60.0, 2, ["Some CPU (AVX2)"], {"init_from": None})
    write_training_cost(other, cost)
    out = tmp_path / "report"
    args = ["--metrics", "fd,1nn", "--out", out, "--html"]
    result = invoke("compare", "--models", tiny_gan_dir, other, *SMALL, *common, *args)
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "<table>" in page and '<img alt="metrics" src="metrics.png"' in page and "<h1>Model comparison</h1>" in page
    assert "| fd_bloodnet | ↓ |" in report and "tiny_gan" in report and "other_gan" in report
    for name in ("metrics.png", "curves.png", "grids/real.png", "grids/tiny_gan.png", "grids/other_gan.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "models" / "other_gan" / "results.json").read_text())
    assert results["protocol"]["runs"] == 2 and results["machine"] == cpu_name()
    assert f"| {cpu_name()} |" in report  # speeds say which machine measured them
    assert "| 90 | Some CPU (AVX2) |" in report  # and what training cost, where the folder records it
    assert "| not recorded | not recorded |" in report
    again = invoke(
        "compare",
        "--models",
        f"{tiny_gan_dir},{other}",
        *SMALL,
        *common,
        "--metrics",
        "fd,1nn",
        "--out",
        out,
        "--reuse",
    )
    assert again.exit_code == 0 and again.output.count("reusing") == 2
    assert results["protocol"]["sampling"] == {"precision": "fp32"}
    kept = json.loads((out / "models" / "tiny_gan" / "results.json").read_text())
    kept["protocol"]["sampling"] = {}  # as written before --precision existed, when every run was fp32
    (out / "models" / "tiny_gan" / "results.json").write_text(json.dumps(kept))
    tiny_gan_pipeline(seed=2).save_pretrained(other)  # retrained in place: its old results no longer count
    retrained = invoke(
        "compare", "--models", f"{tiny_gan_dir},{other}", *SMALL, *common, *args[:2], "--out", out, "--reuse"
    )
    assert retrained.exit_code == 0 and retrained.output.count("reusing") == 1, retrained.output
    assert "== other_gan: evaluating" in retrained.output
    in_bf16 = invoke(
        "compare", "--models", tiny_gan_dir, *SMALL, *common, *args[:2], "--out", out, "--reuse", "--precision", "bf16"
    )
    assert in_bf16.exit_code == 0 and "reusing" not in in_bf16.output, in_bf16.output  # fp32 runs do not count


def test_augment_study_trains_every_setting_and_fraction(train_split_gan_dir, fake_data_dir, tmp_path):
    out = tmp_path / "study"
    args = ["--model", train_split_gan_dir, "--data-dir", fake_data_dir, "--fractions", "0.5,1", "--seeds", "0"]
    result = invoke(
        "augment-study", *args, *FIXED, "--steps", "2", "--batch-size", "8", "--out", out, "--device", "cpu", "--html"
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert (
        results["model"] == "tiny_gan"
        and "Synthetic images from <code>tiny_gan</code>" in (out / "report.html").read_text()
    )
    runs = {(r["setting"], r["fraction"]): r for r in results["runs"]}
    assert set(runs) == {(s, f) for s in ("real", "real+synthetic", "synthetic") for f in (0.5, 1.0)}
    assert runs["real", 0.5]["num_real"] == 24 and runs["real", 0.5]["num_synthetic"] == 0
    assert runs["real+synthetic", 1.0]["num_synthetic"] == 48 and runs["synthetic", 0.5]["num_synthetic"] == 24
    assert sum(map(sum, runs["synthetic", 1.0]["confusion"])) == 16  # the real test split
    for name in ("report.md", "accuracy.png", "confusion.png", "synthetic_pool.npz"):
        assert (out / name).is_file(), name


FIXED = ["--protocol", "fixed-steps"]  # the earlier protocol: a few steps keep these tests fast


def one_seed_study_args(model, data_dir, out) -> list:
    return ["--model", model, "--data-dir", data_dir, "--fractions", "1", "--seeds", "0", "--out", out]


def test_augment_study_resumes_keeping_the_pool_and_finished_runs(train_split_gan_dir, fake_data_dir, tmp_path):
    out = tmp_path / "study"
    args = one_seed_study_args(train_split_gan_dir, fake_data_dir, out)
    args += ["--settings", "real,synthetic", *FIXED, "--steps", "2", "--batch-size", "8", "--device", "cpu"]
    assert invoke("augment-study", *args).exit_code == 0
    # a study stopped after its first classifier: the second has no result yet, the first is marked
    (out / "runs" / "synthetic-1x-1-seed0" / "result.json").unlink()
    (out / "results.json").unlink()
    first = out / "runs" / "real-1-seed0" / "result.json"
    first.write_text(json.dumps({**json.loads(first.read_text()), "accuracy": 0.123}))

    assert invoke("augment-study", *args).exit_code != 0  # an existing study is never touched without a flag
    resumed = invoke("augment-study", *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "reusing the synthetic pool" in resumed.output and "real-1-seed0: finished earlier" in resumed.output
    runs = {r["setting"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert runs["real"]["accuracy"] == 0.123 and "synthetic" in runs


def test_augment_study_resume_refuses_other_settings(train_split_gan_dir, fake_data_dir, tmp_path):
    out = tmp_path / "study"
    args = one_seed_study_args(train_split_gan_dir, fake_data_dir, out)
    args += ["--settings", "real", *FIXED, "--batch-size", "8", "--device", "cpu"]
    assert invoke("augment-study", *args, "--steps", "2").exit_code == 0
    result = invoke("augment-study", *args, "--steps", "3", "--resume")
    assert result.exit_code != 0 and "was started with other settings (steps)" in result.output


def test_augment_study_resumes_at_the_precision_it_started_with(train_split_gan_dir, fake_data_dir, tmp_path):
    # a study started on a CPU with bf16 units resumes on one without: --precision names what auto would not pick
    out = tmp_path / "study"
    args = one_seed_study_args(train_split_gan_dir, fake_data_dir, out)
    args += ["--settings", "real", *FIXED, "--steps", "2", "--batch-size", "8", "--device", "cpu"]
    assert invoke("augment-study", *args, "--precision", "bf16").exit_code == 0
    assert json.loads((out / "study.json").read_text())["sampling"] == {"precision": "bf16"}
    refused = invoke("augment-study", *args, "--resume")  # auto: fp32 for a GAN
    assert refused.exit_code == 2 and "was started with other settings (sampling)" in refused.output
    resumed = invoke("augment-study", *args, "--resume", "--precision", "bf16")
    assert resumed.exit_code == 0, resumed.output


def test_synthetic_counts_per_setting():
    from bloodgen_hf.evaluation.augment_study import StudyConfig, synthetic_counts

    counts = np.array([10, 4, 6, 10, 1, 2, 3, 10])
    assert synthetic_counts(counts, "real+synthetic", StudyConfig(balance=True)).tolist() == [0, 6, 4, 0, 9, 8, 7, 0]
    assert synthetic_counts(counts, "synthetic", StudyConfig(balance=True)).tolist() == [6, 6, 6, 6, 6, 6, 5, 5]
    assert synthetic_counts(counts, "real+synthetic", StudyConfig(synthetic_ratio=0.5)).tolist() == [
        5,
        2,
        3,
        5,
        0,
        1,
        2,
        5,
    ]


def test_augment_study_rejects_bad_fractions(tiny_gan_dir, tmp_path):
    result = invoke("augment-study", "--model", tiny_gan_dir, "--fractions", "0,2", "--out", tmp_path / "s")
    assert result.exit_code == 2 and "--fractions must be in (0, 1]" in result.output
