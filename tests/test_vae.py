import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import seeded, tiny_vae_pipeline
from diffusers import DiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from bloodgen_hf.cli import app
from bloodgen_hf.models.vae import ConditionalAutoencoderKL, gaussian_nll, kl_per_dimension
from bloodgen_hf.plots import plot_metrics
from bloodgen_hf.registry import ModelLoadError, load_pipeline, save_pipeline
from bloodgen_hf.training import core
from bloodgen_hf.training.checkpoint import load_state
from bloodgen_hf.training.vae import beta_at, kl_term, write_model_figures
from bloodgen_hf.training.vae import main as train_vae

TINY = ["--batch-size", "16", "--block-out-channels", "8,16", "--norm-num-groups", "4", "--class-embed-dim", "4"]
TINY += ["--latent-dim", "8", "--latent-channels", "2", "--log-with", "none", "--log-every", "1"]


def cell_image(seed: int = 0, size: int = 28) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# --- model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone, layers_per_block", [("autoencoder_kl", 1), ("resnet", 2)], ids=["v1", "v2-resnet"])
@pytest.mark.parametrize(
    "resolution, blocks, latent_dim, latent_shape",
    [(28, (8, 16, 16), 12, (12, 1, 1)), (28, (8, 16, 16), None, (3, 7, 7)), (64, (8, 8, 16, 16), 12, (12, 1, 1))],
)
def test_encoder_decoder_shapes(resolution, blocks, latent_dim, latent_shape, backbone, layers_per_block):
    """Both backbones (v1's AutoencoderKL halves, VAE v2's ResNet) give the same latent and image shapes."""
    vae = ConditionalAutoencoderKL(
        resolution=resolution,
        block_out_channels=blocks,
        norm_num_groups=4,
        latent_channels=3,
        latent_dim=latent_dim,
        backbone=backbone,
        layers_per_block=layers_per_block,
    )
    x, y = torch.randn(2, 3, resolution, resolution), torch.tensor([0, 7])
    posterior = vae.encode(x, y).latent_dist
    assert vae.latent_shape == latent_shape
    assert posterior.mean.shape == posterior.std.shape == (2, *latent_shape)
    assert vae.decode(posterior.sample(), y).sample.shape == (2, 3, resolution, resolution)
    out = vae(x, y, sample_posterior=True)
    assert out.sample.shape == x.shape and out.latent_dist.kl().shape == (2,)


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        ConditionalAutoencoderKL(resolution=30, block_out_channels=(8, 8, 8), norm_num_groups=4)
    with pytest.raises(ValueError, match="multiples of 8"):
        ConditionalAutoencoderKL(block_out_channels=(12, 16, 16))
    with pytest.raises(ValueError, match="class names"):
        ConditionalAutoencoderKL(num_classes=3, class_names=["a", "b"])


def test_kl_matches_the_closed_form():
    mean, logvar = torch.randn(4, 6, 1, 1), torch.randn(4, 6, 1, 1)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    std = torch.exp(0.5 * logvar)
    closed = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(0, 1))
    torch.testing.assert_close(kl_per_dimension(posterior), closed)
    torch.testing.assert_close(kl_per_dimension(posterior).flatten(1).sum(1), posterior.kl())
    # N(1, 1) is half a nat from N(0, 1) in each dimension; the prior itself is zero
    unit = DiagonalGaussianDistribution(torch.cat([torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1)], dim=1))
    torch.testing.assert_close(kl_per_dimension(unit), torch.full((1, 3, 1, 1), 0.5))
    assert DiagonalGaussianDistribution(torch.zeros(1, 6, 1, 1)).kl().item() == 0


def test_gaussian_nll_is_the_gaussian_log_density():
    target, mean = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    expected = -torch.distributions.Normal(mean, 0.3).log_prob(target).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_nll(target, mean, 0.3), expected)


def test_free_bits_floor_each_latent_and_stop_its_gradient():
    kl_dims = torch.tensor([0.1, 2.0, 0.4], requires_grad=True)
    term = kl_term(kl_dims, free_bits=0.5)
    assert term.item() == pytest.approx(0.5 + 2.0 + 0.5)
    term.backward()
    assert kl_dims.grad.tolist() == [0.0, 1.0, 0.0]
    assert kl_term(kl_dims, 0.0).item() == pytest.approx(2.5)


