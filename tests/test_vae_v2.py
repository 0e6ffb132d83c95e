"""VAE v2 (issue 33): the ResNet backbone, the class-conditional mixture prior fitted after training, the
adversarial term, the conditional reconstructions, and the bundled v2 model's output."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import pixel_fingerprint, seeded, tiny_gan_pipeline, tiny_vae, write_fake_bloodmnist
from diffusers.models.resnet import ResnetBlock2D
from safetensors.torch import load_file
from typer.testing import CliRunner

from bloodgen_hf.cli import app
from bloodgen_hf.data import LabelledImages, load_data
from bloodgen_hf.errors import UsageError
from bloodgen_hf.evaluation.reconstruction import quality, reconstruct_conditional
from bloodgen_hf.models.vae import PRIOR_BUFFERS, ConditionalAutoencoderKL
from bloodgen_hf.pipelines import BloodVAEPipeline
from bloodgen_hf.registry import load_pipeline, save_pipeline
from bloodgen_hf.training.vae import PRIOR_REG, fit_class_mixtures, fit_prior, posterior_means
from bloodgen_hf.training.vae import main as train_vae
from tests.test_remote_code import LABELS, SEEDS, reference_images, run_without_bloodgen_hf

TINY = ["--batch-size", "16", "--block-out-channels", "8,16", "--norm-num-groups", "4", "--class-embed-dim", "4"]
TINY += ["--latent-dim", "8", "--latent-channels", "2", "--log-with", "none", "--log-every", "1", "--cpu-threads", "1"]
V2 = ["--backbone", "resnet", "--prior-components", "2", "--prior-iterations", "20"]
ADVERSARIAL = ["--adv-weight", "0.5", "--adv-start", "1", "--adv-weight-mode", "adaptive", "--disc-channels", "8"]
ADVERSARIAL += ["--disc-layers", "2", "--lr-d", "0.001"]

# The bundled v2 `vae` (model_cards/vae.md): 4 images (labels 0, 3, 5, 7, seeds 0-3) as uint8, and the sum of the
# float images, measured when it was bundled. (v1's, before v2 existed: 6685.1023 and (6681.37218, 6708.51664).)
V2_FINGERPRINT = (6895.08583, 6919.26063)  # conftest.pixel_fingerprint, measured with V2_FLOAT_SUM
V2_FLOAT_SUM = 6902.7431  # 6902.743141 on one thread, 6902.743085 on two: kernels split sums by thread count


def random_prior(vae: ConditionalAutoencoderKL, components: int, seed: int = 1) -> None:
    """A prior of well-separated components with random weights and covariance factors."""
    g = torch.Generator().manual_seed(seed)
    classes, dims = vae.config.num_classes, int(np.prod(vae.latent_shape))
    weights = torch.softmax(torch.randn(classes, components, generator=g), dim=1)
    means = 3 * torch.randn(classes, components, dims, generator=g)
    tril = torch.randn(classes, components, dims, dims, generator=g).tril(-1) * 0.2
    tril = tril + torch.diag_embed(torch.rand(classes, components, dims, generator=g) + 0.5)
    vae.set_prior(weights, means, tril)


def tiny_v2_pipeline(components: int = 2, latent_dim: int | None = 8) -> BloodVAEPipeline:
    vae = tiny_vae(latent_dim=latent_dim, backbone="resnet")
    if components:
        random_prior(vae, components)
    return BloodVAEPipeline(vae=vae)


def run(data_dir, out, *extra):
    path = train_vae(["--data-dir", str(data_dir), "--output-dir", str(out), *TINY, *extra])
    AcceleratorState._reset_state(True)
    return path


def public_config(model) -> dict:
    """The config's own keys, as JSON holds them (lists for tuples)."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


# --- the bundled model -------------------------------------------------------------------------------


def test_the_bundled_vae_is_v2_and_samples_as_when_it_was_bundled():
    pipe = load_pipeline("vae")
    assert pipe.vae.config.backbone == "resnet" and pipe.vae.config.prior_components == 4
    assert all(name in dict(pipe.vae.named_buffers()) for name in PRIOR_BUFFERS)
    images = pipe(4, [0, 3, 5, 7], generator=seeded(0, 1, 2, 3), output_type="pt").images
    assert images.double().sum().item() == pytest.approx(V2_FLOAT_SUM, abs=1e-3)
    assert pixel_fingerprint(images) == pytest.approx(V2_FINGERPRINT, abs=2e-3)


