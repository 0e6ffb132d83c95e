"""Feature extractors: where Inception weights come from (and the one-line error when they can't),
clean-fid's loading path on a stand-in TorchScript file, BloodNet's model, loading and training."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from bloodgen_hf.data import CLASS_NAMES
from bloodgen_hf.evaluation import features as F
from bloodgen_hf.evaluation.bloodnet import BloodNet, predict
from bloodgen_hf.registry import WEIGHTS_NAME


class StandInInception(torch.nn.Module):
    """Has what clean-fid's InceptionV3W uses of the real file: `layers` giving [N, 2048, 1, 1] and `output`."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 23, stride=23), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(4, 2048, 1)
        )
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture
def stand_in_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / F.INCEPTION_FILE
    torch.jit.script(StandInInception()).save(str(path))
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path: Path):
    """No cached copy in clean-fid's folder, and clean-fid's download fails as it does without internet."""
    import cleanfid.downloads_helper

    def no_network(fpath="./"):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(F, "CLEANFID_DOWNLOAD_DIR", tmp_path / "cleanfid")
    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", no_network)
    monkeypatch.delenv(F.INCEPTION_ENV, raising=False)


def test_missing_inception_weights_give_one_line_with_both_ways_out(offline):
    with pytest.raises(F.MissingWeightsError) as err:
        F.resolve_inception_weights(None)
    message = str(err.value)
    assert "\n" not in message
    assert "download failed" in message and "name resolution" in message
    assert "--inception-weights" in message and F.INCEPTION_ENV in message
    assert "--extractor bloodnet" in message


def test_a_named_path_that_does_not_exist_is_reported(offline, tmp_path):
    with pytest.raises(F.MissingWeightsError, match="nowhere.pt does not exist"):
        F.resolve_inception_weights(tmp_path / "nowhere.pt")


def test_weights_come_from_the_flag_the_env_var_or_clean_fids_folder(offline, monkeypatch, stand_in_weights):
    assert F.resolve_inception_weights(stand_in_weights) == stand_in_weights
    assert F.resolve_inception_weights(stand_in_weights.parent) == stand_in_weights  # a folder holding it
    monkeypatch.setenv(F.INCEPTION_ENV, str(stand_in_weights))
    assert F.resolve_inception_weights(None) == stand_in_weights
    monkeypatch.delenv(F.INCEPTION_ENV)
    F.CLEANFID_DOWNLOAD_DIR.mkdir()
    (F.CLEANFID_DOWNLOAD_DIR / F.INCEPTION_FILE).write_bytes(stand_in_weights.read_bytes())
    assert F.resolve_inception_weights(None) == F.CLEANFID_DOWNLOAD_DIR / F.INCEPTION_FILE


def test_a_failed_download_leaves_no_partial_file(monkeypatch, tmp_path):
    import cleanfid.downloads_helper

    def half_written(fpath="./"):
        (Path(fpath) / F.INCEPTION_FILE).write_bytes(b"partial")
        raise TimeoutError("timed out")

    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", half_written)
    with pytest.raises(F.MissingWeightsError, match="timed out"):
        F.download_inception(tmp_path)
    assert not (tmp_path / F.INCEPTION_FILE).exists()


def test_inception_extractor_follows_clean_fid_on_a_stand_in_file(stand_in_weights):
    from cleanfid.resize import build_resizer

    extractor = F.InceptionExtractor(stand_in_weights, "cpu", batch_size=2)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28, 3), dtype=np.uint8)
    out = extractor.extract(images, progress=False)
    assert out.features.shape == (3, 2048) and out.probs.shape == (3, 1008)
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, rtol=1e-5)
    # clean mode by hand: PIL-bicubic resize to 299, (x - 128) / 128, layers; softmax without output bias
    model = torch.jit.load(str(stand_in_weights))
    resized = torch.stack([torch.from_numpy(build_resizer("clean")(im).transpose(2, 0, 1).copy()) for im in images])
    with torch.no_grad():
        expected = model.layers((resized - 128) / 128).flatten(1)
        probs = torch.softmax(expected @ model.output.weight.T, dim=1)
    np.testing.assert_allclose(out.features, expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.probs, probs.numpy(), rtol=1e-4, atol=1e-6)
    assert extractor.identity.endswith(F.file_sha256(stand_in_weights))


