import argparse
import json
import re

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from bloodgen_hf.errors import UsageError
from bloodgen_hf.models.gan import ConditionalDiscriminator, ConditionalGenerator, _MinibatchStd
from bloodgen_hf.registry import ModelLoadError, load_pipeline, save_pipeline
from bloodgen_hf.training.checkpoint import load_state
from bloodgen_hf.training.gan import GANOptions, add_gan_arguments, check_options
from bloodgen_hf.training.gan import main as train_gan
from bloodgen_hf.training.gan_losses import (
    ada_adjust,
    adaptive_augment,
    diff_augment,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    r1_penalty,
)
from bloodgen_hf.training.options import options_from_args, options_of, options_record
from tests.conftest import pixel_fingerprint, tiny_gan_pipeline


@pytest.mark.parametrize("resolution", [28, 64])
def test_generator_and_discriminator_shapes(resolution):
    g = ConditionalGenerator(resolution=resolution, latent_dim=16, base_channels=8, embed_dim=8)
    d = ConditionalDiscriminator(resolution=resolution, base_channels=8)
    images = g(torch.randn(5, 16), torch.arange(5))
    assert images.shape == (5, 3, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    assert d(images, torch.arange(5)).shape == (5,)


def test_odd_resolution_is_refused():
    with pytest.raises(ValueError, match="resolution 27"):
        ConditionalGenerator(resolution=27)


def test_class_label_changes_generator_and_discriminator_output():
    pipe = tiny_gan_pipeline()
    g = pipe.gan.eval()
    z = torch.randn(1, 16).repeat(8, 1)
    images = g(z, torch.arange(8))
    assert all((images[0] - images[i]).abs().max() > 1e-3 for i in range(1, 8))
    d = ConditionalDiscriminator(resolution=28, base_channels=8)
    with torch.no_grad():
        d.embed.weight.normal_()
    x = torch.randn(1, 3, 28, 28).repeat(2, 1, 1, 1)
    scores = d(x, torch.tensor([0, 1]))
    assert (scores[0] - scores[1]).abs() > 1e-4


def test_the_discriminator_is_a_spectral_norm_projection_discriminator():
    """BigGAN's conditioning (GAN v2 keeps it): a linear score of the sum-pooled features plus <embed(y), features>."""
    d = ConditionalDiscriminator(resolution=28, base_channels=8).eval()  # eval: spectral norm's power step rests
    x, y = torch.randn(3, 3, 28, 28), torch.tensor([0, 4, 7])
    with torch.no_grad():
        h = d.features(x).sum(dim=(2, 3))
        torch.testing.assert_close(d(x, y), d.linear(h).squeeze(1) + (d.embed(y) * h).sum(dim=1))
    convs = [m for m in d.features if isinstance(m, torch.nn.Conv2d)]
    assert all(hasattr(m, "weight_orig") for m in [*convs, d.linear, d.embed])  # every layer spectrally normed


def test_minibatch_std_sees_collapse_and_never_mixes_real_with_fake():
    torch.manual_seed(0)
    d = ConditionalDiscriminator(resolution=28, base_channels=8, minibatch_std_group=4).eval()
    real, labels = torch.rand(8, 3, 28, 28) * 2 - 1, torch.arange(8) % 8
    varied, collapsed = torch.rand(8, 3, 28, 28) * 2 - 1, torch.rand(1, 3, 28, 28).expand(8, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        alone = d(real, labels)
        with_varied = d(torch.cat([real, varied]), torch.cat([labels, labels]))
        with_collapsed = d(torch.cat([real, collapsed]), torch.cat([labels, labels]))
        spread = _MinibatchStd(4)(torch.cat([varied, collapsed]))[:, -1, 0, 0]  # the appended channel
    torch.testing.assert_close(with_varied[:8], alone)  # the real half's groups hold real images only
    torch.testing.assert_close(with_collapsed[:8], alone)
    assert (spread[8:] < 1e-3).all() and (spread[:8] > 0.1).all()  # identical images have no spread
    with pytest.raises(ValueError, match="need a batch divisible by 4"):
        d(real[:6], labels[:6])


@pytest.mark.parametrize("kind", ["bce", "hinge", "wgan-gp"])
def test_losses_prefer_a_discriminator_that_separates(kind):
    good = discriminator_loss(kind, torch.full((4,), 3.0), torch.full((4,), -3.0))
    bad = discriminator_loss(kind, torch.full((4,), -3.0), torch.full((4,), 3.0))
    assert good < bad
    assert generator_loss(kind, torch.full((4,), 3.0)) < generator_loss(kind, torch.full((4,), -3.0))


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown GAN loss 'lsgan'"):
        discriminator_loss("lsgan", torch.zeros(1), torch.zeros(1))


def test_gradient_penalty_is_zero_for_unit_gradient():
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    direction = torch.zeros(3, 4, 4)
    direction[0, 0, 0] = 1.0  # scores = <x, e>  ->  gradient norm exactly 1
    scores = (x * direction).flatten(1).sum(1)
    assert gradient_penalty(scores, x).item() == pytest.approx(0.0, abs=1e-10)
    assert gradient_penalty(3 * scores, x).item() == pytest.approx(4.0)


def test_diffaugment_is_differentiable_and_random():
    x = torch.randn(4, 3, 28, 28, requires_grad=True)
    torch.manual_seed(0)
    y = diff_augment(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.manual_seed(1)
    assert not torch.equal(diff_augment(x), y)
    assert torch.equal(diff_augment(x, ""), x)
    with pytest.raises(ValueError, match="unknown DiffAugment policy 'rotate'"):
        diff_augment(x, "rotate")


def test_pipeline_outputs_and_determinism():
    pipe = tiny_gan_pipeline()
    pil = pipe(num_images=3, generator=torch.Generator().manual_seed(1)).images
    assert len(pil) == 3 and pil[0].size == (28, 28)
    a = pipe(num_images=3, generator=torch.Generator().manual_seed(1), output_type="np").images
    b = pipe(num_images=3, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert a.shape == (3, 28, 28, 3) and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    c = pipe(num_images=3, generator=torch.Generator().manual_seed(2), output_type="np").images
    assert np.abs(a - c).max() > 1e-3
    pt = pipe(num_images=2, class_labels="platelet", output_type="pt").images
    assert pt.shape == (2, 3, 28, 28)


def test_per_image_generators_do_not_depend_on_batching():
    pipe = tiny_gan_pipeline()
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = pipe(4, class_labels=[0, 1, 2, 3], generator=gens(range(4)), output_type="pt").images
    alone = pipe(1, class_labels=[2], generator=gens([2]), output_type="pt").images
    torch.testing.assert_close(together[2:3], alone)


def test_pipeline_argument_errors():
    pipe = tiny_gan_pipeline()
    with pytest.raises(ValueError, match="num_images must be a positive integer"):
        pipe(0)
    with pytest.raises(ValueError, match="unknown class 'blast'"):
        pipe(2, class_labels="blast")
    with pytest.raises(ValueError, match="got 3 class labels for 2 images"):
        pipe(2, class_labels=[0, 1, 2])
    with pytest.raises(ValueError, match="output_type"):
        pipe(2, output_type="jpg")


def test_save_load_round_trip_is_exact(tiny_gan_dir):
    index = json.loads((tiny_gan_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_bloodgen_gan", "BloodGANPipeline"]
    assert (tiny_gan_dir / "gan" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_pipeline(str(tiny_gan_dir))
    original = tiny_gan_pipeline()
    kwargs = dict(num_images=4, class_labels=[0, 3, 5, 7], output_type="pt")
    a = original(generator=torch.Generator().manual_seed(3), **kwargs).images
    b = loaded(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert torch.equal(a, b)
    assert loaded.class_names == original.class_names


def test_corrupt_weights_are_rejected_naming_the_file(tiny_gan_dir):
    weights = tiny_gan_dir / "gan" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"corrupt or mismatched weights in .*gan/diffusion_pytorch_model"):
        load_pipeline(str(tiny_gan_dir))


def test_mismatched_weights_are_rejected_naming_the_file(tiny_gan_dir, tmp_path):
    other = tiny_gan_pipeline()
    other.gan.register_to_config(base_channels=16)  # config now disagrees with the stored tensors
    other.gan.save_config(tiny_gan_dir / "gan")
    with pytest.raises(ModelLoadError, match=r"diffusion_pytorch_model\.safetensors"):
        load_pipeline(str(tiny_gan_dir))


def test_missing_and_incomplete_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="not a bundled model"):
        load_pipeline(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        load_pipeline(str(tmp_path))
    save_pipeline(tiny_gan_pipeline(), tmp_path / "p")
    (tmp_path / "p" / "gan" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing weights file"):
        load_pipeline(str(tmp_path / "p"))


def test_bundled_gan_varies_within_each_class():
    """Guards against shipping a mode-collapsed GAN again: the first bundled GAN had a within-class
    pixel std of 3.4 (0-255 scale), real images 28.4, v1 22.4 and v2 21.0 (model_cards/gan.md)."""
    pipe = load_pipeline("gan")
    labels = [c for c in range(8) for _ in range(64)]
    images = pipe(len(labels), class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    per_class = images.mul(255).view(8, 64, 3, 28, 28).std(dim=1).mean(dim=(1, 2, 3))
    assert per_class.mean() > 15 and per_class.min() > 6, per_class  # platelets, small dots, vary least (12)


def test_bundled_gan_samples_exactly_as_when_bundled():
    """The sampling code must not change what the bundled GAN (v2, bundled 2026-12-06) draws for a seed
    (checksums computed from its weights when it was bundled)."""
    pipe = load_pipeline("gan")
    labels = [c for c in range(8) for _ in range(4)]
    images = pipe(len(labels), class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert float(images.double().sum()) == pytest.approx(54484.381092995405, rel=1e-6)
    assert float(images.double().pow(2).sum()) == pytest.approx(42273.28820586454, rel=1e-6)
    # where each value sits, to a 500th of a grey level (measured where the sums above were)
    assert pixel_fingerprint(images) == pytest.approx((54550.53458, 54455.95473), abs=2e-3)


# --- GAN v2 (issue 33): R1 with lazy regularisation, ADA, class-balanced batches ------------------------------

V2_FLAGS = {"--r1-gamma": "0.5", "--r1-every": "4", "--ada-target": "0.6", "--ada-policy": "color", "--ada-kimg": "50"}


def test_gan_v2_options_are_flags_with_help_that_round_trip_through_the_record():
    parser = add_gan_arguments(argparse.ArgumentParser())
    help_text = " ".join(parser.format_help().split())
    for flag in V2_FLAGS:
        assert flag in help_text
    assert "StyleGAN2-ADA: 0.6" in help_text and "multiplied by K" in help_text
    args = parser.parse_args([item for pair in V2_FLAGS.items() for item in pair])
    o = options_from_args(args, GANOptions)
    assert (o.r1_gamma, o.r1_every, o.ada_target, o.ada_policy, o.ada_kimg) == (0.5, 4, 0.6, "color", 50.0)
    assert options_of(GANOptions, json.loads(json.dumps(options_record(o)))) == o
    # the defaults keep today's GAN: no R1, no ADA; a record from before GAN v2 reads as such
    old = {k: v for k, v in options_record(GANOptions()).items() if not k.startswith(("r1_", "ada_"))}
    assert options_of(GANOptions, old) == GANOptions()
    assert GANOptions().r1_gamma == 0 and GANOptions().ada_target == 0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"r1_gamma": -1.0}, "--r1-gamma must be >= 0 (0 turns R1 off), got -1.0"),
        ({"r1_gamma": float("nan")}, "--r1-gamma must be >= 0"),
        ({"r1_every": 0}, "--r1-every must be at least 1 (1: R1 on every step), got 0"),
        ({"ada_target": 1.0}, "--ada-target must be in [0, 1) (0: ADA off; StyleGAN2-ADA uses 0.6), got 1.0"),
        ({"ada_target": -0.1}, "--ada-target must be in [0, 1)"),
        ({"ada_kimg": 0.0}, "--ada-kimg must be positive, got 0.0"),
        ({"ada_target": 0.6, "ada_policy": "color,rotate"}, "unknown --ada-policy operation 'rotate'; choose from"),
        ({"ada_target": 0.6, "ada_policy": " , "}, "--ada-policy names no operation"),
        ({"ada_target": 0.6, "diffaugment": "color"}, "--ada-target and --diffaugment both augment D's inputs"),
        ({"diffaugment": "blur"}, "unknown DiffAugment policy 'blur'"),
    ],
)
def test_bad_gan_v2_values_are_refused(changes, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        check_options(GANOptions(**changes), batch_size=8)


def test_a_bad_gan_v2_value_ends_the_command_with_one_line(fake_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        run_tiny(fake_data_dir, tmp_path / "bad", "--max-steps", "1", "--r1-every", "0")
    assert err.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --r1-every must be at least 1 (1: R1 on every step), got 0"
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_r1_penalty_is_the_squared_gradient_norm_on_reals():
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    w = torch.randn(3, 4, 4)
    scores = (x * w).flatten(1).sum(1) + (x**2).flatten(1).sum(1)  # gradient w + 2x
    expected = (w + 2 * x.detach()).flatten(1).pow(2).sum(1).mean()
    penalty = r1_penalty(scores, x)
    torch.testing.assert_close(penalty, expected)
    penalty.backward()  # differentiable (create_graph), so D's loss can carry it
    assert x.grad is not None


def test_adaptive_augment_applies_each_operation_with_probability_p():
    x = torch.rand(256, 3, 8, 8, requires_grad=True)
    state = torch.get_rng_state()
    assert adaptive_augment(x, "color,translation", 0.0) is x  # p = 0: nothing done, nothing drawn
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    half = adaptive_augment(x, "color", 0.5)
    changed = (half - x).flatten(1).abs().amax(1) > 0
    assert 0.35 < changed.float().mean() < 0.65  # about half the images, each wholly or not at all
    torch.manual_seed(0)
    assert ((adaptive_augment(x, "color", 1.0) - x).flatten(1).abs().amax(1) > 0).all()
    half.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_ada_moves_p_by_the_sign_of_the_overfitting_signal_and_clips():
    assert ada_adjust(0.2, overfit=0.9, target=0.6, images=256, kimg=1.0) == pytest.approx(0.456)
    assert ada_adjust(0.2, overfit=0.1, target=0.6, images=256, kimg=1.0) == pytest.approx(0.0)
    assert ada_adjust(0.9, overfit=1.0, target=0.6, images=256, kimg=1.0) == 1.0
    assert ada_adjust(0.3, overfit=0.6, target=0.6, images=256, kimg=1.0) == 0.3


TINY_GAN = ["--batch-size", "8", "--base-channels", "8", "--latent-dim", "16", "--log-with", "none", "--log-every", "1"]
TINY_GAN += ["--cpu-threads", "1"]  # the machine may be busy: two threads on two shared cores crawl


def run_tiny(data_dir, out, *extra):
    try:
        return train_gan(["--data-dir", str(data_dir), "--output-dir", str(out), *TINY_GAN, *extra])
    finally:
        AcceleratorState._reset_state(True)


def checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in ("generator", "discriminator", "training_state"):
        tensors.update({f"{name}.{k}": v for k, v in load_file(str(folder / f"{name}.safetensors")).items()})
    return tensors


def test_gan_v2_resume_is_exact_with_lazy_r1_ada_and_balanced_batches(fake_data_dir, tmp_path):
    """26 steps straight against 13 + `--resume latest` + 13, with every GAN v2 option on: the same weights,
    optimizer and EMA state, ADA probability and counters (80 images / batch 8: the resume falls mid-epoch)."""
    v2 = ["--r1-gamma", "1", "--r1-every", "3", "--ada-target", "0.1", "--ada-kimg", "0.1", "--balanced-batches"]
    common = [*v2, "--checkpoint-every", "13", "--keep-checkpoints", "5"]
    run_tiny(fake_data_dir, tmp_path / "full", "--max-steps", "26", *common)
    run_tiny(fake_data_dir, tmp_path / "split", "--max-steps", "13", *common)
    run_tiny(fake_data_dir, tmp_path / "split", "--max-steps", "26", "--resume", "latest", *common)
    full, split = (tmp_path / name / "checkpoints" for name in ("full", "split"))
    a, b = checkpoint_tensors(full / "checkpoint-0000026"), checkpoint_tensors(split / "checkpoint-0000026")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    counters = [load_state(f / "checkpoint-0000026" / "training_state")["extra"]["gan"] for f in (full, split)]
    assert counters[0] == counters[1] and counters[0]["d_steps"] == 26
    halfway = load_state(split / "checkpoint-0000013" / "training_state")["extra"]["gan"]
    assert halfway["d_steps"] == 13 and halfway["ada_count"] == 8  # 1 step since p's update at step 12
    assert 0 < halfway["ada_p"] <= 1  # p moved before the resume, so restoring it matters
    logged = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "r1_penalty" in r] == list(range(1, 27, 3))  # lazy: every 3rd D step
    assert all("ada_p" in r for r in logged)
    timing = ("images_per_s", "cpu_minutes")
    resumed = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [
        {k: v for k, v in r.items() if k not in timing} for r in logged
    ]
    config = json.loads((tmp_path / "full" / "train_config.json").read_text())
    assert config["balanced_batches"] is True
    assert {k: config["extra"][k] for k in ("r1_gamma", "r1_every", "ada_target", "ada_kimg")} == {
        "r1_gamma": 1.0,
        "r1_every": 3,
        "ada_target": 0.1,
        "ada_kimg": 0.1,
    }


def test_the_ema_generator_is_what_is_saved(fake_data_dir, tmp_path):
    run_tiny(fake_data_dir, tmp_path / "run", "--max-steps", "3", "--ema-decay", "0.5")
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-0000003"
    ema = load_state(checkpoint / "training_state")["extra"]["ema"]["shadow_params"]
    live = load_file(str(checkpoint / "generator.safetensors"))
    saved = load_file(str(tmp_path / "run" / "pipeline" / "gan" / "diffusion_pytorch_model.safetensors"))
    names = [name for name, _ in load_pipeline(str(tmp_path / "run" / "pipeline")).gan.named_parameters()]
    assert len(names) == len(ema)
    for name, shadow in zip(names, ema):  # EMAModel keeps the parameters in the model's order
        assert torch.equal(saved[name], shadow), name
    assert any(not torch.equal(saved[name], live[name]) for name in names)  # and not the live weights