def test_new_config_fields_default_to_v1():
    vae = ConditionalAutoencoderKL()
    assert vae.config.backbone == "autoencoder_kl" and vae.config.prior_components == 0
    assert type(vae.encoder).__name__ == "Encoder" and not list(vae.buffers())


# --- the ResNet backbone -----------------------------------------------------------------------------


def test_every_residual_block_of_both_halves_takes_the_class():
    vae = tiny_vae(backbone="resnet")
    for half in (vae.encoder, vae.decoder):
        blocks = [m for m in half.modules() if isinstance(m, ResnetBlock2D)]
        assert len(blocks) >= 4
        for block in blocks:  # FiLM: the class embedding gives each block a scale and a shift per channel
            assert block.time_embedding_norm == "scale_shift"
            assert block.time_emb_proj.in_features == vae.config.class_embed_dim
            assert block.time_emb_proj.out_features == 2 * block.conv2.out_channels
    # that the class changes what both halves compute: test_vae.py's test_conditioning_changes_encoder_and_decoder


def test_bad_model_settings_are_refused():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        ConditionalAutoencoderKL(backbone="vgg")
    with pytest.raises(ValueError, match="prior_components must be an integer >= 0"):
        ConditionalAutoencoderKL(prior_components=-1)
    vae = tiny_vae(backbone="resnet")
    with pytest.raises(ValueError, match=r"needs weights \[C, K\]"):
        vae.set_prior(torch.ones(8, 2) / 2, torch.zeros(8, 2, 5), torch.eye(5).expand(8, 2, 5, 5))
    with pytest.raises(ValueError, match=r"prior is N\(0, I\): it holds no mixture"):
        vae.prior_sample(torch.tensor([0]), torch.randn(1, *vae.latent_shape), torch.rand(1))


# --- saving and loading ------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_dim", [8, None])
def test_round_trip_keeps_the_backbone_and_the_prior(latent_dim, tmp_path):
    pipe = tiny_v2_pipeline(components=3, latent_dim=latent_dim)
    folder = save_pipeline(pipe, tmp_path / "vae")
    config = json.loads((folder / "vae" / "config.json").read_text())
    assert config["backbone"] == "resnet" and config["prior_components"] == 3
    assert set(PRIOR_BUFFERS) <= load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")).keys()
    for loaded in (load_pipeline(str(folder)).vae, ConditionalAutoencoderKL.from_pretrained(folder / "vae")):
        assert public_config(loaded) == public_config(pipe.vae)
        for name in PRIOR_BUFFERS:
            assert torch.equal(getattr(loaded, name), getattr(pipe.vae, name)), name
    kwargs = {"class_labels": [0, 5, 7], "output_type": "np", "temperature": 0.7, "latent_bias": 0.1}
    np.testing.assert_array_equal(
        pipe(3, generator=seeded(1, 2, 3), **kwargs).images,
        load_pipeline(str(folder))(3, generator=seeded(1, 2, 3), **kwargs).images,
    )


def test_remote_code_loads_a_v2_pipeline_without_bloodgen_hf(tmp_path):
    """Plain save_pretrained, then DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) in an interpreter
    without bloodgen_hf: the same images from the mixture prior, and the same layout saved again."""
    pipe = tiny_v2_pipeline(components=2)
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    out = tmp_path / "images"
    job = {"source": str(folder), "out": str(out), "call": {}, "resave": str(tmp_path / "re")}
    run_without_bloodgen_hf(tmp_path, {"jobs": [job], "threads": torch.get_num_threads()})
    expected = reference_images(pipe)
    assert len(SEEDS) == len(LABELS) == expected.shape[0]
    np.testing.assert_array_equal(np.load(f"{out}.npy"), expected)
    np.testing.assert_array_equal(np.load(f"{out}-resaved.npy"), expected)


# --- the prior fit -----------------------------------------------------------------------------------