def test_a_file_that_is_not_the_inception_torchscript_is_named(tmp_path):
    bad = tmp_path / "inception.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(F.MissingWeightsError, match="inception.pt is not clean-fid's Inception"):
        F.InceptionExtractor(bad)


def test_unknown_extractor_name():
    with pytest.raises(ValueError, match="unknown --extractor 'clip'"):
        F.build_extractor("clip")


# --- BloodNet --------------------------------------------------------------------------------------


def tiny_bloodnet(seed: int = 0) -> BloodNet:
    torch.manual_seed(seed)
    return BloodNet(channels=[4, 8], blocks_per_stage=1, class_names=list(CLASS_NAMES))


def test_bloodnet_features_logits_and_resizing():
    model = tiny_bloodnet().eval()
    images28 = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28, 3), dtype=np.uint8)
    features, logits = predict(model, images28, batch_size=2)
    assert features.shape == (5, 8) and logits.shape == (5, 8)
    images64 = images28.repeat(2, axis=1).repeat(2, axis=2).astype(np.uint8)
    assert model.prepare(images64).shape == (5, 3, 28, 28)
    assert predict(model, images28, with_features=False)[0] is None


def test_bloodnet_round_trip_through_the_hub_loader(tmp_path):
    model = tiny_bloodnet()
    model.save_pretrained(tmp_path / "bn" / "classifier")
    extractor = F.BloodNetExtractor.load(tmp_path / "bn")
    images = np.random.default_rng(1).integers(0, 256, size=(4, 28, 28, 3), dtype=np.uint8)
    np.testing.assert_allclose(extractor.extract(images, progress=False).features, predict(model.eval(), images)[0])
    assert extractor.classify(images).shape == (4,)
    assert extractor.identity == "bloodnet:" + F.file_sha256(tmp_path / "bn" / "classifier" / WEIGHTS_NAME)


def test_missing_bloodnet_says_how_to_train_it(tmp_path):
    with pytest.raises(F.MissingWeightsError, match="train_bloodnet.py"):
        F.resolve_bloodnet(tmp_path / "absent")


@pytest.mark.parametrize(("resolution", "folder"), [(None, "bloodnet"), (28, "bloodnet"), (64, "bloodnet-64")])
def test_the_bundled_bloodnet_is_the_one_of_the_scored_size(resolution, folder, monkeypatch):
    from bloodgen_hf.evaluation.bloodnet import BLOODNET_ENV
    from bloodgen_hf.registry import BUNDLED_DIR

    monkeypatch.delenv(BLOODNET_ENV, raising=False)
    found = F.resolve_bloodnet(resolution=resolution)
    assert found == BUNDLED_DIR / folder / "classifier"
    assert json.loads((found / "config.json").read_text())["resolution"] == (resolution or 28)
    assert (found.parent / "test_metrics.json").is_file()


def test_the_bundled_64px_bloodnet_loads_at_64px(monkeypatch):
    from bloodgen_hf.evaluation.bloodnet import BLOODNET_ENV

    monkeypatch.delenv(BLOODNET_ENV, raising=False)
    extractor = F.build_extractor("bloodnet", resolution=64)
    assert extractor.resolution == 64 and extractor.folder.parent.name == "bloodnet-64"
    assert extractor.class_names == CLASS_NAMES


def test_a_named_bloodnet_wins_over_the_bundled_one_of_the_size(tmp_path, monkeypatch):
    from bloodgen_hf.evaluation.bloodnet import BLOODNET_ENV

    tiny_bloodnet().save_pretrained(tmp_path / "bn" / "classifier")  # 28 px, named for 64 px scoring
    monkeypatch.delenv(BLOODNET_ENV, raising=False)
    assert F.resolve_bloodnet(tmp_path / "bn", resolution=64) == tmp_path / "bn" / "classifier"
    monkeypatch.setenv(BLOODNET_ENV, str(tmp_path / "bn"))
    assert F.resolve_bloodnet(resolution=64) == tmp_path / "bn" / "classifier"


