"""Provenance: pipelines record their training data, and nothing is scored on data it may have seen.

The refusal (augment-study, compare --tstr), the round trip of the record through save/load, a
per-fraction generator that sees only the classifier's subset R_f, and TSTR, on tiny models and data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bloodgen_hf.cli import app
from bloodgen_hf.data import CLASS_NAMES, load_data
from bloodgen_hf.evaluation.bloodnet import BloodNet
from bloodgen_hf.pipelines.blood_pipeline_utils import (
    expand_provenance,
    flatten_provenance,
    is_provenance_summary,
    record_links,
)
from bloodgen_hf.provenance import (
    LeakError,
    check_unseen,
    content_sha256,
    describe_provenance,
    indices_fingerprint,
    portable_provenance,
    real_subset,
    same_dataset,
    training_provenance,
)
from bloodgen_hf.registry import ModelLoadError, bundled_models, load_pipeline, read_model_index, save_pipeline
from tests.conftest import tiny_ddpm_pipeline, tiny_gan_pipeline, tiny_vae_pipeline

TRAIN = training_provenance("bloodmnist", 28, "train", 48)
ALL = training_provenance("bloodmnist", 28, "all", 80)
STUDY = ["--seeds", "0", "--protocol", "fixed-steps", "--steps", "2", "--batch-size", "8", "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def with_provenance(pipe, provenance: dict | None):
    return type(pipe)(**pipe.components, provenance=provenance)


def saved_gan(folder: Path, provenance: dict | None) -> Path:
    return save_pipeline(with_provenance(tiny_gan_pipeline(), provenance), folder)


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# --- the refusal ---------------------------------------------------------------------------------------


def test_augment_study_refuses_a_generator_trained_on_all_splits(fake_data_dir, tmp_path):
    model = saved_gan(tmp_path / "leaky_gan", ALL)
    out = tmp_path / "study"
    result = invoke("augment-study", "--model", model, "--data-dir", fake_data_dir, "--out", out, *STUDY)
    line = one_error_line(result)
    assert "leaky_gan" in line and "split 'all'" in line and "the 'test' split augment-study scores on" in line
    assert not out.exists()


def test_augment_study_refuses_a_generator_without_provenance(tiny_gan_dir, fake_data_dir, tmp_path):
    out = tmp_path / "study"
    result = invoke("augment-study", "--model", tiny_gan_dir, "--data-dir", fake_data_dir, "--out", out, *STUDY)
    line = one_error_line(result)
    assert "tiny_gan records no training data" in line and "retrain it with a train script" in line


@pytest.mark.parametrize(
    "provenance, message",
    [
        (training_provenance("bloodmnist", 28, "test", 16), "which includes the 'test' split"),
        (training_provenance("pathmnist", 28, "train", 16), "not on bloodmnist"),
        (
            {**TRAIN, "init_from": {"model": "ddpm", "provenance": ALL}},
            "(started from ddpm) was trained on split 'all'",
        ),
        ({**TRAIN, "init_from": {"model": "old", "provenance": None}}, "(started from old) records no training data"),
        ({**TRAIN, "adversarial": ALL}, "(its adversarial term) was trained on split 'all'"),
        (
            {**TRAIN, "distilled_from": {"model": "ddpm", "provenance": {**TRAIN, "adversarial": ALL}}},
            "(distilled from ddpm) (its adversarial term) was trained on split 'all'",
        ),
    ],
)
def test_check_unseen_follows_split_dataset_and_starting_weights(provenance, message):
    with pytest.raises(LeakError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_unseen(provenance, "m", "test", "bloodmnist", "augment-study")
    check_unseen(TRAIN, "m", "test", "BloodMNIST", "augment-study")  # the train split alone passes


def test_bundled_generators_record_the_splits_they_saw():
    """gan (v2), vae (v2) and ddpm (v2) saw only the train split, so they may feed augment-study (the v1 GAN and VAE
    saw every split, and were refused). Each later ddpm run started from the bundled weights before it (--init-from
    ddpm, named by a git revision); every link of that chain saw the train split too, and the first started from
    scratch."""
    for name in ("gan", "vae"):
        provenance = read_model_index(bundled_models()[name])["provenance"]
        assert provenance["split"] == "train" and provenance["subset"] is None and provenance["init_from"] is None
        assert provenance["num_images"] == 11959
        check_unseen(provenance, name, "test", "bloodmnist", "augment-study")
    provenance = read_model_index(bundled_models()["ddpm"])["provenance"]
    link, depth = provenance, 0
    while True:
        assert link["split"] == "train" and link["subset"] is None and link["num_images"] == 11959
        if link["init_from"] is None:
            break
        start = link["init_from"]
        assert start["model"] == "ddpm" and start["revision"].startswith("git ")
        link, depth = start["provenance"], depth + 1
    assert depth >= 1
    check_unseen(provenance, "ddpm", "test", "bloodmnist", "augment-study")
    start = provenance["init_from"]
    leaky_start = {**start, "provenance": {**start["provenance"], "split": "all"}}
    with pytest.raises(LeakError):
        check_unseen({**provenance, "init_from": leaky_start}, "ddpm", "test", "bloodmnist", "augment-study")


def test_the_bundled_student_records_its_teacher_and_the_real_images_of_its_adversarial_term():
    """ddpm-fast learnt from its teacher's pairs and, in its last run, from real train images through a
    discriminator: both are recorded, both saw the train split only, and the card's sentence names both."""
    provenance = read_model_index(bundled_models()["ddpm-fast"])["provenance"]
    adversarial = {"dataset": "bloodmnist", "split": "train", "resolution": 28, "num_images": 11959}
    assert provenance["adversarial"] == adversarial
    teacher = provenance["distilled_from"]
    assert teacher["model"] == "ddpm" and teacher["revision"].startswith("git ")
    assert provenance["init_from"]["revision"].startswith("git ")
    check_unseen(provenance, "ddpm-fast", "test", "bloodmnist", "augment-study")
    assert describe_provenance(provenance).endswith(
        "; with an adversarial term against real images of split 'train' of bloodmnist at 28x28, 11,959 images"
        "; the models it descends from were trained on split 'train' of bloodmnist"
    )