def clustered_latents(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 5-d points: class 0 one Gaussian, class 1 three far-apart clusters of 60, 90 and 150."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(200, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2, 0.5, 1, 3]) + 1
    centres = torch.tensor([[-20.0] * 5, [0.0] * 5, [20.0] * 5], dtype=torch.float64)
    second = torch.cat(
        [centres[k] + torch.randn(n, 5, generator=g, dtype=torch.float64) for k, n in enumerate((60, 90, 150))]
    )
    labels = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(300, dtype=torch.long)])
    return torch.cat([first, second]), labels


def test_one_component_is_the_class_mean_and_covariance():
    latents, labels = clustered_latents()
    weights, means, tril = fit_class_mixtures(latents, labels, ["a", "b"], 1, 50, seed=0)
    assert weights.shape == (2, 1) and means.shape == (2, 1, 5) and tril.shape == (2, 1, 5, 5)
    torch.testing.assert_close(weights, torch.ones(2, 1, dtype=torch.float64))
    for c in (0, 1):
        points = latents[labels == c]
        torch.testing.assert_close(means[c, 0], points.mean(dim=0))
        covariance = tril[c, 0] @ tril[c, 0].T
        torch.testing.assert_close(covariance, torch.cov(points.T, correction=0) + PRIOR_REG * torch.eye(5))
        torch.testing.assert_close(covariance.diagonal(), points.var(dim=0, correction=0) + PRIOR_REG)


def test_a_mixture_matches_the_class_moments_and_finds_its_clusters():
    latents, labels = clustered_latents()
    weights, means, tril = fit_class_mixtures(latents, labels, ["a", "b"], 3, 100, seed=0)
    for c in (0, 1):  # after an M-step the mixture's mean and covariance are the data's, whatever the fit
        points = latents[labels == c]
        mixture_mean = (weights[c, :, None] * means[c]).sum(dim=0)
        second_moment = (
            weights[c, :, None, None]
            * (tril[c] @ tril[c].transpose(1, 2) + means[c, :, :, None] * means[c, :, None, :])
        ).sum(0)
        torch.testing.assert_close(mixture_mean, points.mean(dim=0))
        torch.testing.assert_close(
            second_moment - mixture_mean[:, None] * mixture_mean[None],
            torch.cov(points.T, correction=0) + PRIOR_REG * torch.eye(5, dtype=torch.float64),
        )
    order = means[1, :, 0].argsort()
    torch.testing.assert_close(weights[1, order], torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        means[1, order, 0], torch.tensor([-20.0, 0.0, 20.0], dtype=torch.float64), atol=0.3, rtol=0
    )
    again = fit_class_mixtures(latents, labels, ["a", "b"], 3, 100, seed=0)
    assert all(torch.equal(a, b) for a, b in zip((weights, means, tril), again))  # seeded: the same fit


def test_a_class_with_fewer_images_than_components_is_refused():
    latents, labels = clustered_latents()
    with pytest.raises(ValueError, match="class 'a' has 2 training images, fewer than --prior-components 3"):
        fit_class_mixtures(latents[198:], labels[198:], ["a", "b"], 3, 10, seed=0)


def test_fit_prior_on_a_tiny_vae_holds_the_posterior_means_statistics(tmp_path):
    data = load_data("bloodmnist", "train", 28, write_fake_bloodmnist(tmp_path / "data"))
    dataset = LabelledImages(data.images, data.labels)
    vae = tiny_vae(backbone="resnet")
    fit_prior(vae, dataset, components=1, iterations=10, seed=0)
    assert vae.config.prior_components == 1
    latents = posterior_means(vae, dataset.images, dataset.labels)
    for c in range(8):
        points = latents[dataset.labels == c]
        torch.testing.assert_close(vae.prior_means[c, 0].double(), points.mean(dim=0), rtol=1e-5, atol=1e-6)
        variance = (vae.prior_scale_tril[c, 0] @ vae.prior_scale_tril[c, 0].T).diagonal().double()
        torch.testing.assert_close(variance, points.var(dim=0, correction=0) + PRIOR_REG, rtol=1e-4, atol=1e-6)


# --- sampling from the prior -------------------------------------------------------------------------


