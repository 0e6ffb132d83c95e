"""Sample-based metrics between a real and a generated set, on features or pixels (numpy + torch).

Every function takes plain arrays ([N, D] features, [N, C] probabilities, uint8 NHWC images) so
it can be checked on toy data with known answers. Distances are computed in chunks with torch
matrix products, so 10k x 17k comparisons fit in memory.
"""

from __future__ import annotations

import numpy as np
import torch

from bloodgen_hf.errors import UsageError

CHUNK = 1024  # query rows per distance block


# --- Fréchet distance -----------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, like clean-fid) in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise UsageError(f"need at least 2 feature vectors [N, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), the Fréchet distance of two Gaussians.

    Tr((S1 S2)^1/2) is the sum of square roots of the eigenvalues of S1^1/2 S2 S1^1/2, which is
    symmetric and has the eigenvalues of S1 S2: two symmetric eigendecompositions, no complex
    sqrtm, and exact for the rank-deficient covariances that small per-class sets give.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UsageError(f"statistics differ in dimension: {mu1.shape} vs {mu2.shape}")
    values, vectors = np.linalg.eigh(sigma1)
    sqrt1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = sqrt1 @ sigma2 @ sqrt1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fd_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def per_class_fd(
    real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray, num_classes: int
) -> dict[int, float]:
    """FD between the real and generated images of each class (classes with < 2 images of either are left out)."""
    result = {}
    for c in range(num_classes):
        a, b = real[real_labels == c], fake[fake_labels == c]
        if len(a) >= 2 and len(b) >= 2:
            result[c] = fd_from_features(a, b)
    return result