def test_a_size_with_no_bundled_bloodnet_says_to_pass_one(monkeypatch):
    from bloodgen_hf.evaluation.bloodnet import BLOODNET_ENV

    monkeypatch.delenv(BLOODNET_ENV, raising=False)
    with pytest.raises(F.MissingWeightsError) as err:
        F.BloodNetExtractor.load(resolution=128)
    message = str(err.value)
    assert message.startswith("no bundled BloodNet for 128 px: pass --bloodnet PATH") and "\n" not in message
    assert "bloodgen-hf train bloodnet --resolution 128" in message


def test_corrupt_bloodnet_weights_are_named(tmp_path):
    from bloodgen_hf.registry import ModelLoadError

    tiny_bloodnet().save_pretrained(tmp_path / "bn")
    (tmp_path / "bn" / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors"):
        F.BloodNetExtractor.load(tmp_path / "bn")


def test_train_bloodnet_script_trains_saves_and_scores(fake_data_dir, tmp_path, capsys):
    from bloodgen_hf.evaluation.bloodnet_train import main

    out = tmp_path / "run"
    args = ["--data-dir", str(fake_data_dir), "--output-dir", str(out), "--batch-size", "16", "--epochs", "2"]
    folder = main([*args, "--channels", "4,8", "--blocks-per-stage", "1", "--log-with", "none", "--log-every", "1"])
    assert (folder / "classifier" / "config.json").is_file()
    report = json.loads((folder / "test_metrics.json").read_text())
    assert report["split"] == "test" and report["num_images"] == 16
    assert np.asarray(report["confusion"]).sum() == 16
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "holdout_accuracy" in rows[-1]  # scored on val after the first epoch
    assert len(list((out / "samples").glob("epoch_*.png"))) == 2
    assert "test accuracy" in capsys.readouterr().out
    model, _ = F.load_bloodnet(folder)
    assert model.config.channels == [4, 8]


def test_train_bloodnet_refuses_other_splits(fake_data_dir, tmp_path):
    from bloodgen_hf.evaluation.bloodnet_train import main

    with pytest.raises(SystemExit, match="train it on --split train"):
        main(["--data-dir", str(fake_data_dir), "--output-dir", str(tmp_path / "x"), "--split", "all"])


@pytest.mark.parametrize(
    ("channels", "reason"),
    [("8;16", "takes comma-separated integers such as 32,64,64; got '8;16'"), ("8,0", "must be positive, got '8,0'")],
)
def test_train_bloodnet_refuses_bad_channels_in_one_error_line(channels, reason, tmp_path, capsys):
    """--channels is parsed by argparse (the shared options.channel_widths): its error line names the flag once."""
    from bloodgen_hf.evaluation.bloodnet_train import main

    with pytest.raises(SystemExit) as exited:
        main(["--output-dir", str(tmp_path / "x"), "--channels", channels], prog="train_bloodnet.py")
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and not (tmp_path / "x").exists()
    assert last_line == f"train_bloodnet.py: error: argument --channels: {reason}"


def test_bundled_bloodnet_classifies_real_test_images(real_data_dir):
    """The bundled classifier is what the domain metrics stand on: it must recognise real held-out cells."""
    from bloodgen_hf.data import load_arrays

    images, labels = load_arrays("test", 28, real_data_dir)
    pick = np.random.default_rng(0).choice(len(labels), 1024, replace=False)
    extractor = F.BloodNetExtractor.load(None)
    predicted = extractor.classify(images[pick])
    assert (predicted == labels[pick]).mean() >= 0.95
    assert extractor.identity.startswith("bloodnet:") and extractor.model.feature_dim == 96