def test_temperature_zero_decodes_the_component_means():
    pipe = tiny_v2_pipeline(components=2)
    labels = torch.tensor([0, 3, 3, 7, 7, 7])
    z = pipe.prior_latents(6, seeded(*range(6)), temperature=0.0, class_labels=labels).flatten(1)
    picked = []
    for i, c in enumerate(labels):  # each z is exactly one of its class's component means
        matches = [k for k in range(2) if torch.equal(z[i], pipe.vae.prior_means[c, k])]
        assert len(matches) == 1, i
        picked.append(matches[0])
    images = pipe(6, labels.tolist(), generator=seeded(*range(6)), temperature=0.0, output_type="pt").images
    means = pipe.vae.prior_means[labels, torch.tensor(picked)].view(6, *pipe.vae.latent_shape)
    expected = ((pipe.vae.decode(means, labels).sample.clamp(-1, 1) + 1) / 2).detach()
    torch.testing.assert_close(images, expected)


def test_temperature_scales_the_deviation_and_latent_bias_shifts_it():
    pipe = tiny_v2_pipeline(components=2)
    labels = torch.tensor([1, 4, 6])
    draw = lambda **kw: pipe.prior_latents(3, seeded(5, 6, 7), class_labels=labels, **kw)  # noqa: E731
    mean = draw(temperature=0.0)
    torch.testing.assert_close(draw(temperature=0.5) - mean, 0.5 * (draw(temperature=1.0) - mean))
    torch.testing.assert_close(draw(temperature=0.8, latent_bias=0.7), draw(temperature=0.8) + 0.7)
    assert (draw(temperature=1.0) - mean).abs().max() > 0.1
    with pytest.raises(ValueError, match="pass the class_labels"):
        pipe.prior_latents(3, seeded(5, 6, 7))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        pipe(1, temperature=-0.5)


def test_components_follow_their_weights_and_each_image_its_own_generator():
    pipe = tiny_v2_pipeline(components=2)
    weights = torch.tensor([[0.9, 0.1]]).expand(8, -1)
    pipe.vae.set_prior(weights, pipe.vae.prior_means, pipe.vae.prior_scale_tril)
    labels = torch.full((400,), 2)
    z = pipe.prior_latents(400, torch.Generator().manual_seed(0), temperature=0.0, class_labels=labels).flatten(1)
    share = (z == pipe.vae.prior_means[2, 0]).all(dim=1).float().mean().item()
    assert 0.85 < share < 0.95
    batch = pipe.prior_latents(3, seeded(10, 11, 12), class_labels=torch.tensor([0, 4, 7]))
    alone = pipe.prior_latents(1, seeded(11), class_labels=torch.tensor([4]))
    assert torch.equal(batch[1], alone[0])


def test_image_to_image_works_on_a_v2_vae():
    pipe = tiny_v2_pipeline(components=2)
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    classes = pipe.classify(x)
    assert classes.shape == (2,) and 0 <= int(classes.min()) and int(classes.max()) < 8
    recon = pipe.reconstruct(x[:1], class_labels=3, output_type="pt").images
    assert recon.shape == (1, 3, 28, 28)
    # variations sample around the posterior, not the prior: temperature 0 is the reconstruction
    still = pipe.variations(x[:1], 3, class_label=3, temperature=0.0, generator=seeded(1, 2, 3), output_type="pt")
    torch.testing.assert_close(still.images, recon.expand(3, -1, -1, -1))
    varied = pipe.variations(x[:1], 2, class_label=3, generator=seeded(1, 2), output_type="pt").images
    assert (varied[0] - varied[1]).abs().max() > 1e-4
    # between two classes: each end is that class's prior draw from the same noise
    path = pipe.interpolate("basophil", 7, num_steps=4, generator=torch.Generator().manual_seed(3), output_type="pt")
    for end, c in ((0, 0), (-1, 7)):
        alone = pipe(1, c, generator=torch.Generator().manual_seed(3), output_type="pt").images[0]
        torch.testing.assert_close(path.images[end], alone)
    between_images = pipe.interpolate(x[:1], x[1:], num_steps=3, output_type="pt").images
    torch.testing.assert_close(between_images[0], pipe.reconstruct(x[:1], output_type="pt").images[0])