# --- KID and Inception Score ------------------------------------------------------------------------


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
    random subsets of size min(subset_size, |real|, |fake|) (the estimator clean-fid uses)."""
    real = torch.as_tensor(np.asarray(real, dtype=np.float64))
    fake = torch.as_tensor(np.asarray(fake, dtype=np.float64))
    d, m = real.shape[1], min(subset_size, len(real), len(fake))
    if m < 2:
        raise UsageError("KID needs at least 2 images in each set")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = real[torch.from_numpy(rng.choice(len(real), m, replace=False))]
        y = fake[torch.from_numpy(rng.choice(len(fake), m, replace=False))]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        total += float(within - 2 * kxy.mean())
    return total / num_subsets


def inception_score(probs: np.ndarray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` parts (as in the original).

    The parts are drawn after a seeded shuffle: generated sets come in class order, and a part holding
    one class would have a one-class marginal p(y) and score near 1 however good the images are."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < splits:
        raise UsageError(f"need at least {splits} probability vectors [N, C], got shape {probs.shape}")
    probs = probs[np.random.default_rng(seed).permutation(len(probs))]
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = np.sum(part * (np.log(np.clip(part, 1e-12, None)) - np.log(np.clip(marginal, 1e-12, None))), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# --- nearest neighbours -----------------------------------------------------------------------------


def _as_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))


def squared_distances(a: torch.Tensor, b: torch.Tensor, b_norms: torch.Tensor | None = None) -> torch.Tensor:
    """[len(a), len(b)] squared Euclidean distances via ||a||^2 + ||b||^2 - 2ab (clamped at 0); `b_norms`, the
    ||b||^2 of every row, saves squaring all of `b` again for every chunk (64 px pixel vectors are large)."""
    b_norms = b.pow(2).sum(1) if b_norms is None else b_norms
    sq = a.pow(2).sum(1, keepdim=True) + b_norms[None, :] - 2 * a @ b.T
    return sq.clamp_min_(0)


def nearest_neighbours(
    queries: np.ndarray, reference: np.ndarray, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distance to and index of each query's nearest reference row; `exclude[i]` (a reference index,
    or -1) is skipped for query i, which gives leave-one-out distances when queries come from reference."""
    q, ref = _as_tensor(queries), _as_tensor(reference)
    norms = ref.pow(2).sum(1)
    index = []
    for start in range(0, len(q), CHUNK):
        block = squared_distances(q[start : start + CHUNK], ref, norms)
        if exclude is not None:
            rows = torch.arange(len(block))
            skip = torch.as_tensor(exclude[start : start + CHUNK], dtype=torch.long)
            block[rows[skip >= 0], skip[skip >= 0]] = float("inf")
        index.append(block.argmin(dim=1))
    index = torch.cat(index).numpy()
    # The float32 expansion loses digits when vectors are long and close (an exact copy would come out
    # at ~1e-2 instead of 0): the distance to the chosen neighbour is recomputed directly in float64.
    diff = np.asarray(queries, np.float64) - np.asarray(reference)[index].astype(np.float64)
    return np.sqrt((diff**2).sum(axis=1)), index


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row (the radius of its k-NN ball)."""
    x = _as_tensor(features)
    if len(x) <= k:
        raise UsageError(f"k-NN radii with k={k} need more than {k} points, got {len(x)}")
    radii = []
    for start in range(0, len(x), CHUNK):
        block = squared_distances(x[start : start + CHUNK], x)
        radii.append(block.topk(k + 1, dim=1, largest=False).values[:, k].sqrt())  # index 0 is the point itself
    return torch.cat(radii).numpy()


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """k-NN manifold metrics.

    precision: share of fakes inside some real k-NN ball (Kynkäänniemi et al. 2019); recall: share of
    reals inside some fake ball; density: mean number of real balls holding a fake, / k; coverage:
    share of real balls holding at least one fake (Naeem et al. 2020). Balls are open, as in `prdc`.
    """
    real_t, fake_t = _as_tensor(real), _as_tensor(fake)
    real_radii, fake_radii = torch.from_numpy(knn_radii(real, k)), torch.from_numpy(knn_radii(fake, k))
    in_real_ball = torch.zeros(len(fake_t), dtype=torch.bool)
    balls_holding = torch.zeros(len(fake_t))
    nearest_fake = torch.full((len(real_t),), float("inf"))
    in_fake_ball = torch.zeros(len(real_t), dtype=torch.bool)
    for start in range(0, len(fake_t), CHUNK):
        dist = squared_distances(fake_t[start : start + CHUNK], real_t).sqrt()  # [chunk, real]
        inside = dist < real_radii[None, :]
        in_real_ball[start : start + CHUNK] = inside.any(dim=1)
        balls_holding[start : start + CHUNK] = inside.sum(dim=1).float()
        nearest_fake = torch.minimum(nearest_fake, dist.min(dim=0).values)
        in_fake_ball |= (dist < fake_radii[start : start + CHUNK, None]).any(dim=0)
    return {
        "precision": float(in_real_ball.float().mean()),
        "recall": float(in_fake_ball.float().mean()),
        "density": float(balls_holding.mean() / k),
        "coverage": float((nearest_fake < real_radii).float().mean()),
    }


def one_nn_accuracy(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    """Leave-one-out 1-nearest-neighbour two-sample test (Lopez-Paz & Oquab 2017).

    Each point of real + fake is labelled by its nearest other point; accuracy 0.5 means the sets are
    indistinguishable, 1.0 perfectly separable, and near 0 that fakes sit on top of reals (copies).
    """
    both = np.concatenate([real, fake])
    is_real = np.r_[np.ones(len(real), bool), np.zeros(len(fake), bool)]
    _, index = nearest_neighbours(both, both, exclude=np.arange(len(both)))
    correct = is_real[index] == is_real
    return {
        "one_nn_accuracy": float(correct.mean()),
        "one_nn_real_accuracy": float(correct[is_real].mean()),
        "one_nn_fake_accuracy": float(correct[~is_real].mean()),
    }


# --- texture (pixel space) ------------------------------------------------------------------------


def radial_power_spectrum(images: np.ndarray) -> np.ndarray:
    """Mean power of the grey images' 2-D Fourier transform in rings of integer frequency 1 .. H // 2 - 1
    (cycles per image; the mean, ring 0, is removed): fine texture is the power in the upper rings.

    uint8 NHWC of square images -> float64 [H // 2 - 1]. Independent of any feature network."""
    grey = np.asarray(images, dtype=np.float64).mean(axis=-1) / 255.0
    if grey.ndim != 3 or grey.shape[1] != grey.shape[2]:
        raise UsageError(f"radial_power_spectrum needs square NHWC images, got shape {np.shape(images)}")
    size = grey.shape[1]
    grey = grey - grey.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fftshift(np.fft.fft2(grey), axes=(1, 2))) ** 2).mean(axis=0)
    y, x = np.indices((size, size))
    ring = np.rint(np.hypot(y - size // 2, x - size // 2)).astype(int)
    return np.array([power[ring == k].mean() for k in range(1, size // 2)])


# --- memorization (pixel space) ---------------------------------------------------------------------


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 [N, H*W*C] in [0, 1]."""
    return np.asarray(images, dtype=np.float32).reshape(len(images), -1) / 255.0


def nearest_copies(
    queries: np.ndarray, reference: np.ndarray, exclude: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """For each query image, the nearest reference image over the 4 flips of the query (cells have no
    orientation and models train with flips). Distances are RMS pixel differences in [0, 1]."""
    ref = pixel_vectors(reference)
    size = ref.shape[1]
    best = {"distance": np.full(len(queries), np.inf, np.float32), "index": np.zeros(len(queries), np.int64)}
    best["flip"] = np.zeros(len(queries), np.int64)
    for flip, variant in enumerate(flips(queries)):
        dist, index = nearest_neighbours(pixel_vectors(variant), ref, exclude)
        dist = dist / np.sqrt(size)
        better = dist < best["distance"]
        best["distance"][better], best["index"][better], best["flip"][better] = dist[better], index[better], flip
    return best


def flips(images: np.ndarray) -> list[np.ndarray]:
    """Identity, horizontal, vertical and both flips of uint8 NHWC images."""
    return [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]


def memorization_threshold(reference: np.ndarray, quantile: float, sample: int, seed: int = 0) -> float:
    """The `quantile` of real images' leave-one-out nearest-copy distances to the rest of `reference`:
    a generated image closer to a training image than that is closer than real data gets, a near-copy."""
    if not 0 < quantile < 1:
        raise UsageError(f"memorization quantile must be in (0, 1), got {quantile}")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(reference), min(sample, len(reference)), replace=False)
    distances = nearest_copies(reference[picked], reference, exclude=picked)["distance"]
    return float(np.quantile(distances, quantile))


# --- classification -------------------------------------------------------------------------------------


def classification_report(true: np.ndarray, pred: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    (rows: true class, columns: predicted). A class never predicted has precision 0, as in sklearn."""
    true, pred = np.asarray(true, np.int64), np.asarray(pred, np.int64)
    if true.shape != pred.shape or len(true) == 0:
        raise UsageError(f"need equally many true and predicted labels, got {true.shape} and {pred.shape}")
    confusion = np.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    hits = np.diag(confusion).astype(np.float64)
    predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(hits), where=denom > 0)
    return {
        "accuracy": float(hits.sum() / len(true)),
        "macro_f1": float(f1.mean()),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.tolist(),
        "confusion": confusion.tolist(),
    }