def test_the_provenance_sentence_names_the_origins_and_sums_up_the_chain_behind_them():
    teacher = {**TRAIN, "init_from": {"model": "old", "provenance": {**ALL, "adversarial": TRAIN}}}
    student = {
        **TRAIN,
        "init_from": {"model": "first", "provenance": None},
        "distilled_from": {"model": "ddpm", "provenance": teacher, "pairs": {"num_pairs": 5000, "guidance_scale": 1.1}},
    }
    assert describe_provenance(student) == (
        "split 'train' of bloodmnist at 28x28, 48 images; started from first; distilled from ddpm, on 5,000 of its "
        "images at guidance 1.1; the models it descends from were trained on split 'all' of bloodmnist, "
        "split 'train' of bloodmnist and unrecorded data"
    )
    assert describe_provenance(TRAIN) == "split 'train' of bloodmnist at 28x28, 48 images"
    assert describe_provenance(None) == "not recorded"


# --- the round trip ------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_gan_pipeline, tiny_ddpm_pipeline, tiny_vae_pipeline])
def test_provenance_round_trips_through_save_and_both_loaders(make, tmp_path):
    from diffusers import DiffusionPipeline

    subset = {"method": "stratified_subset", "fraction": 0.5, "seed": 3, "size": 24, "of": 48}
    provenance = {**TRAIN, "num_images": 24, "subset": {**subset, "indices_sha256": "ab" * 32}}
    pipe = with_provenance(make(), provenance)
    pipe.save_pretrained(tmp_path / "saved")
    assert saved_record(tmp_path / "saved") == provenance
    assert load_pipeline(str(tmp_path / "saved")).config.provenance == provenance  # no diffusers loader
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert loaded.config.provenance == provenance
    loaded.save_pretrained(tmp_path / "again")  # the remote-code copy saves it again
    assert saved_record(tmp_path / "again") == provenance
    assert load_pipeline(str(tmp_path / "again")).config.provenance == provenance
    if hasattr(pipe, "with_scheduler"):
        assert pipe.with_scheduler("ddim").config.provenance == provenance


