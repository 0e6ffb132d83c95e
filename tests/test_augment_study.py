"""augment-study's converged protocol and recipes (issue 31) on tiny fixtures: the epoch is chosen on the val
split and never on the test split, class balancing and ratios per class, the filter, the pool that grows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bloodgen_hf.cli import app
from bloodgen_hf.evaluation import augment_study, bloodnet_train
from bloodgen_hf.evaluation.augment_study import StudyConfig, draw_synthetic, grow_pool, run_study, synthetic_counts
from bloodgen_hf.evaluation.bloodnet_train import MODEL_FOLDER, BloodNetTask, load_classifier
from bloodgen_hf.evaluation.metrics import classification_report
from bloodgen_hf.process import cpu_name, native_bf16
from bloodgen_hf.registry import load_pipeline
from tests.conftest import tiny_gan_pipeline

TINY = {"classifier": "bloodnet-small", "channels": (4, 8, 8), "batch_size": 16, "seeds": (0,), "min_steps": 0}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def train_split_gan(tmp_path: Path):
    """The tiny GAN, recorded as trained on the train split only, loaded as a pipeline."""
    from bloodgen_hf.provenance import training_provenance
    from bloodgen_hf.registry import save_pipeline

    pipe = tiny_gan_pipeline()
    provenance = training_provenance("bloodmnist", 28, "train", 48)
    folder = save_pipeline(type(pipe)(gan=pipe.gan, provenance=provenance), tmp_path / "tiny_gan")
    return load_pipeline(str(folder), "cpu")


@pytest.fixture
def disagreeing_data_dir(fake_data_dir: Path) -> Path:
    """The fake archive with shuffled val labels: the epoch that val prefers is not the one test would."""
    path = fake_data_dir / "bloodmnist.npz"
    with np.load(path) as saved:
        arrays = dict(saved)
    arrays["val_labels"] = np.random.default_rng(5).permutation(arrays["val_labels"])
    np.savez(path, **arrays)
    return fake_data_dir


def test_the_epoch_is_chosen_on_val_and_never_on_test(train_split_gan, disagreeing_data_dir, tmp_path, monkeypatch):
    with np.load(disagreeing_data_dir / "bloodmnist.npz") as saved:
        val, test, test_labels = saved["val_images"], saved["test_images"], saved["test_labels"].ravel()
    seen_in_training = []
    real_predict = bloodnet_train.predict

    def spy(model, images, *args, **kwargs):
        seen_in_training.append(images)
        return real_predict(model, images, *args, **kwargs)

    monkeypatch.setattr(bloodnet_train, "predict", spy)
    config = StudyConfig(fractions=(1.0,), settings=("real",), epochs=6, **TINY)
    results = run_study(train_split_gan, tmp_path / "s", config, disagreeing_data_dir, log=lambda *_: None)

    assert len(seen_in_training) == 6 and all(np.array_equal(x, val) for x in seen_in_training)  # val only
    run = results["runs"][0]
    curve = [e["macro_f1"] for e in run["val_curve"]]
    assert len(curve) == 6 and run["chosen_epoch"] == int(np.argmax(curve)) + 1  # first best val epoch
    saved = load_classifier(tmp_path / "s" / "runs" / "real-1-seed0" / "pipeline" / MODEL_FOLDER)
    predicted = real_predict(saved, test, with_features=False)[1].argmax(1)
    assert classification_report(test_labels, predicted, 8)["accuracy"] == run["accuracy"]  # scored once, chosen
    with np.load(disagreeing_data_dir / "bloodmnist.npz") as data:
        val_pred = real_predict(saved, data["val_images"], with_features=False)[1].argmax(1)
        val_report = classification_report(data["val_labels"].ravel(), val_pred, 8)
    assert val_report["macro_f1"] == pytest.approx(run["val_at_chosen"]["macro_f1"])  # the saved weights are those


def test_chosen_keeps_the_first_best_epoch_and_last_without_keep_best():
    curve = [
        {"epoch": i + 1, "accuracy": a, "macro_f1": f} for i, (a, f) in enumerate([(0.5, 0.4), (0.9, 0.7), (0.8, 0.7)])
    ]
    assert BloodNetTask(models={}, optimizers={}, options={"keep_best": True}, curve=curve).chosen()["epoch"] == 2
    by_accuracy = BloodNetTask(models={}, optimizers={}, options={"keep_best": True, "select_on": "accuracy"})
    by_accuracy.curve = curve
    assert by_accuracy.chosen()["epoch"] == 2
    assert BloodNetTask(models={}, optimizers={}, curve=curve).chosen()["epoch"] == 3


@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0, 4.0])
def test_the_ratio_is_honoured_per_class(ratio):
    counts = np.array([12, 31, 15, 29, 12, 14, 33, 23])
    extra = synthetic_counts(counts, "real+synthetic", StudyConfig(synthetic_ratio=ratio))
    assert extra.tolist() == np.round(ratio * counts).astype(int).tolist()
    pool = {"images": np.arange(1600)[:, None], "labels": np.repeat(np.arange(8), 200)}
    _, labels = draw_synthetic(pool, extra, np.random.default_rng(0))
    assert np.bincount(labels, minlength=8).tolist() == extra.tolist()


def test_balancing_tops_every_class_up_to_the_largest_exactly():
    counts = np.array([12, 31, 15, 29, 12, 14, 33, 23])
    extra = synthetic_counts(counts, "real+synthetic", StudyConfig(balance=True))
    assert (counts + extra).tolist() == [33] * 8 and extra.min() == 0


def test_the_converged_batch_and_epochs_follow_the_real_subset():
    config = StudyConfig()
    assert [config.batch_for(n) for n in (48, 119, 1196, 5979, 11959)] == [16, 16, 32, 128, 128]
    assert [config.epochs_for(n) for n in (119, 1196, 11959)] == [144, 28, 20]  # >= 1000 steps of real images
    assert [config.epochs_per_evaluation(e) for e in (144, 28, 20)] == [8, 2, 1]  # <= 20 val evaluations
    assert StudyConfig(protocol="fixed-steps").batch_for(48) == 48


def test_a_pool_grown_later_holds_the_same_images_as_one_made_at_once(train_split_gan):
    quiet = {"log": lambda *_: None}
    at_once = grow_pool(None, train_split_gan, np.array([3, 0, 2, 0, 0, 0, 0, 1]), {}, 8, **quiet)
    first = grow_pool(None, train_split_gan, np.array([1, 0, 2, 0, 0, 0, 0, 0]), {}, 8, **quiet)
    grown = grow_pool(first, train_split_gan, np.array([3, 0, 1, 0, 0, 0, 0, 1]), {}, 8, **quiet)
    assert len(grown["labels"]) == 6
    by_seed = lambda pool: {int(s): img.tobytes() for s, img in zip(pool["seeds"], pool["images"])}  # noqa: E731
    assert by_seed(grown) == by_seed(at_once)


def test_the_filter_keeps_only_what_the_real_only_classifier_accepts(train_split_gan, fake_data_dir, tmp_path):
    out = tmp_path / "s"
    config = StudyConfig(fractions=(1.0,), settings=("real", "real+synthetic"), epochs=2, filter_threshold=0.05, **TINY)
    results = run_study(train_split_gan, out, config, fake_data_dir, log=lambda *_: None)
    runs = {r["recipe"]: r for r in results["runs"]}
    assert set(runs) == {"real", "1x+filter0.05"} and (out / "runs" / "real+synthetic-1x+filter0.05-1-seed0").is_dir()
    acceptance = runs["1x+filter0.05"]["filter_acceptance"]
    assert len(acceptance) == 8 and all(0 <= a <= 1 for a in acceptance)
    with np.load(out / "synthetic_pool.npz") as pool:  # 1.5 candidates per image the recipe draws
        assert np.bincount(pool["labels"], minlength=8).tolist() == [9] * 8

    config.filter_threshold = 0.999  # nothing this sure: one clear refusal, not a silent shortfall
    with pytest.raises(ValueError, match="passed the filter.*lower --filter-threshold"):
        run_study(train_split_gan, out, config, fake_data_dir, log=lambda *_: None, resume=True)


def test_the_filter_trains_again_a_real_only_classifier_whose_weights_were_deleted(
    train_split_gan, fake_data_dir, tmp_path
):
    """Only result.json of a finished run may be kept, to save disk; a filter recipe added later with --resume
    trains that real-only classifier again and gets the same one back (same seed, same data)."""
    out = tmp_path / "s"
    settings = ("real+synthetic", "real")  # in this order, the real-only run must still come first
    config = StudyConfig(fractions=(1.0,), settings=settings, epochs=2, **TINY)
    run_study(train_split_gan, out, config, fake_data_dir, log=lambda *_: None)
    real = out / "runs" / "real-1-seed0"
    before = json.loads((real / "result.json").read_text())
    shutil.rmtree(real / "pipeline")
    config = StudyConfig(fractions=(1.0,), settings=settings, epochs=2, filter_threshold=0.05, **TINY)
    results = run_study(train_split_gan, out, config, fake_data_dir, log=lambda *_: None, resume=True)
    after = json.loads((real / "result.json").read_text())
    assert (real / "pipeline").is_dir() and {r["recipe"] for r in results["runs"]} == {"real", "1x", "1x+filter0.05"}
    assert (after["accuracy"], after["chosen_epoch"], after["confusion"]) == (
        before["accuracy"],
        before["chosen_epoch"],
        before["confusion"],
    )


def test_a_resumed_study_adds_a_recipe_and_reports_both(train_split_gan, fake_data_dir, tmp_path):
    out = tmp_path / "s"
    config = StudyConfig(fractions=(1.0,), settings=("real", "real+synthetic"), epochs=1, **TINY)
    run_study(train_split_gan, out, config, fake_data_dir, log=lambda *_: None)
    config.balance = True
    logged = []
    results = run_study(train_split_gan, out, config, fake_data_dir, log=logged.append, resume=True)
    assert any("real-1-seed0: finished earlier" in line for line in logged)
    assert sorted(r["recipe"] for r in results["runs"]) == ["1x", "balance", "real"]
    report = (out / "report.md").read_text()
    assert "| real+synthetic (balance) |" in report and "| real+synthetic (1x) |" in report
    assert (out / "val_curves.png").is_file()
    config.epochs = 2  # the protocol itself may not change under --resume
    with pytest.raises(ValueError, match="other settings"):
        run_study(train_split_gan, out, config, fake_data_dir, log=lambda *_: None, resume=True)


def test_a_resumed_recipe_may_run_on_some_fractions_and_seeds_only(train_split_gan, fake_data_dir, tmp_path):
    out = tmp_path / "s"
    tiny = {**TINY, "seeds": (0, 1)}
    config = StudyConfig(fractions=(0.5, 1.0), settings=("real", "real+synthetic"), epochs=1, **tiny)
    run_study(train_split_gan, out, config, fake_data_dir, log=lambda *_: None)
    config.balance, config.fractions, config.seeds = True, (0.5,), (1,)
    results = run_study(train_split_gan, out, config, fake_data_dir, log=lambda *_: None, resume=True)
    balanced = [(r["fraction"], r["seed"]) for r in results["runs"] if r["recipe"] == "balance"]
    assert balanced == [(0.5, 1)] and len(results["runs"]) == 9
    report = (out / "report.md").read_text()
    assert "| real+synthetic (balance) |" in report and "[seeds 1]" in report
    config.fractions, config.seeds = (0.25,), (0,)  # a new fraction: its real run comes first, then the recipe
    results = run_study(train_split_gan, out, config, fake_data_dir, log=lambda *_: None, resume=True)
    added = sorted(r["setting"] for r in results["runs"] if r["fraction"] == 0.25)
    assert added == ["real", "real+synthetic"]


def test_the_change_against_real_is_paired_by_seed():
    def cell(row, setting, by_seed):
        values = list(by_seed.values())
        stats = {"mean": float(np.mean(values)), "std": 0.0}
        record = {str(s): {"accuracy": v, "macro_f1": v} for s, v in by_seed.items()}
        return {
            "row": row,
            "setting": setting,
            "fraction": 0.1,
            "seeds": list(by_seed),
            "by_seed": record,
            "accuracy": stats,
            "macro_f1": stats,
        }

    real = cell("real", "real", {0: 0.90, 1: 0.80, 2: 0.70})
    recipe = cell("real+synthetic (2x)", "real+synthetic", {0: 0.91})  # seed 0 only: +1 point, not +11
    assert augment_study.paired_change(recipe, real, "macro_f1") == pytest.approx(1.0)
    table = augment_study.study_table([real, recipe], "macro_f1")
    assert "0.910 ± 0.000 (+1.0) [seeds 0]" in table[-1]


def test_the_sampling_table_pairs_each_study_with_its_own_real_runs_and_reports_val_beside_test():
    def run(setting, recipe, seed, val, test):
        scores = {"val_at_chosen": {"macro_f1": val}, "macro_f1": test}
        return {"setting": setting, "recipe": recipe, "fraction": 0.1, "seed": seed, **scores}

    default = {
        "model": "ddpm-fast",
        "sampling": {"precision": "bf16"},
        "runs": [run("real", "real", 0, 0.90, 0.80), run("real+synthetic", "2x", 0, 0.92, 0.83)],
    }
    guided = {
        "model": "ddpm",
        "sampling": {"precision": "bf16", "guidance_scale": 2.0, "num_inference_steps": 4},
        "runs": [  # its own real runs differ from the other study's: each change is against its own
            run("real", "real", 0, 0.80, 0.70),
            run("real", "real", 1, 0.80, 0.70),
            run("real+synthetic", "2x", 0, 0.81, 0.74),
            run("real+synthetic", "2x", 1, 0.83, 0.72),
            run("real+synthetic", "2x", 2, 0.99, 0.99),  # no real run of seed 2: left out
        ],
    }
    lines = augment_study.sampling_table([default, guided], 0.1, "real+synthetic (2x)")
    assert lines[2] == "| `ddpm-fast` | its defaults | 0.920 ± 0.000 (+2.0) | 0.830 ± 0.000 (+3.0) |"
    assert lines[3] == "| `ddpm` | guidance 2, steps 4 | 0.820 ± 0.014 (+2.0) | 0.730 ± 0.014 (+3.0) |"
    with pytest.raises(ValueError, match="no 'real\\+synthetic \\(4x\\)' run at 0.1"):
        augment_study.sampling_table([default], 0.1, "real+synthetic (4x)")


def test_converged_results_record_every_cell(train_split_gan, fake_data_dir, tmp_path):
    config = StudyConfig(fractions=(0.5, 1.0), settings=("real", "real+synthetic"), epochs=2, **TINY)
    results = run_study(train_split_gan, tmp_path / "s", config, fake_data_dir, log=lambda *_: None)
    saved = json.loads((tmp_path / "s" / "results.json").read_text())
    assert saved["runs"] == results["runs"] and len(saved["runs"]) == 4
    for run in saved["runs"]:
        for key in ("fraction", "seed", "recipe", "classifier", "accuracy", "macro_f1", "epochs", "chosen_epoch"):
            assert key in run, key
        assert run["protocol"] == "converged" and len(run["val_curve"]) == 2 and run["cpu_minutes"] > 0
        assert run["machine"] == cpu_name() and run["mixed_precision"] == ("bf16" if native_bf16() else "no")
    report = (tmp_path / "s" / "report.md").read_text()
    assert f"Classifiers trained on: {cpu_name()}, " in report and "(4 of 4)" in report


def test_the_report_names_each_machine_and_precision_and_skips_unrecorded_runs():
    runs = [
        {"machine": "CPU A", "mixed_precision": "bf16"},
        {"machine": "CPU B", "mixed_precision": "no"},
        {"machine": "CPU A", "mixed_precision": "bf16"},
        {},
    ]
    line = augment_study.machine_lines(runs)[-1]
    assert line == "Classifiers trained on: CPU A, bf16 autocast (2 of 4); CPU B, fp32 (1 of 4)."
    assert augment_study.machine_lines([{}]) == []


def test_a_generator_that_saw_the_test_split_is_refused_by_the_converged_study(fake_data_dir, tmp_path):
    from bloodgen_hf.provenance import training_provenance
    from bloodgen_hf.registry import save_pipeline

    pipe = tiny_gan_pipeline()
    leaky = type(pipe)(gan=pipe.gan, provenance=training_provenance("bloodmnist", 28, "all", 80))
    folder = save_pipeline(leaky, tmp_path / "leaky")
    result = invoke("augment-study", "--model", folder, "--data-dir", fake_data_dir, "--out", tmp_path / "s")
    assert result.exit_code == 2 and "the 'test' split augment-study scores on" in result.output
    assert not (tmp_path / "s" / "runs").exists()


def test_budget_flags_belong_to_their_protocol(train_split_gan, tmp_path):
    result = invoke("augment-study", "--steps", "5", "--out", tmp_path / "s")
    assert result.exit_code == 2 and "--steps is the fixed-steps protocol's budget" in result.output
    result = invoke("augment-study", "--protocol", "fixed-steps", "--epochs", "5", "--out", tmp_path / "s")
    assert result.exit_code == 2 and "--epochs is the converged protocol's budget" in result.output
    with pytest.raises(ValueError, match="--classifier must be one of"):
        StudyConfig(classifier="vgg").check()
    with pytest.raises(ValueError, match="keep 'real' in --settings"):
        StudyConfig(settings=("real+synthetic",), filter_threshold=0.5).check()


def test_resnet18_is_medmnists_and_trains_in_the_study(train_split_gan, fake_data_dir, tmp_path):
    from bloodgen_hf.evaluation.bloodnet import ResNet18Classifier

    net = ResNet18Classifier()
    assert net.net.conv1.kernel_size == (3, 3) and net.net.conv1.stride == (1, 1)
    assert isinstance(net.net.maxpool, __import__("torch").nn.Identity) and net.feature_dim == 512
    config = StudyConfig(fractions=(1.0,), settings=("real",), epochs=1, classifier="resnet18", seeds=(0,), min_steps=0)
    results = run_study(train_split_gan, tmp_path / "s", config, fake_data_dir, log=lambda *_: None)
    assert results["runs"][0]["classifier"] == "resnet18"
    saved = load_classifier(tmp_path / "s" / "runs" / "real-1-seed0" / "pipeline" / MODEL_FOLDER)
    assert isinstance(saved, ResNet18Classifier)
    assert augment_study.CLASSIFIERS["resnet18"] == {"arch": "resnet18"}


# --- `bloodgen-hf augment`: the recipe applied to a user's labelled data -----------------------------------


def read_manifest(folder: Path) -> list[dict]:
    import csv

    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_augment_writes_real_and_synthetic_images_marked_in_the_manifest(tiny_gan_dir, fake_data_dir, tmp_path):
    out = tmp_path / "aug"
    args = ["--model", tiny_gan_dir, "--data-dir", fake_data_dir, "--device", "cpu"]  # the default recipe: 2x
    result = invoke("augment", *args, "--out", out, "--seed", "5")
    assert result.exit_code == 0, result.output
    rows = read_manifest(out)
    real = [r for r in rows if r["source"] == "real"]
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    assert len(real) == 48 and len(synthetic) == 96 and "48 real + 96 synthetic" in result.output
    per_class = lambda rs: np.bincount([int(r["label"]) for r in rs], minlength=8).tolist()  # noqa: E731
    assert per_class(synthetic) == [2 * c for c in per_class(real)]  # the ratio, class by class
    assert all(r["seed"] == "" for r in real) and sorted(int(r["seed"]) for r in synthetic) == list(range(5, 101))
    assert all((out / r["file"]).is_file() and r["file"].startswith(r["class_name"] + "/") for r in rows)
    with np.load(fake_data_dir / "bloodmnist.npz") as data:  # real images are written as they were read
        first = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / real[0]["file"]))
        assert np.array_equal(first, data["train_images"][0])
    info = json.loads((out / "info.json").read_text())
    assert info["recipe"] == "2x" and info["num_images"] == {"real": 48, "synthetic": 96}

    again = invoke("augment", *args, "--out", out)  # never over an existing output without --overwrite
    assert again.exit_code == 2 and len(read_manifest(out)) == 144


def test_augment_balance_tops_up_to_the_largest_class_as_a_dataset(tiny_gan_dir, tmp_path):
    from datasets import load_from_disk

    from tests.conftest import write_fake_bloodmnist

    folder = tmp_path / "cells"  # an ImageFolder with unequal classes
    data_dir = write_fake_bloodmnist(tmp_path / "d")
    with np.load(data_dir / "bloodmnist.npz") as data:
        images, labels = data["train_images"], data["train_labels"].ravel()
    from PIL import Image

    from bloodgen_hf.data import CLASS_NAMES

    keep = [i for i in range(len(labels)) if labels[i] != 0 or i < 8]  # basophils: 1 of 6
    for i in keep:
        (folder / CLASS_NAMES[labels[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / CLASS_NAMES[labels[i]] / f"{i}.png")
    out = tmp_path / "aug"
    result = invoke(
        "augment", "--model", tiny_gan_dir, "--dataset", folder, "--split", "all", "--balance",
        "--format", "hf-dataset", "--out", out, "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    dataset = load_from_disk(str(out))
    totals = np.bincount(dataset["label"], minlength=8)
    assert totals.tolist() == [6] * 8 and dataset["source"].count("real") == len(keep)
    assert np.bincount([lb for lb, s in zip(dataset["label"], dataset["source"]) if s == "synthetic"])[0] == 5


def test_augment_refuses_a_bad_recipe_and_other_classes(tiny_gan_dir, fake_data_dir, tmp_path):
    result = invoke("augment", "--model", tiny_gan_dir, "--synthetic-ratio", "-1", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "--synthetic-ratio must be positive" in result.output
    result = invoke(
        "augment", "--model", tiny_gan_dir, "--dataset", "pathmnist", "--data-dir", fake_data_dir,
        "--out", tmp_path / "b", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 2 and not (tmp_path / "b").exists()


def test_long_runs_score_val_every_few_epochs(train_split_gan, fake_data_dir, tmp_path):
    config = StudyConfig(fractions=(1.0,), settings=("real",), epochs=5, max_evaluations=2, **TINY)
    run = run_study(train_split_gan, tmp_path / "s", config, fake_data_dir, log=lambda *_: None)["runs"][0]
    assert run["epochs"] == 6 and [e["epoch"] for e in run["val_curve"]] == [3, 6]  # rounded up to a whole k
    assert run["chosen_epoch"] in (3, 6)


def test_synthetic_images_can_weigh_less_in_the_loss(train_split_gan, fake_data_dir, tmp_path):
    import torch

    from bloodgen_hf.evaluation.augment_study import WeightedImages

    data = WeightedImages(np.zeros((4, 28, 28, 3), np.uint8), np.arange(4), np.array([1, 1, 0.5, 0.5]))
    assert data.batch(torch.tensor([0, 2]))[2].tolist() == [1.0, 0.5]
    config = StudyConfig(fractions=(1.0,), settings=("real+synthetic",), epochs=1, synthetic_weight=0.5, **TINY)
    run = run_study(train_split_gan, tmp_path / "s", config, fake_data_dir, log=lambda *_: None)["runs"][0]
    assert run["recipe"] == "1x+w0.5" and (tmp_path / "s" / "runs" / "real+synthetic-1x+w0.5-1-seed0").is_dir()
    with pytest.raises(ValueError, match="--synthetic-weight must be in"):
        StudyConfig(synthetic_weight=0).check()


def test_weighted_loss_with_equal_weights_is_the_plain_loss():
    import torch
    from accelerate import Accelerator

    from bloodgen_hf.evaluation.bloodnet import BloodNet

    def one_step(weights):
        torch.manual_seed(0)
        model = BloodNet(channels=(4, 8, 8), blocks_per_stage=1)
        task = BloodNetTask(
            models={"classifier": model},
            optimizers={"classifier": torch.optim.SGD(model.parameters(), lr=0.1)},
            options={"label_smoothing": 0.05},
        )
        torch.manual_seed(1)
        images, labels = torch.randn(6, 3, 28, 28), torch.arange(6)
        return task.training_step(images, labels, Accelerator(cpu=True), weights)["loss"]

    assert one_step(None) == pytest.approx(one_step(torch.full((6,), 0.7)))
    assert one_step(None) != pytest.approx(one_step(torch.tensor([1, 1, 1, 0.1, 0.1, 0.1])))


def test_report_only_reports_the_finished_runs_and_trains_nothing(train_split_gan, fake_data_dir, tmp_path):
    out = tmp_path / "s"
    config = StudyConfig(fractions=(1.0,), settings=("real", "real+synthetic"), epochs=1, **TINY)
    with pytest.raises(ValueError, match="holds no study"):
        run_study(train_split_gan, out, config, fake_data_dir, log=lambda *_: None, report_only=True)
    run_study(train_split_gan, out, config, fake_data_dir, log=lambda *_: None)
    (out / "report.md").unlink()
    config.balance = True  # a recipe not trained yet: left out, not started
    results = run_study(train_split_gan, out, config, fake_data_dir, log=lambda *_: None, report_only=True)
    assert [r["recipe"] for r in results["runs"]] == ["real", "1x"] and (out / "report.md").is_file()
    assert not (out / "runs" / "real+synthetic-balance-1-seed0").exists()


def test_a_stopped_classifier_continues_exactly_from_its_last_val_evaluation(
    train_split_gan, fake_data_dir, tmp_path, monkeypatch
):
    from bloodgen_hf.training import core

    config = StudyConfig(fractions=(1.0,), settings=("real",), epochs=6, **TINY)
    whole = run_study(train_split_gan, tmp_path / "whole", config, fake_data_dir, log=lambda *_: None)["runs"][0]

    class Stopped(Exception):
        pass

    saved, save = [], core.save_checkpoint

    def stop_after_the_third(*args, **kwargs):
        saved.append(save(*args, **kwargs))
        if len(saved) == 3:  # a checkpoint at every val evaluation: the third is epoch 3 of 6
            raise Stopped

    monkeypatch.setattr(core, "save_checkpoint", stop_after_the_third)
    with pytest.raises(Stopped):
        run_study(train_split_gan, tmp_path / "stopped", config, fake_data_dir, log=lambda *_: None)
    monkeypatch.setattr(core, "save_checkpoint", save)
    step = json.loads((saved[2] / "progress.json").read_text())["step"]
    logged = []
    resumed = run_study(train_split_gan, tmp_path / "stopped", config, fake_data_dir, log=logged.append, resume=True)
    run = resumed["runs"][0]

    assert any(f"from the checkpoint at step {step}" in line for line in logged)
    assert run["resumed_at_step"] == step and "resumed_at_step" not in whole
    assert run["val_curve"] == whole["val_curve"] and run["chosen_epoch"] == whole["chosen_epoch"]
    assert run["accuracy"] == whole["accuracy"] and run["confusion"] == whole["confusion"]
    weights = [
        load_classifier(tmp_path / name / "runs" / "real-1-seed0" / "pipeline" / MODEL_FOLDER).state_dict()
        for name in ("whole", "stopped")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_finetune_continues_every_classifier_on_its_real_images_alone(
    train_split_gan, fake_data_dir, tmp_path, monkeypatch
):
    calls, train = [], augment_study.train_classifier

    def spy(images, labels, *args, **kwargs):
        calls.append((len(labels), kwargs.get("epochs"), kwargs.get("init_from")))
        return train(images, labels, *args, **kwargs)

    monkeypatch.setattr(augment_study, "train_classifier", spy)
    config = StudyConfig(fractions=(1.0,), settings=("real", "real+synthetic"), epochs=2, finetune_epochs=3, **TINY)
    results = run_study(train_split_gan, tmp_path / "s", config, fake_data_dir, log=lambda *_: None)

    runs = {r["recipe"]: r for r in results["runs"]}
    assert sorted(runs) == ["1x+ft3", "real+ft3"]
    n = runs["real+ft3"]["num_real"]
    assert [c[:2] for c in calls] == [(n, None), (n, 3), (2 * n, None), (n, 3)]  # each base, then real alone
    folders = [tmp_path / "s" / "runs" / name for name in ("real-ft3-1-seed0", "real+synthetic-1x+ft3-1-seed0")]
    assert [calls[1][2], calls[3][2]] == [f / "pipeline" / MODEL_FOLDER for f in folders]  # the base's chosen weights
    for run in runs.values():
        fine = run["finetune"]
        assert run["epochs"] == 5 and [e["epoch"] for e in fine["val_curve"]] == [1, 2, 3]
        candidates = [e for e in fine["base_val_curve"] if e["epoch"] == fine["from_epoch"]] + fine["val_curve"]
        assert run["val_at_chosen"]["macro_f1"] == max(e["macro_f1"] for e in candidates)  # val chooses again
        assert run["chosen_epoch"] == fine["from_epoch"] + fine["chosen_epoch"]
        assert set(run["before_finetune"]) == {"accuracy", "macro_f1"}
    report = (tmp_path / "s" / "report.md").read_text()
    assert "| real (ft3) |" in report and "| real+synthetic (1x+ft3) |" in report


def test_a_finetune_that_val_does_not_prefer_is_dropped(train_split_gan, fake_data_dir, tmp_path):
    from bloodgen_hf.data import CLASS_NAMES, load_data

    config = StudyConfig(fractions=(1.0,), settings=("real",), epochs=2, finetune_epochs=1, **TINY)
    run_study(train_split_gan, tmp_path / "s", config, fake_data_dir, log=lambda *_: None)
    folder = tmp_path / "s" / "runs" / "real-ft1-1-seed0"
    base = json.loads((folder / augment_study.BASE_RECORD).read_text())
    base["val_at_chosen"] = {**base["val_at_chosen"], "macro_f1": 1.0}  # a base no fine-tune can beat
    images, labels = load_data("bloodmnist", "train", 28, fake_data_dir)[:2]
    holdout = load_data("bloodmnist", "val", 28, fake_data_dir)[:2]
    model, record = augment_study.finetune_on_real(
        base, images, labels, holdout, config, 0, folder, CLASS_NAMES, log=lambda *_: None
    )
    assert not record["finetune"]["kept"] and record["chosen_epoch"] == base["chosen_epoch"]
    kept = load_classifier(folder / "pipeline" / MODEL_FOLDER).state_dict()
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())


def test_a_resumed_finetune_keeps_its_finished_base(train_split_gan, fake_data_dir, tmp_path, monkeypatch):
    config = StudyConfig(fractions=(1.0,), settings=("real",), epochs=2, finetune_epochs=2, **TINY)
    whole = run_study(train_split_gan, tmp_path / "s", config, fake_data_dir, log=lambda *_: None)["runs"][0]
    (tmp_path / "s" / "runs" / "real-ft2-1-seed0" / "result.json").unlink()  # stopped after its base and fine-tune
    calls, train = [], augment_study.train_classifier
    monkeypatch.setattr(augment_study, "train_classifier", lambda *a, **k: calls.append(k) or train(*a, **k))
    logged = []
    run = run_study(train_split_gan, tmp_path / "s", config, fake_data_dir, log=logged.append, resume=True)["runs"][0]
    assert len(calls) == 1 and calls[0]["epochs"] == 2 and calls[0]["resume"]  # the fine-tune only, continued
    assert any("before its fine-tune" in line for line in logged)
    assert (run["accuracy"], run["chosen_epoch"], run["val_curve"]) == (
        whole["accuracy"],
        whole["chosen_epoch"],
        whole["val_curve"],
    )


def test_finetune_flags_are_checked():
    with pytest.raises(ValueError, match="--finetune-epochs must be at least 0"):
        StudyConfig(finetune_epochs=-1).check()
    with pytest.raises(ValueError, match="needs --protocol converged"):
        StudyConfig(finetune_epochs=2, protocol="fixed-steps").check()
    with pytest.raises(ValueError, match="separate recipes"):
        StudyConfig(finetune_epochs=2, filter_threshold=0.5).check()
    assert StudyConfig(synthetic_ratio=2, finetune_epochs=5).recipe == "2x+ft5"
    assert augment_study.run_name("real", StudyConfig(finetune_epochs=5), 0.1, 0) == "real-ft5-0.1-seed0"
    assert augment_study.run_name("real", StudyConfig(), 0.1, 0) == "real-0.1-seed0"
    assert augment_study.row_label("real", "real+ft5") == "real (ft5)"