def test_beta_warms_up_linearly():
    assert [beta_at(s, 2.0, 4) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert beta_at(0, 0.7, 0) == 0.7


# --- pipeline ------------------------------------------------------------------------------------


def test_temperature_zero_decodes_the_prior_mean_deterministically():
    pipe = tiny_vae_pipeline()
    labels = [0, 3, 7]
    a = pipe(3, labels, generator=seeded(1, 2, 3), temperature=0.0, output_type="pt").images
    b = pipe(3, labels, generator=seeded(9, 8, 7), temperature=0.0, output_type="pt").images
    assert torch.equal(a, b)
    z = torch.zeros(3, *pipe.vae.latent_shape)
    expected = ((pipe.vae.decode(z, torch.tensor(labels)).sample.clamp(-1, 1) + 1) / 2).detach()
    torch.testing.assert_close(a, expected)
    noisy = pipe(3, labels, generator=seeded(1, 2, 3), temperature=1.0, output_type="pt").images
    assert not torch.allclose(a, noisy)


def test_temperature_scales_and_latent_bias_shifts_the_noise():
    pipe = tiny_vae_pipeline()
    base = pipe.prior_latents(2, seeded(5, 6), temperature=1.0)
    torch.testing.assert_close(pipe.prior_latents(2, seeded(5, 6), temperature=0.5), 0.5 * base)
    torch.testing.assert_close(pipe.prior_latents(2, seeded(5, 6), latent_bias=0.7), base + 0.7)
    unbiased = pipe(2, [1, 1], generator=seeded(5, 6), output_type="pt").images
    biased = pipe(2, [1, 1], generator=seeded(5, 6), latent_bias=1.5, output_type="pt").images
    assert (unbiased - biased).abs().max() > 1e-3
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        pipe(1, temperature=-0.1)


@pytest.mark.parametrize("backbone", ["autoencoder_kl", "resnet"])
def test_conditioning_changes_encoder_and_decoder(backbone):
    pipe = tiny_vae_pipeline(backbone=backbone)
    images = [pipe(1, c, generator=seeded(0), output_type="pt").images for c in range(8)]
    assert all((images[0] - other).abs().max() > 1e-3 for other in images[1:])
    x = torch.rand(1, 3, 28, 28) * 2 - 1
    means = [pipe.vae.encode(x, torch.tensor([c])).latent_dist.mean for c in (0, 5)]
    assert (means[0] - means[1]).abs().max() > 1e-4


def test_per_image_generators_do_not_depend_on_batching():
    pipe = tiny_vae_pipeline()
    batch = pipe(3, ["basophil", 4, "platelet"], generator=seeded(10, 11, 12), output_type="np").images
    alone = pipe(1, 4, generator=seeded(11), output_type="np").images
    # the noise is bit-identical; the decoder's batched arithmetic may differ in the last float bits
    assert torch.equal(pipe.prior_latents(3, seeded(10, 11, 12))[1], pipe.prior_latents(1, seeded(11))[0])
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)
    assert [im.size for im in pipe(2, generator=seeded(0, 1)).images] == [(28, 28)] * 2


def test_classify_picks_the_lowest_negative_elbo():
    pipe = tiny_vae_pipeline()
    x = pipe.preprocess([cell_image(1), cell_image(2)])
    scores = torch.stack([pipe.vae.negative_elbo(x, torch.full((2,), c)) for c in range(8)], dim=1)
    assert torch.equal(pipe.classify(x), scores.argmin(dim=1))


