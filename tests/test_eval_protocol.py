"""The protocol's bookkeeping and the real-feature cache, with a small injected feature extractor."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from bloodgen_hf.data import CLASS_NAMES
from bloodgen_hf.evaluation import cache as C
from bloodgen_hf.evaluation.features import FeatureExtractor, Features
from bloodgen_hf.evaluation.protocol import (
    METRICS,
    Protocol,
    RealData,
    evaluate,
    metric_names,
    parse_metrics,
    summarize,
)
from tests.conftest import tiny_gan_pipeline


class TinyExtractor(FeatureExtractor):
    """Mean colours of a 7x7 grid of patches through a fixed random projection; its first 8 outputs
    double as class logits. Counts how many images it was asked for."""

    name = "tiny"
    has_probs = True

    def __init__(self, seed: int = 0):
        self.projection = np.random.default_rng(seed).normal(size=(7 * 7 * 3, 12)).astype(np.float32)
        self.identity = "tiny:" + hashlib.sha256(self.projection.tobytes()).hexdigest()
        self.calls: list[int] = []

    def extract(self, images, progress=True, desc="tiny") -> Features:
        self.calls.append(len(images))
        n, h = len(images), images.shape[1]
        pooled = images.reshape(n, 7, h // 7, 7, h // 7, 3).mean(axis=(2, 4)).reshape(n, -1) / 255.0
        features = pooled.astype(np.float32) @ self.projection
        logits = features[:, :8] - features[:, :8].max(axis=1, keepdims=True)
        return Features(features, (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32))

    def classify(self, images):
        return self.extract(images).probs.argmax(axis=1)


@pytest.fixture
def real(fake_data_dir):
    return RealData.load("all", 28, fake_data_dir)


def small_protocol(**changes) -> Protocol:
    values = dict(runs=3, n=20, nearest_k=3, kid_subsets=5, is_splits=2, memorization_calibration=40, batch_size=8)
    return Protocol(**{**values, **changes})


def test_real_data_marks_the_test_split_as_held_out(real):
    assert len(real.labels) == 80 and real.held_out.sum() == 16
    assert real.held_out[-16:].all()  # splits in order train, val, test


def test_protocol_runs_seeds_and_sizes(real, tmp_path):
    extractor = TinyExtractor()
    evaluation = evaluate(
        tiny_gan_pipeline(), extractor, real, small_protocol(), classifier=extractor, cache_dir=tmp_path, progress=False
    )
    results = evaluation.results
    assert [run["seed"] for run in results["runs"]] == [0, 1, 2]
    assert len({run["gen_seed"] for run in results["runs"]}) == 3
    assert results["protocol"]["seeds"] == [0, 1, 2] and results["protocol"]["floor_n"] == 20
    # one extraction of all 80 real images (then cached), and n generated images per run
    assert extractor.calls == [80, 20, 20, 20]
    fid = results["metrics"]["fd_tiny"]
    assert fid == summarize([run["metrics"]["fd_tiny"] for run in results["runs"]])
    assert fid["std"] == pytest.approx(np.std(fid["runs"], ddof=1))
    assert len(set(fid["runs"])) == 3  # different real draws and different generated images
    for key in ("fd_tiny", "kid_tiny", "is_tiny", "precision_tiny", "coverage_tiny", "one_nn_accuracy_tiny"):
        assert key in results["metrics"] and key in results["floor"], key
    assert {"memorization", "class_accuracy", "class_fd_tiny"} <= set(results["metrics"])
    assert set(results["per_class"]["class_accuracy"]) <= set(CLASS_NAMES)
    assert evaluation.memorization_pairs is not None and evaluation.memorization_pairs.dtype == np.uint8


def test_an_interrupted_evaluation_goes_on_from_its_kept_runs(real, tmp_path, monkeypatch):
    from bloodgen_hf.evaluation import protocol as P

    extractor, protocol = TinyExtractor(), small_protocol(runs=3, metrics=("fd", "memorization"), with_floor=False)
    whole = evaluate(tiny_gan_pipeline(), extractor, real, protocol, cache_dir=tmp_path, progress=False)
    generated, real_sample, stop = [], P.generated_sample, {"at_run_2": True}

    def stops_at_run_2(pipe, extractor, protocol, gen_seed, *args):
        if gen_seed == 2 * P.GEN_SEED_STRIDE and stop["at_run_2"]:
            raise KeyboardInterrupt
        generated.append(gen_seed)
        return real_sample(pipe, extractor, protocol, gen_seed, *args)

    monkeypatch.setattr(P, "generated_sample", stops_at_run_2)
    kept = tmp_path / "kept"
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_gan_pipeline(), extractor, real, protocol, cache_dir=tmp_path, progress=False, resume_dir=kept)
    assert sorted(p.name for p in kept.iterdir()) == ["pairs.npy", "run_0.json", "run_1.json"]
    stop["at_run_2"] = False
    resumed = evaluate(
        tiny_gan_pipeline(), extractor, real, protocol, cache_dir=tmp_path, progress=False, resume_dir=kept
    )
    assert generated[-1] == 2 * P.GEN_SEED_STRIDE and generated.count(0) == 1  # only run 2 was generated again
    assert resumed.results["metrics"] == whole.results["metrics"]
    assert np.array_equal(resumed.memorization_pairs, whole.memorization_pairs)
    # other weights or another protocol never take the kept runs
    other = evaluate(
        tiny_gan_pipeline(seed=1), extractor, real, protocol, cache_dir=tmp_path, progress=False, resume_dir=kept
    )
    assert other.results["model_sha256"] != whole.results["model_sha256"] and generated.count(0) == 2
    assert other.results["metrics"] != whole.results["metrics"]


def test_real_draws_differ_between_runs_and_repeat_for_a_seed(real, tmp_path):
    extractor = TinyExtractor()
    protocol = small_protocol(runs=2, metrics=("fd",), with_floor=False)
    first = evaluate(tiny_gan_pipeline(), extractor, real, protocol, cache_dir=tmp_path, progress=False).results
    again = evaluate(tiny_gan_pipeline(), extractor, real, protocol, cache_dir=tmp_path, progress=False).results
    assert first["metrics"]["fd_tiny"]["runs"] == again["metrics"]["fd_tiny"]["runs"]
    shifted = evaluate(
        tiny_gan_pipeline(),
        extractor,
        real,
        small_protocol(runs=2, seed=1, metrics=("fd",), with_floor=False),
        cache_dir=tmp_path,
        progress=False,
    ).results
    assert shifted["metrics"]["fd_tiny"]["runs"][0] == pytest.approx(first["metrics"]["fd_tiny"]["runs"][1])


def test_floor_uses_disjoint_halves_capped_at_half_the_data(real, tmp_path):
    results = evaluate(
        tiny_gan_pipeline(),
        TinyExtractor(),
        real,
        small_protocol(runs=1, n=60, metrics=("fd", "1nn")),
        cache_dir=tmp_path,
        progress=False,
    ).results
    assert results["protocol"]["floor_n"] == 40  # 80 real images: two disjoint halves of 40
    assert 0 <= results["floor"]["one_nn_accuracy_tiny"]["mean"] <= 1


def test_only_the_chosen_metrics_are_computed(real, tmp_path):
    results = evaluate(
        tiny_gan_pipeline(),
        TinyExtractor(),
        real,
        small_protocol(runs=1, metrics=("kid", "pr")),
        cache_dir=tmp_path,
        progress=False,
    ).results
    assert set(results["metrics"]) == {"kid_tiny", "precision_tiny", "recall_tiny"}


def test_protocol_refuses_impossible_settings(real, tmp_path):
    gan, extractor = tiny_gan_pipeline(), TinyExtractor()
    with pytest.raises(ValueError, match="--n must be between 2 and the 80 real images"):
        evaluate(gan, extractor, real, small_protocol(n=81), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="--runs must be at least 1"):
        evaluate(gan, extractor, real, small_protocol(runs=0), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="'accuracy' needs the BloodNet classifier"):
        evaluate(gan, extractor, real, small_protocol(metrics=("accuracy",)), cache_dir=tmp_path)
    assert extractor.calls == []  # refused before any work


def test_metric_names_never_call_other_features_fid():
    assert metric_names("inception")["fd"] == "fid" and metric_names("inception")["kid"] == "kid"
    assert metric_names("bloodnet")["fd"] == "fd_bloodnet" and metric_names("bloodnet")["is"] == "is_bloodnet"


def test_parse_metrics():
    assert parse_metrics(None) == METRICS
    assert parse_metrics(["fid,kid", "1nn"]) == ("fd", "kid", "1nn")
    assert parse_metrics(["prdc"]) == ("pr", "dc")
    with pytest.raises(ValueError, match="unknown metric 'lpips'"):
        parse_metrics(["lpips"])


# --- the real-feature cache --------------------------------------------------------------------------


def cached(extractor, images, tmp_path, split="all"):
    return C.cached_features(
        extractor,
        images,
        dataset="bloodmnist",
        size=28,
        split=split,
        cache_dir=tmp_path,
        progress=False,
        log=lambda m: None,
    )


def test_cache_is_read_back_instead_of_recomputed(real, tmp_path):
    extractor = TinyExtractor()
    first = cached(extractor, real.images, tmp_path)
    second = cached(extractor, real.images, tmp_path)
    assert extractor.calls == [80]
    np.testing.assert_array_equal(first.features, second.features)
    np.testing.assert_array_equal(first.probs, second.probs)


def test_cache_is_invalidated_when_the_extractor_changes(real, tmp_path):
    old, new = TinyExtractor(seed=0), TinyExtractor(seed=1)  # same name, new weights
    old_features = cached(old, real.images, tmp_path)
    new_features = cached(new, real.images, tmp_path)
    assert new.calls == [80]
    assert not np.allclose(old_features.features, new_features.features)
    assert len(list(tmp_path.glob("bloodmnist-28px-all-tiny-*.npz"))) == 1  # the stale entry is gone
    cached(old, real.images, tmp_path)
    assert old.calls == [80, 80]


def test_cache_keys_include_split_and_data(real, tmp_path):
    extractor = TinyExtractor()
    cached(extractor, real.images, tmp_path)
    cached(extractor, real.images[:40], tmp_path, split="train")
    changed = real.images.copy()
    changed[0, 0, 0] ^= 1
    cached(extractor, changed, tmp_path)
    assert extractor.calls == [80, 40, 80]


def test_an_unreadable_or_foreign_cache_entry_is_recomputed(real, tmp_path):
    extractor = TinyExtractor()
    cached(extractor, real.images, tmp_path)
    path = next(tmp_path.glob("*.npz"))
    path.write_bytes(b"truncated")
    cached(extractor, real.images, tmp_path)
    C.write_entry(path, Features(np.zeros((80, 12), np.float32)), {"identity": "someone else", "num_images": 80})
    features = cached(extractor, real.images, tmp_path)
    assert extractor.calls == [80, 80, 80]
    assert features.features.any()