def test_conditional_reconstructions_are_the_pipelines_with_each_images_class():
    pipe = tiny_v2_pipeline(components=2)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)
    labels = np.array([0, 3, 3, 7, 1])
    ours = reconstruct_conditional(pipe, images, labels, batch_size=2)  # batches must not matter
    theirs = pipe.reconstruct(images, class_labels=labels.tolist(), output_type="np").images
    assert ours.shape == images.shape and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - np.round(theirs * 255).astype(int)).max() <= 1
    other = reconstruct_conditional(pipe, images, (labels + 1) % 8)
    assert (other != ours).any()  # the class is used
    with pytest.raises(UsageError, match="5 images but 4 labels"):
        reconstruct_conditional(pipe, images, labels[:4])


def test_the_reconstruction_report_takes_a_conditional_vae_pipeline(fake_data_dir, tmp_path):
    """benchmarks/autoencoder_report.py on a saved VAE pipeline folder: its test split through each image's class."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import autoencoder_report

    folder = save_pipeline(tiny_v2_pipeline(components=2), tmp_path / "vae")
    out = tmp_path / "report"
    autoencoder_report.main(["--autoencoders", f"v2={folder}", "--data-dir", str(fake_data_dir), "--out", str(out)])
    row = json.loads((out / "results.json").read_text())["rows"][0]
    test = load_data("bloodmnist", "test", 28, fake_data_dir)
    expected = reconstruct_conditional(load_pipeline(str(folder)), test.images, test.labels)
    assert row["label"] == "v2" and row["resolution"] == 28 and row["num_images"] == len(test.images)
    assert row["psnr"] == pytest.approx(quality(test.images, expected)["psnr"])
    with pytest.raises(SystemExit, match="gan is a BloodGANPipeline, not a class-conditional VAE pipeline"):
        autoencoder_report.main(["--autoencoders", "g=gan", "--data-dir", str(fake_data_dir), "--out", str(out)])


# --- training ----------------------------------------------------------------------------------------


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in ("vae", "discriminator", "training_state"):
        tensors.update({f"{name}.{k}": v for k, v in load_file(str(folder / f"{name}.safetensors")).items()})
    return tensors


def test_v2_training_with_the_adversarial_term_resumes_exactly(fake_data_dir, tmp_path):
    # 80 images / batch 16 = 5 steps per epoch; the adversarial term is on from step 2, so the discriminator and
    # its optimizer have moved before the checkpoint at step 3, and the resumed run must restore them.
    common = [*V2, *ADVERSARIAL, "--checkpoint-every", "3", "--keep-checkpoints", "5", "--kl-warmup-steps", "5"]
    run(fake_data_dir, tmp_path / "full", "--max-steps", "7", *common)
    run(fake_data_dir, tmp_path / "split", "--max-steps", "3", *common)
    run(fake_data_dir, tmp_path / "split", "--max-steps", "7", "--resume", "latest", *common)
    full, split = (tmp_path / name / "checkpoints" / "checkpoint-0000007" for name in ("full", "split"))
    a, b = checkpoint_tensors(full), checkpoint_tensors(split)
    assert a.keys() == b.keys() and any(k.startswith("discriminator.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "training_state.json").read_text() == (split / "training_state.json").read_text()
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert "loss_adv" not in records[0] and {"loss_adv", "adv_weight", "loss_d"} <= records[1].keys()
    for r in records[1:]:
        assert r["loss"] == pytest.approx(
            r["loss_recon"] + r["beta"] * r["loss_kl"] + r["adv_weight"] * r["loss_adv"], rel=1e-4
        )
    # every new flag is recorded, and the saved model is the v2 model with its prior fitted at the end
    extra = json.loads((tmp_path / "full" / "train_config.json").read_text())["extra"]
    assert (
        extra
        | {
            "backbone": "resnet",
            "prior_components": 2,
            "prior_iterations": 20,
            "adv_weight": 0.5,
            "adv_start": 1,
            "adv_weight_mode": "adaptive",
            "disc_channels": 8,
            "disc_layers": 2,
            "lr_d": 0.001,
            "fit_prior": None,
        }
        == extra
    )
    pipe = load_pipeline(str(tmp_path / "full" / "pipeline"))
    assert pipe.vae.config.backbone == "resnet" and pipe.vae.config.prior_components == 2
    assert "discriminator" not in pipe.components
    assert not torch.equal(pipe.vae.prior_means, torch.zeros_like(pipe.vae.prior_means))  # fitted, not the start
    assert torch.equal(pipe.vae.prior_means, load_pipeline(str(tmp_path / "split" / "pipeline")).vae.prior_means)


def test_fit_prior_refits_a_saved_vae_on_the_train_split(fake_data_dir, tmp_path):
    source = save_pipeline(BloodVAEPipeline(vae=tiny_vae(backbone="resnet")), tmp_path / "source")
    out = tmp_path / "refit"
    args = ["--fit-prior", str(source), "--prior-components", "1", "--split", "train"]
    folder = run(fake_data_dir, out, *args)
    assert folder == out / "pipeline" and not (out / "checkpoints").exists()
    pipe = load_pipeline(str(folder))
    data = load_data("bloodmnist", "train", 28, fake_data_dir)
    latents = posterior_means(pipe.vae, torch.from_numpy(data.images), torch.from_numpy(data.labels))
    for c in range(8):
        expected = latents[torch.from_numpy(data.labels) == c].mean(dim=0)
        torch.testing.assert_close(pipe.vae.prior_means[c, 0].double(), expected, rtol=1e-5, atol=1e-6)
    provenance = pipe.config.provenance
    assert provenance["split"] == "train" and provenance["num_images"] == 48
    assert provenance["init_from"]["model"].startswith("source@sha256:")  # a folder outside the repo: name + hash
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        run(fake_data_dir, out, *args)
    run(fake_data_dir, out, *args, "--overwrite", "--prior-components", "2")
    assert load_pipeline(str(folder)).vae.config.prior_components == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prior-components", "-1"], "--prior-components must be >= 0, got -1"),
        (["--prior-iterations", "0"], "--prior-iterations must be at least 1, got 0"),
        (["--adv-weight", "-0.5"], "--adv-weight must be >= 0, got -0.5"),
        (["--adv-start", "-1"], "--adv-start must be >= 0, got -1"),
        (["--lr-d", "0"], "--lr-d must be > 0, got 0.0"),
        (["--adv-weight", "1", "--disc-layers", "4"], "--disc-layers 4 and --disc-channels 32 leave no patch"),
        (["--prior-components", "9"], "has 6 training images, fewer than --prior-components 9"),
        (["--fit-prior", "vae"], "--fit-prior needs --prior-components K >= 1"),
        (["--fit-prior", "missing-model", "--prior-components", "1"], "missing-model"),
    ],
)
def test_bad_v2_options_are_one_clear_error(extra, message, fake_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match=message) as raised:
        run(fake_data_dir, tmp_path / "bad", "--max-steps", "1", "--split", "train", *extra)
    assert raised.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # refused before training: no progress bar either


def test_fit_prior_refuses_a_model_that_is_no_vae(fake_data_dir, tmp_path, capsys):
    gan = save_pipeline(tiny_gan_pipeline(), tmp_path / "gan")
    with pytest.raises(SystemExit, match="is a BloodGANPipeline, not a VAE pipeline"):
        run(fake_data_dir, tmp_path / "bad", "--fit-prior", str(gan), "--prior-components", "1")


def test_an_unknown_backbone_is_refused_by_the_parser(fake_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        run(fake_data_dir, tmp_path / "bad", "--backbone", "vgg")
    assert raised.value.code == 2 and "invalid choice: 'vgg'" in capsys.readouterr().err


def test_cli_sample_takes_temperature_and_latent_bias_for_a_v2_vae(tmp_path):
    folder = save_pipeline(tiny_v2_pipeline(components=2), tmp_path / "v2")
    out = tmp_path / "samples.npz"
    args = ["sample", "--n", "4", "--model", str(folder), "--temperature", "0.5", "--latent-bias", "0.2"]
    result = CliRunner().invoke(app, [*args, "--format", "npz", "--out", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    saved = np.load(out)
    pipe = load_pipeline(str(folder))
    labels = saved["labels"].tolist()
    expected = pipe(4, labels, generator=seeded(3, 4, 5, 6), temperature=0.5, latent_bias=0.2, output_type="np").images
    assert np.abs(saved["images"].astype(int) - (expected * 255).round().astype(int)).max() <= 1
    result = CliRunner().invoke(app, [*args[:5], "--temperature", "-1", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and result.output.count("error:") == 1  # after the progress bar's first frame
    assert result.output.splitlines()[-1] == "error: temperature must be >= 0, got -1.0"