def saved_record(folder: Path) -> dict:
    """The record in a saved folder's provenance.json, nested again; its model_index.json holds the summary."""
    index = json.loads((folder / "model_index.json").read_text())
    assert is_provenance_summary(index["provenance"]) and index["provenance"]["file"] == "provenance.json"
    return expand_provenance(json.loads((folder / "provenance.json").read_text()))


# --- provenance.json ------------------------------------------------------------------------------------


def chain(depth: int, base: dict) -> dict:
    """A model retrained `depth` times from the one before, each distilled from the same teacher."""
    teacher = {**TRAIN, "init_from": {"model": "ddpm", "provenance": TRAIN, "revision": "git 1234567"}}
    record = base
    for i in range(depth):
        record = {
            **TRAIN,
            "init_from": {"model": f"run{i}", "provenance": record},
            "distilled_from": {"model": "ddpm", "provenance": teacher, "pairs": {"file": f"pairs-{i}.npz"}},
            "adversarial": {"dataset": "bloodmnist", "split": "train", "resolution": 28, "num_images": 48},
        }
    return record


def test_provenance_json_holds_each_record_once_and_nests_nothing():
    provenance = chain(4, {**TRAIN, "init_from": {"model": "old", "provenance": None}})
    document = flatten_provenance(provenance)
    assert expand_provenance(document) == provenance
    records = document["records"]
    assert list(records)[0] == document["model"]  # the model's own first
    # the 4 runs and the model the first started from, then the teacher, its own start and the adversarial
    # images: each of the last three stored once, however many runs refer to it
    texts = [json.dumps(r, sort_keys=True) for r in records.values()]
    assert len(texts) == len(set(texts)) == 4 + 1 + 2 + 1
    for record in records.values():
        for key in ("init_from", "distilled_from"):
            origin = record.get(key)
            assert origin is None or origin["provenance"] is None or origin["provenance"] in records
        assert record.get("adversarial") is None or record["adversarial"] in records
        assert all(link in records for link in record_links(record))
    assert expand_provenance(flatten_provenance(TRAIN)) == TRAIN


def blow_up(document: dict) -> None:
    """40 records, each started from and distilled from the next: 2**40 records nested, 40 stored."""
    records = document["records"] = {}
    for i in range(40):
        link = {"model": "m", "provenance": f"k{i + 1}"}
        records[f"k{i}"] = {**TRAIN, "init_from": link, "distilled_from": link}
    records["k40"] = TRAIN
    document["model"] = "k0"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d["records"].pop(d["model"]), "no record"),
        (lambda d: d["records"][d["model"]]["init_from"].update(provenance=d["model"]), "among its own origins"),
        (lambda d: d.pop("records"), "expected"),
        (blow_up, "refer to each other more than 10,000 times over"),
    ],
)
def test_a_damaged_provenance_json_is_refused_in_one_line(damage, message, tmp_path):
    folder = saved_gan(tmp_path / "gan", chain(1, TRAIN))
    document = json.loads((folder / "provenance.json").read_text())
    damage(document)
    (folder / "provenance.json").write_text(json.dumps(document))
    with pytest.raises(ModelLoadError, match=f"cannot read {re.escape(str(folder / 'provenance.json'))}: .*{message}"):
        load_pipeline(str(folder))
    (folder / "provenance.json").unlink()
    with pytest.raises(ModelLoadError, match="provenance.json is missing: .*holds only a summary"):
        load_pipeline(str(folder))


