"""The metrics against known answers: closed forms, clean-fid's own code, brute force, hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from bloodgen_hf.evaluation import metrics as M


def gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, scale, size=(n, d))


# --- Fréchet distance -----------------------------------------------------------------------------


def test_fd_of_a_set_with_itself_is_zero():
    x = gaussian(500, 32, 0) @ gaussian(32, 32, 1)  # correlated features
    assert abs(M.fd_from_features(x, x)) < 1e-8 * np.trace(np.cov(x, rowvar=False))


def test_fd_matches_the_closed_form_for_gaussians():
    """Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2."""
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fd_of_general_covariances_matches_the_sqrtm_formula():
    rng = np.random.default_rng(3)
    s1 = np.cov(rng.normal(size=(200, 6)), rowvar=False)
    s2 = np.cov(rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)), rowvar=False)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fd_from_samples_approaches_the_population_value():
    """N(0, I) vs N(m, 4I) in d=4: FD = |m|^2 + d (2 - 1)^2 = 4 + 4."""
    x, y = gaussian(40_000, 4, 0), gaussian(40_000, 4, 1, shift=1.0, scale=2.0)
    assert M.fd_from_features(x, y) == pytest.approx(8.0, abs=0.15)


def test_fd_equals_clean_fid():
    from cleanfid.fid import fid_from_feats

    x, y = gaussian(300, 16, 0), gaussian(300, 16, 1, shift=0.3) @ gaussian(16, 16, 2)
    assert M.fd_from_features(x, y) == pytest.approx(fid_from_feats(x, y), rel=1e-7)


def test_fd_handles_rank_deficient_per_class_sets():
    """Fewer images than dimensions (a rare class): still finite, zero against itself."""
    x = gaussian(5, 20, 0)
    assert abs(M.fd_from_features(x, x)) < 1e-6 * np.trace(np.cov(x, rowvar=False))
    assert np.isfinite(M.fd_from_features(x, gaussian(7, 20, 1)))


def test_per_class_fd_skips_classes_without_two_images():
    real, fake = gaussian(40, 4, 0), gaussian(40, 4, 1)
    labels = np.arange(40) % 4
    fake_labels = labels.copy()
    fake_labels[fake_labels == 3] = 0  # no class 3 among the fakes
    result = M.per_class_fd(real, labels, fake, fake_labels, num_classes=5)
    assert set(result) == {0, 1, 2}
    assert result[1] == pytest.approx(M.fd_from_features(real[labels == 1], fake[fake_labels == 1]))


# --- KID and IS --------------------------------------------------------------------------------------


def test_kid_equals_clean_fid_when_the_subset_is_the_whole_set():
    from cleanfid.fid import kernel_distance

    x, y = gaussian(60, 8, 0), gaussian(60, 8, 1, shift=0.5)
    ours = M.kernel_inception_distance(x, y, num_subsets=3, subset_size=60)
    assert ours == pytest.approx(kernel_distance(x, y, num_subsets=3, max_subset_size=60), rel=1e-9)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    same = M.kernel_inception_distance(gaussian(2000, 8, 0), gaussian(2000, 8, 1), num_subsets=20, subset_size=500)
    shifted = M.kernel_inception_distance(gaussian(2000, 8, 0), gaussian(2000, 8, 2, shift=0.5), 20, 500)
    assert abs(same) < 0.01
    assert shifted > 0.1


def test_kid_is_reproducible_for_a_seed():
    x, y = gaussian(300, 4, 0), gaussian(300, 4, 1)
    assert M.kernel_inception_distance(x, y, 5, 100, seed=1) == M.kernel_inception_distance(x, y, 5, 100, seed=1)


def test_inception_score_of_confident_uniform_predictions_is_the_class_count():
    probs = np.eye(8)[np.arange(8000) % 8]
    mean, std = M.inception_score(probs, splits=10)
    assert mean == pytest.approx(8.0, rel=0.01)
    assert std < 0.05


def test_inception_score_does_not_depend_on_the_order_of_the_images():
    """Generated sets come sorted by class; consecutive one-class splits would score about 1."""
    by_class = np.eye(8)[np.repeat(np.arange(8), 1000)]
    interleaved = np.eye(8)[np.arange(8000) % 8]
    assert M.inception_score(by_class)[0] == pytest.approx(M.inception_score(interleaved)[0], rel=0.01)
    assert M.inception_score(by_class)[0] > 7.9


def test_inception_score_of_identical_predictions_is_one():
    probs = np.tile([0.5, 0.3, 0.2], (50, 1))
    assert M.inception_score(probs, splits=5)[0] == pytest.approx(1.0)


def test_inception_score_of_a_two_point_example():
    """Two images, p = (1, 0) and (0.5, 0.5): marginal (0.75, 0.25); KLs ln(4/3) and (ln(2/3) + ln 2) / 2."""
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    kl = (np.log(4 / 3) + 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)) / 2
    assert M.inception_score(probs, splits=1)[0] == pytest.approx(np.exp(kl))


# --- nearest neighbours, precision/recall, density/coverage, 1-NN -----------------------------------------


def test_knn_radii_on_a_line():
    points = np.arange(6, dtype=np.float64)[:, None]
    assert M.knn_radii(points, 1).tolist() == [1.0] * 6
    assert M.knn_radii(points, 2).tolist() == [2.0, 1.0, 1.0, 1.0, 1.0, 2.0]


def test_nearest_neighbours_can_leave_each_query_out():
    points = np.array([[0.0], [1.0], [3.0]])
    dist, index = M.nearest_neighbours(points, points, exclude=np.arange(3))
    assert index.tolist() == [1, 0, 1]
    assert dist.tolist() == [1.0, 1.0, 2.0]


def brute_force_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """The definitions, written out with full distance matrices (as the `prdc` package does)."""

    def dists(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    real_r = np.sort(dists(real, real), axis=1)[:, k]
    fake_r = np.sort(dists(fake, fake), axis=1)[:, k]
    d = dists(real, fake)  # [real, fake]
    return {
        "precision": (d < real_r[:, None]).any(axis=0).mean(),
        "recall": (d < fake_r[None, :]).any(axis=1).mean(),
        "density": (1 / k) * (d < real_r[:, None]).sum(axis=0).mean(),
        "coverage": (d.min(axis=1) < real_r).mean(),
    }


def test_prdc_matches_the_definitions_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(M, "CHUNK", 37)  # several blocks, the last one partial
    real, fake = gaussian(150, 5, 0), gaussian(120, 5, 1, shift=0.4, scale=1.3)
    ours = M.precision_recall_density_coverage(real, fake, k=4)
    expected = brute_force_prdc(real, fake, k=4)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


def test_prdc_of_identical_sets_and_of_far_apart_sets():
    x = gaussian(100, 3, 0)
    same = M.precision_recall_density_coverage(x, x, k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = M.precision_recall_density_coverage(x, x + 100, k=3)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_one_nn_is_chance_for_two_halves_of_one_set():
    x = gaussian(1600, 8, 0)
    result = M.one_nn_accuracy(x[:800], x[800:])
    assert result["one_nn_accuracy"] == pytest.approx(0.5, abs=0.05)


def test_one_nn_is_perfect_for_disjoint_clusters():
    result = M.one_nn_accuracy(gaussian(200, 8, 0), gaussian(200, 8, 1, shift=20.0))
    assert result == {"one_nn_accuracy": 1.0, "one_nn_real_accuracy": 1.0, "one_nn_fake_accuracy": 1.0}


def test_one_nn_is_near_zero_when_fakes_copy_reals():
    """Each fake sits on (a tiny jitter of) a real point: every point's neighbour is from the other set."""
    real = gaussian(300, 8, 0)
    assert M.one_nn_accuracy(real, real + 1e-4)["one_nn_accuracy"] == 0.0


