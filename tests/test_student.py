"""Issue 14: the few-step student (reflow on teacher pairs, consistency distillation) and its refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bloodgen_hf.cli import app
from bloodgen_hf.data import CLASS_NAMES
from bloodgen_hf.pipelines import pipeline_bloodgen_ddpm
from bloodgen_hf.pipelines.blood_pipeline_utils import postprocess
from bloodgen_hf.provenance import LeakError, check_unseen, portable_path, training_provenance
from bloodgen_hf.registry import load_pipeline, save_pipeline
from bloodgen_hf.sampling import resolve_precision
from bloodgen_hf.training import student
from bloodgen_hf.training.checkpoint import load_state
from bloodgen_hf.training.core import TrainConfig
from tests.conftest import tiny_ddpm_pipeline, tiny_ldm_pipeline
from tests.test_ddpm import sample


def recorded(folder: Path) -> str:
    """How a provenance names a model folder: no absolute path, so relative to the working directory or (a tmp
    folder outside it) by its name and content hash (issue 32)."""
    return portable_path(str(folder), Path.cwd())


def tiny_flow_teacher(folder: Path, split: str = "train", guidance: float = 2.0) -> Path:
    from bloodgen_hf.pipelines import BloodDDPMPipeline
    from bloodgen_hf.training.ddpm import build_noise_scheduler, build_unet

    torch.manual_seed(0)
    unet = build_unet("tiny", 28)
    with torch.no_grad():  # a UNet whose output depends on its input, so pairs differ from noise
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    scheduler = pipeline_bloodgen_ddpm.make_scheduler(
        "dpm++", build_noise_scheduler("squaredcos_cap_v2", "flow").config
    )
    provenance = {"dataset": "bloodmnist", "resolution": 28, "split": split, "num_images": 48, "subset": None}
    pipe = BloodDDPMPipeline(
        unet=unet,
        scheduler=scheduler,
        class_names=list(CLASS_NAMES),
        default_guidance_scale=guidance,
        default_num_inference_steps=3,
        provenance={**provenance, "init_from": None},
    )
    return save_pipeline(pipe, folder)


def draw_pairs(teacher: Path, out: Path, n: int = 32, *extra: str) -> Path:
    args = ["sample", "--model", str(teacher), "--n", str(n), "--format", "npz", "--out", str(out), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def student_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--teacher", str(teacher), "--output-dir", str(out), "--batch-size", "8", "--log-every", "1",
        "--log-with", "none", "--grid-per-class", "1", "--lr-warmup-steps", "0", *extra,
    ]  # fmt: skip


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    return tiny_flow_teacher(tmp_path / "teacher")


def test_pairs_hold_the_noise_the_teacher_drew(teacher, tmp_path, monkeypatch):
    """TeacherPairs regenerates, from the recorded seeds, exactly the starting noise of each image."""
    drawn = []
    real_randn = pipeline_bloodgen_ddpm.randn_tensor
    monkeypatch.setattr(
        pipeline_bloodgen_ddpm, "randn_tensor", lambda *a, **k: drawn.append(real_randn(*a, **k)) or drawn[-1]
    )
    pairs_file = draw_pairs(teacher, tmp_path / "pairs.npz", 12, "--seed", "5", "--batch-size", "5")
    pairs, info = student.load_pairs(str(pairs_file), str(teacher), load_pipeline(str(teacher)))
    assert torch.equal(pairs.noise, torch.cat(drawn))
    images, labels, noise = pairs.batch(torch.tensor([3, 0]))
    assert images.shape == noise.shape == (2, 3, 28, 28) and labels.tolist() == [3, 0]
    assert torch.equal(noise, torch.cat(drawn)[[3, 0]])
    assert info["num_pairs"] == 12 and info["guidance_scale"] == 2.0 and info["num_inference_steps"] == 3
    assert info["files"][0]["precision"] == resolve_precision("auto", load_pipeline(str(teacher)))  # as drawn
    with np.load(pairs_file) as archive:
        assert archive["seeds"].tolist() == list(range(5, 17))


def test_pairs_from_several_files_join_and_keep_each_files_record(teacher, tmp_path):
    """Two draws at seeds apart: one dataset, each image with its own noise, and both files in the record."""
    pipe = load_pipeline(str(teacher))
    first = draw_pairs(teacher, tmp_path / "a.npz", 6)
    second = draw_pairs(teacher, tmp_path / "b.npz", 4, "--seed", "50")
    joined, info = student.load_pairs([str(first), str(second)], str(teacher), pipe)
    a, _ = student.load_pairs(str(first), str(teacher), pipe)
    b, _ = student.load_pairs([str(second)], str(teacher), pipe)
    assert len(joined) == info["num_pairs"] == 10
    assert torch.equal(joined.noise, torch.cat([a.noise, b.noise])) and torch.equal(joined.images[6:], b.images)
    assert [(f["file"], f["num_pairs"], f["seed"]) for f in info["files"]] == [(str(first), 6, 0), (str(second), 4, 50)]
    assert info["guidance_scale"] == 2.0 and info["num_inference_steps"] == 3


def test_pairs_that_share_seeds_or_sampler_settings_differ_are_refused(teacher, tmp_path):
    pipe = load_pipeline(str(teacher))
    first = draw_pairs(teacher, tmp_path / "a.npz", 6)
    overlapping = draw_pairs(teacher, tmp_path / "b.npz", 4, "--seed", "3")
    with pytest.raises(ValueError, match=r"seed 3 is in more than one pair .*a.npz, .*b.npz.*--seed past the others"):
        student.load_pairs([str(first), str(overlapping)], str(teacher), pipe)
    other_guidance = draw_pairs(teacher, tmp_path / "c.npz", 4, "--seed", "50", "--guidance", "1.5")
    with pytest.raises(ValueError, match=r"c.npz was drawn at guidance_scale 1.5, .*a.npz at 2.0"):
        student.load_pairs([str(first), str(other_guidance)], str(teacher), pipe)
    interval = draw_pairs(teacher, tmp_path / "d.npz", 4, "--seed", "60", "--guidance-interval", "0.2,0.85")
    with pytest.raises(ValueError, match=r"d.npz was drawn at guidance_interval \[0.2, 0.85\], .*a.npz at None"):
        student.load_pairs([str(first), str(interval)], str(teacher), pipe)
    assert student.load_pairs(str(interval), str(teacher), pipe)[1]["guidance_interval"] == [0.2, 0.85]


def test_pairs_record_the_teachers_default_guidance_interval(tmp_path):
    """A teacher saved with a guidance interval draws with it: its pairs record it, pixel and latent alike, and
    consistency distillation leaves unguided the noise levels its sampler leaves unguided (the upper end guided)."""
    teacher = tiny_flow_teacher(tmp_path / "teacher")
    pipe = load_pipeline(str(teacher))
    pipe.register_to_config(default_guidance_interval=[0.2, 0.85])
    saved = save_pipeline(pipe, tmp_path / "interval-teacher")
    pairs_file = draw_pairs(saved, tmp_path / "pairs.npz", 4)
    saved_pipe = load_pipeline(str(saved))
    assert student.load_pairs(str(pairs_file), str(saved), saved_pipe)[1]["guidance_interval"] == [0.2, 0.85]
    assert student.latent_pairs_info("t", saved_pipe)["guidance_interval"] == [0.2, 0.85]
    t = torch.tensor([0.0, 0.2, 0.21, 0.85, 0.86, 1.0])
    assert student.outside_guidance_interval(t, [0.2, 0.85]).tolist() == [True, True, False, False, True, True]
    assert not student.outside_guidance_interval(t, None).any()


def test_the_student_starts_as_the_teacher(teacher, tmp_path):
    pairs = draw_pairs(teacher, tmp_path / "pairs.npz", 16)
    config = TrainConfig(flip=False, batch_size=8, extra={**student_options(teacher), "pairs": str(pairs)})
    dataset, _ = student.load_student_data(config)
    task = student.StudentTask.build(config, len(dataset))
    source = load_pipeline(str(teacher)).unet.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in task.models["unet"].state_dict().items())
    assert not any(p.requires_grad for p in task.teacher.unet.parameters())


def student_options(teacher: Path, **overrides) -> dict:
    import argparse

    parser = student.add_student_arguments(argparse.ArgumentParser())
    return {**vars(parser.parse_args(["--teacher", str(teacher)])), **overrides}


def test_reflow_student_trains_saves_and_samples_in_1_and_4_steps(teacher, tmp_path):
    pairs = draw_pairs(teacher, tmp_path / "pairs.npz", 32)
    out = tmp_path / "student"
    student.main(student_args(teacher, out, "--pairs", str(pairs), "--max-steps", "6"))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and np.isfinite(losses).all()
    pipe = load_pipeline(str(out / "pipeline"))
    assert pipe.config.default_guidance_scale == 1.0 and pipe.config.default_num_inference_steps == 2
    assert pipe.scheduler.config.use_flow_sigmas
    for steps in (1, 4):
        images = sample(pipe, num_inference_steps=steps)
        assert images.shape == (4, 28, 28, 3) and np.isfinite(images).all()
        np.testing.assert_array_equal(images, sample(pipe, num_inference_steps=steps))  # same seeds, same images
    assert not np.array_equal(sample(pipe, num_inference_steps=1), sample(pipe, seeds=(4, 5, 6, 7)))
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sample(pipe, num_inference_steps=bad)
    provenance = pipe.config.provenance
    assert provenance["split"] == "train" and provenance["distilled_from"]["model"] == recorded(teacher)
    assert provenance["distilled_from"]["pairs"]["num_pairs"] == 32
    assert provenance["distilled_from"]["provenance"]["split"] == "train"


def test_a_student_continued_with_init_from_records_where_its_weights_started(teacher, tmp_path):
    """A second reflow run on new pairs, started from the first student: its provenance names that student
    in `init_from` (the teacher stays in `distilled_from`), so the history and the leak check follow both."""
    first, second = tmp_path / "first", tmp_path / "second"
    student.main(
        student_args(teacher, first, "--pairs", str(draw_pairs(teacher, tmp_path / "a.npz", 16)), "--max-steps", "2")
    )
    pairs = draw_pairs(teacher, tmp_path / "b.npz", 16, "--seed", "100")
    student.main(
        student_args(teacher, second, "--pairs", str(pairs), "--max-steps", "2", "--init-from", str(first / "pipeline"))
    )
    provenance = load_pipeline(str(second / "pipeline")).config.provenance
    assert provenance["init_from"]["model"] == recorded(first / "pipeline")
    assert provenance["init_from"]["provenance"]["distilled_from"]["pairs"]["files"][0]["seed"] == 0
    distilled_from = provenance["distilled_from"]
    assert distilled_from["pairs"]["files"][0]["seed"] == 100 and distilled_from["model"] == recorded(teacher)


def test_consistency_student_trains_on_real_images(teacher, fake_data_dir, tmp_path):
    out = tmp_path / "cd"
    args = ["--method", "consistency", "--data-dir", str(fake_data_dir), "--split", "train", "--max-steps", "3"]
    student.main(student_args(teacher, out, *args, "--cd-intervals", "4"))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and np.isfinite(losses).all()
    provenance = load_pipeline(str(out / "pipeline")).config.provenance
    assert provenance["split"] == "train" and provenance["distilled_from"]["model"] == recorded(teacher)
    assert sample(load_pipeline(str(out / "pipeline")), num_inference_steps=1).shape == (4, 28, 28, 3)


def test_pairs_of_a_teacher_retrained_in_the_same_folder_are_refused(teacher, tmp_path):
    """The folder's name is the same, its weights are not: the pairs are not this teacher's map."""
    pairs = draw_pairs(teacher, tmp_path / "pairs.npz", 8)
    with np.load(pairs) as archive:
        assert len(json.loads(str(archive["info"]))["model_sha256"]) == 64
    retrained = load_pipeline(str(teacher))
    with torch.no_grad():
        next(retrained.unet.parameters()).add_(0.01)
    save_pipeline(retrained, teacher)
    with pytest.raises(ValueError, match=r"pairs.npz was drawn by other weights than --teacher .*; draw new pairs"):
        student.load_pairs(str(pairs), str(teacher), load_pipeline(str(teacher)))


def test_u_shaped_times_follow_their_density_and_uniform_times_stay_uniform():
    torch.manual_seed(0)
    t = student.reflow_times(200_000, "u-shaped")
    assert t.min() >= 0 and t.max() <= 1
    a = student.U_SHAPE  # p(t) = a (e^{at} + e^{a(1-t)}) / (2 (e^a - 1)); its mass in [0, 0.1] and in [0.9, 1]:
    edge = (math.expm1(0.1 * a) + math.exp(a) - math.exp(0.9 * a)) / (2 * math.expm1(a))
    assert abs(float((t < 0.1).float().mean()) - edge) < 0.005 and edge > 0.17  # uniform: 0.1
    assert abs(float((t > 0.9).float().mean()) - edge) < 0.005
    assert abs(float(t.mean()) - 0.5) < 0.005
    u = student.reflow_times(200_000, "uniform")
    assert abs(float((u < 0.1).float().mean()) - 0.1) < 0.005


def test_pseudo_huber_is_its_closed_form_per_image():
    prediction, target = torch.zeros(2, 3, 28, 28), torch.zeros(2, 3, 28, 28)
    target[0, 0, 0, 0], target[1, :, :2, :2] = 3.0, 1.0  # |d|² = 9 and 12
    c = 0.00054 * math.sqrt(3 * 28 * 28)
    expected = ((9 + c**2) ** 0.5 - c + (12 + c**2) ** 0.5 - c) / 2
    assert math.isclose(float(student.pseudo_huber(prediction, target)), expected, rel_tol=1e-6)
    assert float(student.pseudo_huber(target, target)) == 0.0


def test_reflow_with_u_shaped_times_pseudo_huber_and_a_shifted_sampler_trains_and_records_them(teacher, tmp_path):
    pairs = draw_pairs(teacher, tmp_path / "pairs.npz", 16)
    out = tmp_path / "student"
    extra = ("--pairs", str(pairs), "--max-steps", "2", "--reflow-time", "u-shaped", "--reflow-loss", "pseudo-huber")
    student.main(student_args(teacher, out, *extra, "--sampler-shift", "2"))
    recorded = json.loads((out / "train_config.json").read_text())["extra"]
    assert (recorded["reflow_time"], recorded["reflow_loss"]) == ("u-shaped", "pseudo-huber")
    scheduler = load_pipeline(str(out / "pipeline")).scheduler
    scheduler.set_timesteps(2)
    assert scheduler.config.flow_shift == 2.0 and float(scheduler.sigmas[1]) == pytest.approx(2 / 3, abs=1e-3)
    assert all(np.isfinite(json.loads(line)["loss"]) for line in (out / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(SystemExit, match="--reflow-time and --reflow-loss are for --method reflow"):
        student.main(student_args(teacher, tmp_path / "c", "--method", "consistency", "--reflow-time", "u-shaped"))


def test_a_student_of_a_teacher_that_saw_the_test_split_is_refused(tmp_path):
    teacher = tiny_flow_teacher(tmp_path / "leaky", split="all")
    pairs = draw_pairs(teacher, tmp_path / "pairs.npz", 16)
    config = TrainConfig(flip=False, batch_size=8, extra={**student_options(teacher), "pairs": str(pairs)})
    _, provenance = student.load_student_data(config)
    with pytest.raises(LeakError, match="distilled from .*leaky.*includes the 'test' split"):
        check_unseen({**provenance, "split": "train"}, "student", "test", "bloodmnist", "augment-study")


def test_bad_student_settings_get_one_clear_error(teacher, tmp_path, fake_data_dir):
    pairs = draw_pairs(teacher, tmp_path / "pairs.npz", 16)
    cases = [
        ((), "--method reflow needs --pairs"),
        (("--pairs", str(pairs), "--flip"), "--flip would break the"),
        (("--method", "consistency", "--pairs", str(pairs)), "--pairs is for --method reflow"),
        (("--pairs", str(pairs), "--cd-intervals", "0"), "--cd-intervals must be at least 1"),
        (("--pairs", str(pairs), "--sampler-shift", "0"), "--sampler-shift must be above 0"),
        (("--pairs", str(tmp_path / "missing.npz")), "is not an archive written by `bloodgen-hf sample"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            student.main(student_args(teacher, tmp_path / "s", *extra))
    other = save_pipeline(tiny_ddpm_pipeline(), tmp_path / "epsilon")
    with pytest.raises(SystemExit, match="without flow matching; distillation needs"):
        student.main(student_args(other, tmp_path / "s", "--pairs", str(pairs)))
    second = tiny_flow_teacher(tmp_path / "second")
    with pytest.raises(SystemExit, match="holds images of .*teacher.*not of --teacher"):
        student.main(student_args(second, tmp_path / "s", "--pairs", str(pairs)))
    assert not (tmp_path / "s").exists()


def adversarial_args(teacher: Path, out: Path, pairs: Path, data_dir: Path, *extra: str) -> list[str]:
    return student_args(
        teacher, out, "--pairs", str(pairs), "--data-dir", str(data_dir), "--adversarial-weight", "0.5", *extra
    )


def test_class_matched_images_give_each_label_an_image_of_its_class(fake_data_dir):
    real = student.LabelledImages.load("train", 28, fake_data_dir)
    matched = student.ClassMatchedImages(real, len(CLASS_NAMES))
    labels = torch.tensor([7, 0, 0, 3, 5, 7, 1, 2] * 8)
    torch.manual_seed(0)
    images = matched.draw(labels)
    assert images.shape == (64, 3, 28, 28)
    by_class = {int(c): real.batch(torch.nonzero(real.labels == c).flatten())[0] for c in labels.unique()}
    for image, label in zip(images, labels):  # each drawn image is one of its class's
        assert (by_class[int(label)] - image).abs().flatten(1).amax(1).min() == 0
    torch.manual_seed(0)
    assert torch.equal(images, matched.draw(labels))  # the global RNG decides: a checkpoint restores it
    without_basophils = student.LabelledImages(
        real.images[real.labels != 0].numpy(), real.labels[real.labels != 0].numpy()
    )
    with pytest.raises(ValueError, match="real images of every class; none of basophil"):
        student.ClassMatchedImages(without_basophils, len(CLASS_NAMES))


def test_adversarial_reflow_trains_a_discriminator_on_the_teachers_split_and_records_it(
    teacher, fake_data_dir, tmp_path
):
    pairs = draw_pairs(teacher, tmp_path / "pairs.npz", 16)
    out = tmp_path / "adv"
    student.main(adversarial_args(teacher, out, pairs, fake_data_dir, "--max-steps", "3", "--checkpoint-every", "3"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 3
    for row in logged:
        assert {"loss_reflow", "loss_adversarial", "loss_d", "score_real", "score_fake"} <= row.keys()
        assert row["loss"] == pytest.approx(row["loss_reflow"] + 0.5 * row["loss_adversarial"], rel=1e-5)
    checkpoint = out / "checkpoints" / "checkpoint-0000003"
    assert (checkpoint / "discriminator.safetensors").is_file()
    pipe = load_pipeline(str(out / "pipeline"))  # the discriminator is training only: not in the pipeline
    assert not (out / "pipeline" / "discriminator").exists() and "discriminator" not in pipe.components
    adversarial = pipe.config.provenance["adversarial"]
    assert adversarial == {"dataset": "bloodmnist", "resolution": 28, "split": "train", "num_images": 48}
    assert sample(pipe, num_inference_steps=2).shape == (4, 28, 28, 3)


def test_adversarial_reflow_resumes_exactly(teacher, fake_data_dir, tmp_path):
    """4 steps in one go == 2, stop, resume to 4: the student, the discriminator and its optimizer all equal
    (the real images are drawn from the global RNG, which the checkpoint restores)."""
    pairs = draw_pairs(teacher, tmp_path / "pairs.npz", 16)
    common = ("--checkpoint-every", "2", "--lr-schedule", "constant")  # cosine spans --max-steps, which differ
    student.main(adversarial_args(teacher, tmp_path / "full", pairs, fake_data_dir, *common, "--max-steps", "4"))
    student.main(adversarial_args(teacher, tmp_path / "split", pairs, fake_data_dir, *common, "--max-steps", "2"))
    resumed = ("--max-steps", "4", "--resume", "latest")
    student.main(adversarial_args(teacher, tmp_path / "split", pairs, fake_data_dir, *common, *resumed))
    full, split = (tmp_path / run / "checkpoints" / "checkpoint-0000004" for run in ("full", "split"))
    for name in ("unet", "discriminator"):
        a, b = load_file(str(full / f"{name}.safetensors")), load_file(str(split / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state_a, state_b = load_state(full / "training_state"), load_state(split / "training_state")
    moments = [
        [s["exp_avg"] for s in state["optimizers"]["discriminator"]["state"].values()] for state in (state_a, state_b)
    ]
    assert all(torch.equal(x, y) for x, y in zip(*moments))


def test_bad_adversarial_settings_get_one_clear_error(teacher, fake_data_dir, tmp_path):
    pairs = draw_pairs(teacher, tmp_path / "pairs.npz", 16)
    cases = [
        (("--adversarial-weight", "-1"), "--adversarial-weight must be >= 0"),
        (("--batch-size", "6"), "needs a --batch-size divisible by 4"),
        (("--d-base-channels", "0"), "--d-base-channels must be at least 1"),
        (("--split", "all"), "trains on --split all of bloodmnist, but the teacher saw split 'train'"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            student.main(adversarial_args(teacher, tmp_path / "s", pairs, fake_data_dir, *extra))
    consistency = ("--method", "consistency", "--data-dir", str(fake_data_dir), "--adversarial-weight", "1")
    with pytest.raises(SystemExit, match="--adversarial-weight is for --method reflow"):
        student.main(student_args(teacher, tmp_path / "s", *consistency))
    assert not (tmp_path / "s").exists()


# --- an LDM teacher: the latent student (issue 34) ---------------------------------------------------------


def tiny_latent_teacher(folder: Path, autoencoder_split: str = "train") -> Path:
    """A saved flow BloodLDMPipeline (tests/conftest.py's tiny autoencoder: 4x8x8 latents, 32 px images), guidance 2
    at 3 steps, trained on the train split as its record says, with its autoencoder's record (`autoencoder_split`)."""
    from bloodgen_hf.pipelines import BloodLDMPipeline

    pipe = tiny_ldm_pipeline()
    with torch.no_grad():  # a UNet whose output depends on its input, so latents differ from noise
        for p in pipe.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    own = training_provenance("bloodmnist", 32, "train", 48)
    autoencoder = {"model": "ae", "provenance": training_provenance("bloodmnist", 32, autoencoder_split, 48)}
    teacher = BloodLDMPipeline(
        vae=pipe.vae,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        class_names=list(CLASS_NAMES),
        default_guidance_scale=2.0,
        default_num_inference_steps=3,
        provenance={**own, "autoencoder": {**autoencoder, "scaling_factor": 1.7, "latent_shape": [4, 8, 8]}},
    )
    return save_pipeline(teacher, folder)


@pytest.fixture
def latent_teacher(tmp_path: Path) -> Path:
    """The teacher, on one torch thread (as tests/test_ldm.py: on a busy shared CPU two threads wait on each other,
    which costs many times the work; results are the same)."""
    torch.set_num_threads(1)
    return tiny_latent_teacher(tmp_path / "ldm-teacher")


def latent_args(teacher: Path, out: Path, pairs: Path, *extra: str) -> list[str]:
    return student_args(teacher, out, "--pairs", str(pairs), "--num-pairs", "16", "--cpu-threads", "1", *extra)


def test_latent_pairs_are_the_teachers_latents_and_a_stopped_draw_goes_on(latent_teacher, tmp_path, monkeypatch):
    """The cache holds the teacher's own output latents (decoded: its images) for seeds --pairs-seed on, with the
    noise it drew; a draw that lost a file (and left a temporary) draws that file alone, the same bits again."""
    monkeypatch.setattr(student, "PAIRS_CHUNK", 5)
    teacher, folder = load_pipeline(str(latent_teacher)), tmp_path / "pairs"
    o = student.StudentOptions(teacher=str(latent_teacher), pairs=[str(folder)], num_pairs=12, pairs_seed=3)
    drawn = []
    real_randn = pipeline_bloodgen_ddpm.randn_tensor
    monkeypatch.setattr(
        pipeline_bloodgen_ddpm, "randn_tensor", lambda *a, **k: drawn.append(real_randn(*a, **k)) or drawn[-1]
    )
    pairs, record = student.latent_pairs(o, teacher)
    names = ["pairs-000000003-000000007.npz", "pairs-000000008-000000012.npz", "pairs-000000013-000000014.npz"]
    assert sorted(p.name for p in folder.iterdir()) == names
    assert len(pairs) == 12 and torch.equal(pairs.noise, torch.cat(drawn)) and pairs.noise.shape == (12, 4, 8, 8)
    latents, labels, noise = pairs.batch(torch.tensor([4, 0]))
    assert latents.shape == noise.shape == (2, 4, 8, 8) and labels.tolist() == [7, 3]
    seeds, classes = [7, 3], [7, 3]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    own = teacher(class_labels=classes, generator=generators, output_type="latent").images
    torch.testing.assert_close(latents, own, atol=1e-5, rtol=1e-5)
    images = sample(teacher, seeds=seeds, labels=classes)  # what the teacher makes of that noise, at its defaults
    with torch.no_grad():
        np.testing.assert_allclose(postprocess(teacher.decode(latents), "np"), images, atol=1e-5)
    assert record == {
        "num_pairs": 12,
        "guidance_scale": 2.0,
        "num_inference_steps": 3,
        "scheduler": type(teacher.scheduler).__name__,
        "guidance_interval": None,
        "space": "latent",
        "files": [{"file": str(folder), "num_pairs": 12, "seed": 3, "precision": "fp32"}],
    }

    middle = folder / names[1]
    middle.unlink()
    (folder / f".{names[1]}.abcd1234.tmp").write_bytes(b"cut short")
    before = {name: (folder / name).stat().st_mtime_ns for name in (names[0], names[2])}
    calls = []
    draw = student.teacher_latents
    monkeypatch.setattr(student, "teacher_latents", lambda t, s: calls.append(s.tolist()) or draw(t, s))
    again, _ = student.latent_pairs(o, teacher)
    assert calls == [[8, 9, 10, 11, 12]] and sorted(p.name for p in folder.iterdir()) == names
    assert {name: (folder / name).stat().st_mtime_ns for name in before} == before
    assert torch.equal(again.latents, pairs.latents) and torch.equal(again.noise, pairs.noise)
    student.latent_pairs(o, teacher)
    assert len(calls) == 1  # all there: nothing drawn

    retrained = load_pipeline(str(latent_teacher))
    with torch.no_grad():
        next(retrained.unet.parameters()).add_(0.01)
    with pytest.raises(ValueError, match=r"pairs-000000003-000000007.npz was drawn by other weights than --teacher"):
        student.latent_pairs(o, retrained)


def test_latent_student_trains_saves_an_ldm_pipeline_that_loads_as_remote_code(latent_teacher, tmp_path):
    """Reflow on latent pairs saves a BloodLDMPipeline with the teacher's autoencoder and a 2-step flow sampler at
    guidance 1; the registry and diffusers' remote code (without bloodgen_hf) load it and draw the same images,
    the same seed giving the same image in any batch; its provenance follows the teacher and its autoencoder."""
    from bloodgen_hf.pipelines import BloodLDMPipeline

    out = tmp_path / "student"
    student.main(latent_args(latent_teacher, out, tmp_path / "pairs", "--max-steps", "3"))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and np.isfinite(losses).all()
    pipe, teacher = load_pipeline(str(out / "pipeline")), load_pipeline(str(latent_teacher))
    assert type(pipe) is BloodLDMPipeline and pipe.vae.config.scaling_factor == teacher.vae.config.scaling_factor
    assert all(torch.equal(v, teacher.vae.state_dict()[k]) for k, v in pipe.vae.state_dict().items())
    assert not all(torch.equal(v, teacher.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    assert pipe.config.default_guidance_scale == 1.0 and pipe.config.default_num_inference_steps == 2
    assert pipe.scheduler.config.use_flow_sigmas
    together = sample(pipe)
    assert together.shape == (4, 32, 32, 3) and np.isfinite(together).all()
    np.testing.assert_array_equal(together, sample(pipe))
    np.testing.assert_allclose(sample(pipe, seeds=(9, 2), labels=(1, 5))[1], together[2], atol=1e-5)

    provenance = pipe.config.provenance
    assert provenance["split"] == "train" and provenance["distilled_from"]["model"] == recorded(latent_teacher)
    assert provenance["distilled_from"]["pairs"]["space"] == "latent"
    assert provenance["distilled_from"]["pairs"]["num_pairs"] == 16
    assert provenance["autoencoder"]["provenance"]["split"] == "train"
    check_unseen(provenance, "student", "test", "bloodmnist", "augment-study")

    from tests.test_remote_code import reference_images, run_without_bloodgen_hf

    (work := tmp_path / "remote").mkdir()
    images, seen = work / "images", work / "provenance.json"
    job = {"source": str(out / "pipeline"), "out": str(images), "call": {"num_inference_steps": 2}}
    run_without_bloodgen_hf(work, {"jobs": [{**job, "provenance": str(seen)}], "threads": 1})
    np.testing.assert_array_equal(np.load(f"{images}.npy"), reference_images(pipe))
    assert json.loads(seen.read_text())["distilled_from"]["pairs"]["space"] == "latent"


def test_the_latent_students_leak_check_follows_the_teachers_autoencoder(tmp_path):
    torch.set_num_threads(1)
    teacher = tiny_latent_teacher(tmp_path / "leaky", autoencoder_split="all")
    options = student_options(teacher, pairs=[str(tmp_path / "pairs")], num_pairs=8)
    _, provenance = student.load_student_data(TrainConfig(flip=False, batch_size=8, extra=options))
    with pytest.raises(LeakError, match=r"decoded by ae\) was trained on split 'all'"):
        check_unseen(provenance, "student", "test", "bloodmnist", "augment-study")


def test_latent_student_with_an_adversarial_term_resumes_exactly(latent_teacher, fake_data_dir, tmp_path):
    """4 steps in one go == 2, stop, resume to 4, with the discriminator on decoded 32 px estimates against real
    32 px train images; both runs read one pairs folder, the second without drawing."""
    pairs = tmp_path / "pairs"
    common = ["--data-dir", str(fake_data_dir), "--resolution", "32", "--adversarial-weight", "0.5"]
    common += ["--checkpoint-every", "2", "--lr-schedule", "constant"]
    student.main(latent_args(latent_teacher, tmp_path / "full", pairs, *common, "--max-steps", "4"))
    student.main(latent_args(latent_teacher, tmp_path / "split", pairs, *common, "--max-steps", "2"))
    resumed = ("--max-steps", "4", "--resume", "latest")
    student.main(latent_args(latent_teacher, tmp_path / "split", pairs, *common, *resumed))
    full, split = (tmp_path / run / "checkpoints" / "checkpoint-0000004" for run in ("full", "split"))
    for name in ("unet", "discriminator"):
        a, b = load_file(str(full / f"{name}.safetensors")), load_file(str(split / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state_a, state_b = load_state(full / "training_state"), load_state(split / "training_state")
    for x, y in zip(state_a["extra"]["ema"]["shadow_params"], state_b["extra"]["ema"]["shadow_params"]):
        assert torch.equal(x, y)
    logged = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3, 4] and all("loss_adversarial" in row for row in logged)
    adversarial = load_pipeline(str(tmp_path / "split" / "pipeline")).config.provenance["adversarial"]
    assert adversarial == {"dataset": "bloodmnist", "resolution": 32, "split": "train", "num_images": 48}


def test_bad_latent_student_settings_get_one_clear_error(latent_teacher, teacher, fake_data_dir, tmp_path):
    pairs, npz = tmp_path / "pairs", tmp_path / "images.npz"
    npz.write_bytes(b"")
    cases = [
        ((), "--method reflow of an LDM teacher needs --pairs DIR and --num-pairs N"),
        (("--pairs", str(pairs)), "needs --pairs DIR and --num-pairs N"),
        (("--pairs", str(pairs), str(npz), "--num-pairs", "8"), "an LDM teacher's --pairs is one folder .*got 2"),
        (("--pairs", str(npz), "--num-pairs", "8"), "images.npz is a file; an LDM teacher's --pairs is the folder"),
        (("--pairs", str(pairs), "--num-pairs", "0"), "--num-pairs must be at least 1, got 0"),
        (("--pairs", str(pairs), "--num-pairs", "8", "--pairs-seed", "-1"), "--pairs-seed must be >= 0"),
        (("--method", "consistency", "--data-dir", str(fake_data_dir)), "--method consistency needs a pixel teacher"),
        (
            ("--pairs", str(pairs), "--num-pairs", "8", "--adversarial-weight", "1"),
            r"compares the student's 32x32 images with real ones at --resolution 28; pass --resolution 32",
        ),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message) as refused:
            student.main(student_args(latent_teacher, tmp_path / "s", *extra))
        assert refused.value.code == 2 and "\n" not in str(refused.value)
    pixel_pairs = draw_pairs(teacher, tmp_path / "pixel.npz", 8)
    with pytest.raises(SystemExit, match="--num-pairs and --pairs-seed draw an LDM teacher's latent pairs"):
        student.main(student_args(teacher, tmp_path / "s", "--pairs", str(pixel_pairs), "--num-pairs", "8"))
    assert not (tmp_path / "s").exists() and not pairs.exists()