def test_reconstruct_and_variations():
    pipe = tiny_vae_pipeline()
    image = cell_image(3)
    recon = pipe.reconstruct(image, class_labels=2, output_type="pt").images
    assert recon.shape == (1, 3, 28, 28)
    inferred = int(pipe.classify(image)[0])
    torch.testing.assert_close(
        pipe.reconstruct(image, output_type="pt").images, pipe.reconstruct(image, inferred, "pt").images
    )
    # temperature 0: every variation is the reconstruction; above 0 they differ, reproducibly
    still = pipe.variations(image, 3, class_label=2, temperature=0.0, generator=seeded(1, 2, 3), output_type="pt")
    torch.testing.assert_close(still.images, recon.expand(3, -1, -1, -1))
    varied = pipe.variations(image, 3, class_label=2, temperature=1.0, generator=seeded(1, 2, 3), output_type="pt")
    again = pipe.variations(image, 3, class_label=2, temperature=1.0, generator=seeded(1, 2, 3), output_type="pt")
    assert torch.equal(varied.images, again.images)
    assert (varied.images[0] - varied.images[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="one image"):
        pipe.variations([image, image])


def test_interpolate_between_images_and_between_classes():
    pipe = tiny_vae_pipeline()
    a, b = cell_image(4), cell_image(5)
    path = pipe.interpolate(a, b, num_steps=5, output_type="pt").images
    assert path.shape == (5, 3, 28, 28)
    torch.testing.assert_close(path[0], pipe.reconstruct(a, output_type="pt").images[0])
    torch.testing.assert_close(path[-1], pipe.reconstruct(b, output_type="pt").images[0])
    # between two classes: one prior draw, only the class embedding moves
    classes = pipe.interpolate("basophil", 7, num_steps=4, generator=torch.Generator().manual_seed(3), output_type="pt")
    first = pipe(1, 0, generator=torch.Generator().manual_seed(3), output_type="pt").images[0]
    last = pipe(1, 7, generator=torch.Generator().manual_seed(3), output_type="pt").images[0]
    torch.testing.assert_close(classes.images[0], first)
    torch.testing.assert_close(classes.images[-1], last)
    with pytest.raises(ValueError, match="num_steps"):
        pipe.interpolate(0, 1, num_steps=1)


def test_image_inputs_are_checked():
    pipe = tiny_vae_pipeline()
    array = np.asarray(cell_image(6))
    torch.testing.assert_close(pipe.preprocess(array), pipe.preprocess(Image.fromarray(array)))
    torch.testing.assert_close(
        pipe.preprocess(array), pipe.preprocess(torch.tensor(array).permute(2, 0, 1) / 127.5 - 1)
    )
    with pytest.raises(ValueError, match="28x28"):
        pipe.reconstruct(cell_image(0, size=32))
    with pytest.raises(ValueError, match="uint8"):
        pipe.preprocess(array.astype(np.float32))
    with pytest.raises(ValueError, match="unknown class"):
        pipe.reconstruct(array, class_labels="dragon")


# --- saving and loading --------------------------------------------------------------------------


@pytest.mark.parametrize("latent_dim", [8, None])
def test_save_load_round_trip_is_exact(latent_dim, tmp_path):
    pipe = tiny_vae_pipeline(latent_dim=latent_dim)
    folder = save_pipeline(pipe, tmp_path / "vae")
    assert (folder / "vae" / "bloodgen_vae_models.py").is_file() and (folder / "pipeline_bloodgen_vae.py").is_file()
    loaded = load_pipeline(str(folder))
    assert type(loaded).__name__ == "BloodVAEPipeline" and loaded.vae.config.latent_dim == latent_dim
    assert loaded.vae.config.decoder_sigma == 0.2
    kwargs = {"class_labels": [0, 5], "generator": None, "output_type": "np", "temperature": 0.8, "latent_bias": 0.1}
    np.testing.assert_array_equal(
        pipe(2, **{**kwargs, "generator": seeded(1, 2)}).images,
        loaded(2, **{**kwargs, "generator": seeded(1, 2)}).images,
    )
    image = cell_image(7)
    np.testing.assert_array_equal(
        pipe.reconstruct(image, output_type="np").images, loaded.reconstruct(image, output_type="np").images
    )
    remote = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    np.testing.assert_array_equal(
        remote(2, **{**kwargs, "generator": seeded(1, 2)}).images,
        pipe(2, **{**kwargs, "generator": seeded(1, 2)}).images,
    )


def test_corrupt_weights_are_rejected_naming_the_file(tmp_path):
    folder = save_pipeline(tiny_vae_pipeline(), tmp_path / "vae")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors"):
        load_pipeline(str(folder))


# --- training ------------------------------------------------------------------------------------


def run(data_dir, out, *extra):
    path = train_vae(["--data-dir", str(data_dir), "--output-dir", str(out), *TINY, *extra])
    AcceleratorState._reset_state(True)
    return path


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {f"vae.{k}": v for k, v in load_file(str(folder / "vae.safetensors")).items()}
    tensors.update({f"state.{k}": v for k, v in load_file(str(folder / "training_state.safetensors")).items()})
    return tensors


def test_resumed_training_matches_uninterrupted(fake_data_dir, tmp_path):
    # 80 images / batch 16 = 5 steps per epoch: the run crosses an epoch boundary (with a sample
    # grid), the resume point falls mid-epoch and mid warm-up, so the KL weight's step counter and
    # the decoder sigma estimate must come back too.
    common = ["--checkpoint-every", "3", "--keep-checkpoints", "5", "--kl-warmup-steps", "5", "--free-bits", "0.01"]
    run(fake_data_dir, tmp_path / "full", "--max-steps", "7", *common)
    run(fake_data_dir, tmp_path / "split", "--max-steps", "3", *common)
    run(fake_data_dir, tmp_path / "split", "--max-steps", "7", "--resume", "latest", *common)
    full, split = (tmp_path / name / "checkpoints" / "checkpoint-0000007" for name in ("full", "split"))
    a, b = checkpoint_tensors(full), checkpoint_tensors(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "training_state.json").read_text() == (split / "training_state.json").read_text()
    metrics = [(tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("full", "split")]
    timing = ("images_per_s", "cpu_minutes")  # measured, not computed: they differ between any two runs
    drop_speed = [{k: v for k, v in json.loads(line).items() if k not in timing} for line in metrics[0]]
    assert drop_speed == [{k: v for k, v in json.loads(line).items() if k not in timing} for line in metrics[1]]


def test_training_in_bf16_autocast_saves_fp32_weights(fake_data_dir, tmp_path, monkeypatch, capsys):
    # Accelerate's autocast wrapper rebuilds the model's output from a dict to cast it back to fp32;
    # an output class that cannot be rebuilt that way failed on the first step.
    monkeypatch.setattr(core, "native_bf16", lambda: False)  # as on an AVX2-only CPU: said, not refused
    pipeline_dir = run(fake_data_dir, tmp_path / "run", "--max-steps", "2", "--mixed-precision", "bf16")
    assert "has no bf16 units; bf16 is emulated there and slower than fp32" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert {p.dtype for p in load_pipeline(str(pipeline_dir)).vae.parameters()} == {torch.float32}


def test_training_logs_both_elbo_terms_and_saves_a_loadable_pipeline(fake_data_dir, tmp_path):
    out = tmp_path / "run"
    pipeline_dir = run(fake_data_dir, out, "--epochs", "2", "--recon", "mse", "--recon-sigma", "0.3")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    for r in records:
        assert {"loss", "loss_recon", "loss_kl", "beta", "mse"} <= r.keys()
        assert r["loss"] == pytest.approx(r["loss_recon"] + r["beta"] * r["loss_kl"], rel=1e-4)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    pipe = load_pipeline(str(pipeline_dir))
    assert pipe.vae.config.decoder_sigma == 0.3
    assert pipe(2, output_type="pt", temperature=0.5).images.shape == (2, 3, 28, 28)
    plot = plot_metrics(out, keys=["loss_recon", "loss_kl"])
    assert plot == out / "loss_curves.png" and Image.open(plot).size[0] > 100

    metrics = write_model_figures(str(pipeline_dir), str(fake_data_dir), out / "card")
    assert sorted(p.name for p in (out / "card").iterdir()) == [
        "metrics.json",
        "reconstructions.png",
        "samples.png",
        "temperature_sweep.png",
    ]
    assert json.loads((out / "card" / "metrics.json").read_text()) == metrics
    assert metrics["num_images"] == 16 and metrics["decoder_sigma"] == 0.3
    assert metrics["test_kl"] >= 0 and np.isfinite(metrics["test_neg_elbo"]) and metrics["test_mse"] > 0
    # the sweep: one row per temperature, 2 images per class in each row, upscaled x3 with 2-pixel gaps
    width, height = Image.open(out / "card" / "temperature_sweep.png").size
    assert height == 3 * (5 * 30 + 2) and width > 3 * (16 * 30 + 2)


def test_gaussian_recon_records_the_learned_decoder_sigma(fake_data_dir, tmp_path):
    pipeline_dir = run(fake_data_dir, tmp_path / "run", "--max-steps", "3", "--checkpoint-every", "3")
    sigma_ema = load_state(tmp_path / "run" / "checkpoints" / "checkpoint-0000003" / "training_state")["extra"][
        "sigma_ema"
    ]
    assert load_pipeline(str(pipeline_dir)).vae.config.decoder_sigma == sigma_ema != 0.1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--beta", "-1"], "--beta must be >= 0"),
        (["--free-bits", "-0.5"], "--free-bits must be >= 0"),
        (["--block-out-channels", "8,x"], "comma-separated integers"),
        (["--block-out-channels", "8,8,8,8"], "resolution 28 must be a multiple of 8"),
    ],
)
def test_bad_training_options_are_one_clear_error(extra, message, fake_data_dir, tmp_path):
    with pytest.raises(SystemExit, match=message):
        run(fake_data_dir, tmp_path / "bad", "--max-steps", "1", *extra)