def test_a_folder_saved_before_provenance_json_loads_its_record_from_model_index(tmp_path):
    """Old folders (committed runs/) hold the nested record in model_index.json: it loads, the refusal follows
    its whole chain, and saving again moves it to provenance.json."""
    folder = saved_gan(tmp_path / "old", None)
    leaky = chain(3, ALL)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "provenance": leaky}))
    assert not (folder / "provenance.json").exists()
    pipe = load_pipeline(str(folder))
    assert pipe.config.provenance == leaky == read_model_index(folder)["provenance"]
    started = " (started from run2) (started from run1) (started from run0)"
    with pytest.raises(LeakError, match=re.escape(f"old{started} was trained on split 'all'")):
        check_unseen(pipe.config.provenance, "old", "test", "bloodmnist", "augment-study")
    save_pipeline(pipe, tmp_path / "new")
    assert saved_record(tmp_path / "new") == leaky


def test_saving_without_provenance_removes_an_old_provenance_json(tmp_path):
    folder = saved_gan(tmp_path / "gan", TRAIN)
    saved_gan(folder, None)
    assert not (folder / "provenance.json").exists()
    assert json.loads((folder / "model_index.json").read_text())["provenance"] is None
    assert load_pipeline(str(folder)).config.provenance is None


def absolute_paths(value) -> list[str]:
    """Every absolute path (POSIX, home or Windows drive) anywhere in a JSON value, inside longer strings too."""
    if isinstance(value, dict):
        return [p for v in [*value.keys(), *value.values()] for p in absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in absolute_paths(v)]
    if isinstance(value, str):
        return re.findall(r"(?:^|[\s(:=\"'])((?:/|~/|[A-Za-z]:[\\/])[^\s)\"']*)", value)
    return []


def test_the_bundled_64_px_model_records_its_autoencoder_and_teacher_all_on_the_train_split():
    """ldm-64 learnt from its teacher's latent pairs and, through its adversarial term, from real train-split images,
    starting from an earlier student of the same teacher: the student, its start, its teacher and both autoencoder
    stages saw the 64 px train split alone, so augment-study may score it on the test split."""
    provenance = read_model_index(bundled_models()["ldm-64"])["provenance"]
    assert (provenance["split"], provenance["resolution"], provenance["num_images"]) == ("train", 64, 11959)
    assert provenance["adversarial"]["split"] == "train"
    start = provenance["init_from"]
    assert start["model"] == "experiments/runs/ldm-64-4k-fast-g4/pipeline" and start["provenance"]["split"] == "train"
    teacher = provenance["distilled_from"]
    assert start["provenance"]["distilled_from"]["pairs"] == teacher["pairs"]  # the same teacher's same pairs
    assert teacher["pairs"]["space"] == "latent" and teacher["pairs"]["guidance_scale"] == 4.0
    assert teacher["pairs"]["guidance_interval"] == [0.0, 0.7]  # the teacher's defaults, set on val
    assert teacher["provenance"]["sampling_defaults"]["copied_from"] == "experiments/runs/ldm-64-4k/pipeline"
    for link in (provenance["autoencoder"], teacher["provenance"]["autoencoder"]):
        assert link["model"] == "experiments/runs/autoencoder-64-4k/pipeline"
        stages = [link]  # stage 2 <- stage 1 continued <- stage 1: every one on the train split
        while stages[-1]["provenance"].get("init_from"):
            stages.append(stages[-1]["provenance"]["init_from"])
        assert [stage["model"] for stage in stages[1:]] == [
            "experiments/runs/autoencoder-64-l1-4k/pipeline",
            "experiments/runs/autoencoder-64-l1/pipeline",
        ]
        assert {stage["provenance"]["split"] for stage in stages} == {"train"}
    check_unseen(provenance, "ldm-64", "test", "bloodmnist", "augment-study")
    with pytest.raises(LeakError):
        leaky_teacher = {**teacher, "provenance": {**teacher["provenance"], "split": "all"}}
        check_unseen({**provenance, "distilled_from": leaky_teacher}, "ldm-64", "test", "bloodmnist", "augment-study")