# --- memorization -----------------------------------------------------------------------------------------


def random_images(n: int, seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_nearest_copies_finds_flipped_copies():
    reference = random_images(20, 0)
    queries = np.stack([reference[3][:, ::-1], reference[7][::-1, ::-1], random_images(1, 1)[0]])
    copies = M.nearest_copies(queries, reference)
    assert copies["index"][:2].tolist() == [3, 7]
    assert copies["flip"][:2].tolist() == [1, 3]
    assert copies["distance"][:2].tolist() == [0.0, 0.0]
    assert copies["distance"][2] > 0.2  # independent noise images are far apart


def test_rms_pixel_distance_is_in_image_units():
    reference = np.zeros((1, 4, 4, 3), np.uint8)
    assert M.nearest_copies(np.full((1, 4, 4, 3), 51, np.uint8), reference)["distance"][0] == pytest.approx(0.2)


def test_memorization_threshold_leaves_each_image_out():
    """Without leaving itself out, every real image would be its own copy and the threshold 0."""
    reference = random_images(30, 0)
    assert M.memorization_threshold(reference, quantile=0.1, sample=30) > 0.2
    duplicated = np.concatenate([reference, reference])
    assert M.memorization_threshold(duplicated, quantile=0.5, sample=60) == 0.0


# --- classification ----------------------------------------------------------------------------------------


def test_classification_report_by_hand():
    true = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    report = M.classification_report(true, pred, num_classes=4)
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["confusion"][:3] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0]]
    assert report["precision"] == pytest.approx([0.5, 2 / 3, 1.0, 0.0])
    assert report["recall"] == pytest.approx([0.5, 1.0, 0.5, 0.0])
    assert report["f1"] == pytest.approx([0.5, 0.8, 2 / 3, 0.0])
    assert report["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 4)
    assert report["support"] == [2, 2, 2, 0]


def test_classification_report_agrees_with_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 8, 500), rng.integers(0, 8, 500)
    report = M.classification_report(true, pred, 8)
    assert report["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(true, pred, average="macro"))
    assert report["confusion"] == sklearn_metrics.confusion_matrix(true, pred, labels=range(8)).tolist()


# --- texture: radial power spectrum ---------------------------------------------------------------


def test_radial_power_spectrum_puts_a_stripe_pattern_in_its_own_ring():
    size, frequency = 28, 5
    stripes = 127.5 + 100 * np.cos(2 * np.pi * frequency * np.arange(size) / size)
    images = np.repeat(np.broadcast_to(stripes, (size, size))[None, :, :, None], 3, axis=-1).astype(np.uint8)
    spectrum = M.radial_power_spectrum(np.repeat(images, 2, axis=0))
    assert spectrum.shape == (size // 2 - 1,) and int(np.argmax(spectrum)) + 1 == frequency
    flat = np.full((2, size, size, 3), 90, dtype=np.uint8)
    np.testing.assert_allclose(M.radial_power_spectrum(flat), 0.0, atol=1e-20)  # no texture, no power
    noise = np.random.default_rng(0).integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    white = M.radial_power_spectrum(noise)  # white noise: the same power in every ring
    assert white.max() / white.min() < 1.5
    with pytest.raises(ValueError, match="square NHWC images"):
        M.radial_power_spectrum(np.zeros((2, 28, 20, 3), dtype=np.uint8))