# --- CLI -----------------------------------------------------------------------------------------


@pytest.fixture
def tiny_vae_dir(tmp_path: Path) -> Path:
    return save_pipeline(tiny_vae_pipeline(), tmp_path / "tiny_vae")


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_reconstruct_and_variations(tiny_vae_dir, tmp_path):
    cell = tmp_path / "cell.png"
    cell_image(8).save(cell)
    out = tmp_path / "recon.png"
    result = cli("reconstruct", "--input", cell, "--model", tiny_vae_dir, "--out", out, "--class", "monocyte")
    assert result.exit_code == 0, result.output
    assert "monocyte (given)" in result.output
    expected = tiny_vae_pipeline().reconstruct(cell_image(8), class_labels="monocyte", output_type="np").images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), (expected * 255).round().astype(np.uint8))
    assert (
        "inferred" in cli("reconstruct", "--input", cell, "--model", tiny_vae_dir, "--out", out, "--overwrite").output
    )

    folder = tmp_path / "vars"
    result = cli(
        "variations", "--input", cell, "--model", tiny_vae_dir, "--n", 3, "--temperature", 0.5, "--out", folder
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["info.json", *(f"variation_{i:03d}.png" for i in range(3))]
    info = json.loads((folder / "info.json").read_text())
    assert info["temperature"] == 0.5 and info["n"] == 3 and info["class_inferred"] is True
    # variation i is seed+i, whatever n was (up to the last float bit of batched arithmetic: 1 grey level)
    cli(
        "variations",
        "--input",
        cell,
        "--model",
        tiny_vae_dir,
        "--n",
        1,
        "--seed",
        2,
        "--temperature",
        0.5,
        "--out",
        tmp_path / "one",
    )
    alone, batched = (
        np.asarray(Image.open(f), dtype=int)
        for f in (tmp_path / "one" / "variation_000.png", folder / "variation_002.png")
    )
    assert np.abs(alone - batched).max() <= 1
    other = np.asarray(Image.open(folder / "variation_001.png"), dtype=int)
    assert np.abs(other - batched).max() > 1


def test_cli_sample_passes_temperature_and_latent_bias(tiny_vae_dir, tmp_path):
    out = tmp_path / "samples"
    result = cli("sample", "--n", 4, "--model", tiny_vae_dir, "--temperature", 0.8, "--latent-bias", 0.0, "--out", out)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "info.json").read_text())
    assert info["temperature"] == 0.8 and info["latent_bias"] == 0.0
    result = cli("sample", "--n", 4, "--model", tiny_vae_dir, "--steps", 3, "--out", tmp_path / "s2")
    assert result.exit_code == 2 and "--steps does not apply to BloodVAEPipeline" in result.output