def test_no_bundled_model_index_or_provenance_json_holds_an_absolute_path():
    assert absolute_paths(["/work/main/x.npz", "git 1: ~/run (C:\\data)", "runs/a", "a/b", "git 4ddc008: x"]) == [
        "/work/main/x.npz",
        "~/run",
        "C:\\data",
    ]
    for name, folder in bundled_models().items():
        for file in ("model_index.json", "provenance.json"):
            if (folder / file).is_file():
                assert absolute_paths(json.loads((folder / file).read_text())) == [], f"{name}/{file}"
        index = json.loads((folder / "model_index.json").read_text())
        if "_class_name" in index:  # a pipeline (bloodnet is a classifier): the record is in provenance.json
            assert is_provenance_summary(index["provenance"]) and (folder / "provenance.json").is_file(), name
            assert len(json.dumps(index["provenance"])) < 500, name  # a short summary


def test_paths_in_a_record_become_relative_to_the_run_or_a_name_and_hash(tmp_path):
    root, outside = tmp_path / "repo", tmp_path / "elsewhere"
    (root / "runs" / "a").mkdir(parents=True)
    outside.mkdir()
    (outside / "pairs.npz").write_bytes(b"pairs")
    record = {
        **TRAIN,
        "dataset": str(outside),
        "init_from": {"model": str(root / "runs" / "a"), "provenance": None},
        "distilled_from": {"model": "ddpm", "pairs": {"files": [{"file": str(outside / "pairs.npz")}]}},
        "adversarial": {**TRAIN, "dataset": "~/gone-for-good-bloodgen"},
    }
    portable = portable_provenance(record, root)
    assert portable["init_from"]["model"] == "runs/a"
    pairs = portable["distilled_from"]["pairs"]["files"][0]["file"]
    assert pairs == f"pairs.npz@sha256:{content_sha256(outside / 'pairs.npz')}"
    assert portable["dataset"] == f"elsewhere@sha256:{content_sha256(outside)}"
    assert portable["adversarial"]["dataset"] == "gone-for-good-bloodgen"  # gone: its name
    assert portable["distilled_from"]["model"] == "ddpm" and portable["split"] == "train"
    assert absolute_paths(portable) == []
    # a dataset folder recorded by name and hash is the same dataset as that folder, and no other
    assert same_dataset(portable["dataset"], str(outside)) and not same_dataset(portable["dataset"], str(root))
    assert same_dataset("BloodMNIST", "bloodmnist")


def test_a_training_run_saves_provenance_json_with_its_origin_relative_to_the_run(fake_data_dir, tmp_path, monkeypatch):
    from bloodgen_hf.training import gan

    monkeypatch.chdir(tmp_path)  # the repo the runs start in
    args = ["--data-dir", str(fake_data_dir), "--max-steps", "1", "--split", "train", "--log-with", "none"]
    args += GAN_OPTIONS.split()
    gan.main([*args, "--output-dir", str(tmp_path / "source")])
    gan.main([*args, "--output-dir", str(tmp_path / "tuned"), "--init-from", str(tmp_path / "source" / "pipeline")])
    source, tuned = saved_record(tmp_path / "source" / "pipeline"), saved_record(tmp_path / "tuned" / "pipeline")
    assert source == training_provenance("bloodmnist", 28, "train", 48)
    assert tuned == {**source, "init_from": {"model": "source/pipeline", "provenance": source}}
    assert load_pipeline(str(tmp_path / "tuned" / "pipeline")).config.provenance == tuned
    assert json.loads((tmp_path / "tuned" / "train_config.json").read_text())["provenance"] == tuned
    check_unseen(tuned, "tuned", "test", "bloodmnist", "augment-study")


# --- a generator per fraction ------------------------------------------------------------------------


GAN_OPTIONS = "--batch-size 8 --latent-dim 16 --base-channels 8 --minibatch-std-group 0 --diffaugment color,translation"


def test_per_fraction_generator_sees_only_the_classifiers_subset(fake_data_dir, tmp_path):
    out = tmp_path / "study"
    args = ["augment-study", "--generator-per-fraction", "gan", "--generator-steps", "3"]
    args += ["--generator-options", GAN_OPTIONS, "--fractions", "0.25", "--settings", "synthetic", *STUDY]
    args += ["--data-dir", fake_data_dir, "--out", out]
    result = invoke(*args)
    assert result.exit_code == 0, result.output

    labels = load_data("bloodmnist", "train", 28, fake_data_dir).labels
    subset = real_subset(labels, 0.25, 0)  # what the classifier at 25%, seed 0 trains on
    assert indices_fingerprint(subset) != indices_fingerprint(real_subset(labels, 0.25, 1))
    (generator,) = json.loads((out / "results.json").read_text())["generators"]
    recorded = generator["provenance"]
    assert recorded["split"] == "train" and recorded["num_images"] == len(subset) == 16
    assert recorded["subset"]["indices_sha256"] == indices_fingerprint(subset) and recorded["subset"]["of"] == 48
    saved = load_pipeline(str(out / "generators" / "0.25-seed0" / "pipeline")).config.provenance
    assert saved == recorded
    train_config = json.loads((out / "generators" / "0.25-seed0" / "train_config.json").read_text())
    assert train_config["provenance"] == recorded and train_config["max_steps"] == 3
    assert train_config["command"].startswith("bloodgen-hf train gan ") and "--diffaugment" in train_config["command"]
    assert generator["steps"] == 3 and "--subset-fraction 0.25" in (out / "report.md").read_text()

    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0 and "generator 0.25-seed0: finished earlier" in resumed.output
    other_budget = [("4" if a == "3" else a) for a in args]  # --generator-steps 4
    assert "was started with other settings (generators)" in one_error_line(invoke(*other_budget, "--resume"))
    saved_file = out / "generators" / "0.25-seed0" / "pipeline" / "provenance.json"
    tampered = json.loads(saved_file.read_text())
    own = tampered["records"][tampered["model"]]
    own["subset"]["indices_sha256"] = indices_fingerprint(real_subset(labels, 0.25, 1))
    saved_file.write_text(json.dumps(tampered))
    refused = invoke(*args, "--resume")
    assert refused.exit_code == 2 and "not on exactly the classifier's 16 train images" in refused.output
    assert refused.output.strip().splitlines()[-1].startswith("error: the gan generator for 0.25-seed0")


def test_per_fraction_options_may_not_change_the_data(fake_data_dir, tmp_path):
    args = ["augment-study", "--generator-per-fraction", "gan", "--generator-steps", "3", "--out", tmp_path / "s"]
    line = one_error_line(invoke(*args, "--generator-options", "--split all"))
    assert "--generator-options may not set --split" in line
    line = one_error_line(invoke("augment-study", "--generator-per-fraction", "gan", "--out", tmp_path / "s"))
    assert "needs --generator-steps" in line


def test_train_script_refuses_a_subset_seed_without_a_fraction(fake_data_dir, tmp_path):
    from bloodgen_hf.training.core import ErrorExit
    from bloodgen_hf.training.gan import main

    with pytest.raises(ErrorExit, match="--subset-seed only picks a subset together with --subset-fraction"):
        main(["--data-dir", str(fake_data_dir), "--output-dir", str(tmp_path / "g"), "--subset-seed", "2"])


# --- TSTR ------------------------------------------------------------------------------------------------