def test_cli_errors_are_one_line(tiny_vae_dir, tiny_gan_dir, tmp_path):
    cell, odd, text = tmp_path / "cell.png", tmp_path / "odd.png", tmp_path / "notes.png"
    cell_image(0).save(cell)
    cell_image(0, size=30).save(odd)
    text.write_text("not an image")
    (tmp_path / "taken.png").write_bytes(b"keep me")
    cases = [
        (["reconstruct", "--input", tmp_path / "missing.png"], "missing.png does not exist"),
        (["reconstruct", "--input", odd], "is 30x30 pixels, but this model works on 28x28"),
        (["reconstruct", "--input", text], "is not a readable image"),
        (["reconstruct", "--input", tmp_path], "is a folder, not an image"),
        (["reconstruct", "--input", cell, "--out", tmp_path / "taken.png"], "already exists; pass --overwrite"),
        (["reconstruct", "--input", cell, "--class", "dragon"], "unknown class 'dragon'"),
        (["variations", "--input", cell, "--n", 0], "--n must be a positive number"),
        (["variations", "--input", cell, "--temperature", -1], "--temperature must be >= 0"),
        (["variations", "--input", odd], "is 30x30 pixels"),
    ]
    for args, message in cases:
        result = cli(
            *args[:3], "--model", tiny_vae_dir, *args[3:], *([] if "--out" in args else ["--out", tmp_path / "o"])
        )
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error: ") and message in result.output and result.output.count("\n") == 1
    assert (tmp_path / "taken.png").read_bytes() == b"keep me"
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    result = cli("reconstruct", "--input", cell, "--model", tiny_gan_dir, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "BloodGANPipeline, which cannot encode images" in result.output