@pytest.fixture
def compare_args(fake_data_dir, tmp_path) -> list:
    torch.manual_seed(0)
    bloodnet = tmp_path / "bloodnet"
    BloodNet(channels=[4, 8], blocks_per_stage=1, class_names=list(CLASS_NAMES)).save_pretrained(
        bloodnet / "classifier"
    )
    args = ["--extractor", "bloodnet", "--bloodnet", bloodnet, "--data-dir", fake_data_dir, "--device", "cpu"]
    args += ["--cache-dir", tmp_path / "cache", "--runs", "1", "--n", "12", "--no-floor", "--metrics", "fd"]
    return [*args, "--memorization-n", "10", "--batch-size", "8"]


def test_compare_tstr_reports_synthetic_against_real(compare_args, tmp_path):
    model = saved_gan(tmp_path / "honest_gan", TRAIN)
    out = tmp_path / "report"
    result = invoke("compare", "--models", model, *compare_args, "--tstr", 16, "--tstr-steps", 2, "--out", out)
    assert result.exit_code == 0, result.output
    tstr = json.loads((out / "tstr.json").read_text())["honest_gan"]
    assert tstr["n"] == 16 and sum(tstr["class_counts"]) == 16 and tstr["steps"] == 2
    for key in ("accuracy", "macro_f1"):
        assert 0 <= tstr["synthetic"][key] <= 1 and 0 < tstr["real"][key] <= 1
        assert tstr["ratio"][key] == pytest.approx(tstr["synthetic"][key] / tstr["real"][key])
    report = (out / "report.md").read_text()
    assert "## TSTR: train on synthetic, test on real" in report and "| honest_gan |" in report
    confusion = json.loads((out / "tstr" / "honest_gan" / "result.json").read_text())["report"]["confusion"]
    assert np.asarray(confusion).sum() == 16  # scored on the real test split


def test_compare_tstr_refuses_a_generator_trained_on_the_test_split(compare_args, tmp_path):
    model = saved_gan(tmp_path / "leaky_gan", ALL)
    result = invoke("compare", "--models", model, *compare_args, "--tstr", 16, "--out", tmp_path / "report")
    line = one_error_line(result)
    assert "leaky_gan was trained on split 'all'" in line and "the 'test' split TSTR scores on" in line
    assert not (tmp_path / "report" / "tstr").exists()


def test_compare_tstr_scores_the_honest_model_and_says_why_not_the_leaky_one(compare_args, tmp_path):
    honest, leaky = saved_gan(tmp_path / "honest_gan", TRAIN), saved_gan(tmp_path / "leaky_gan", ALL)
    out = tmp_path / "report"
    args = ["--tstr", 16, "--tstr-steps", 2, "--out", out]
    result = invoke("compare", "--models", honest, "--models", leaky, *compare_args, *args)
    assert result.exit_code == 0, result.output
    tstr = json.loads((out / "tstr.json").read_text())
    assert set(tstr["honest_gan"]) >= {"synthetic", "real", "ratio"}
    assert "leaky_gan was trained on split 'all'" in tstr["leaky_gan"]["refused"]
    assert not (out / "tstr" / "leaky_gan").exists()  # nothing was trained on its images
    report = (out / "report.md").read_text()
    assert "| honest_gan |" in report and "| leaky_gan |" not in report.split("## TSTR")[1].split("Not scored")[0]
    assert "- leaky_gan: leaky_gan was trained on split 'all'" in report


def test_model_card_shows_the_training_data():
    from bloodgen_hf.model_card import render_model_card

    common = {"repo_id": "org/m", "revision": "abc", "pipeline_class": "BloodGANPipeline", "family": "gan"}
    common |= {"class_names": CLASS_NAMES, "parameters": 10, "resolution": 28, "grid_per_class": 2}
    card = str(render_model_card(**common, train_config={"command": "bloodgen-hf train gan", "provenance": ALL}))
    assert "Training data: split 'all' of bloodmnist at 28x28, 80 images." in card
    assert "Training data: not recorded with these weights." in str(render_model_card(**common))
