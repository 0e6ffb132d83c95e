"""On-disk cache of real-image features, so 5 runs (and every later evaluation) extract them once.

An entry holds the features (and class probabilities) of every image of one dataset/size/split,
from which each run takes its random subset. Its key is made of the dataset, size, split, the
extractor's name and a hash of the extractor identity (its weights) and of the images themselves:
new weights or different data give a new key, and writing an entry removes the stale ones of the
same dataset/size/split/extractor.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from bloodgen_hf.evaluation.features import FeatureExtractor, Features
from bloodgen_hf.io import atomic_path

CACHE_ENV = "BLOODGEN_CACHE_DIR"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bloodgen_hf" / "features").expanduser()


def data_fingerprint(images: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()


def cache_prefix(dataset: str, size: int, split: str, extractor: FeatureExtractor) -> str:
    return f"{dataset}-{size}px-{split}-{extractor.name}-"


def cache_path(cache_dir: Path, dataset: str, size: int, split: str, extractor: FeatureExtractor, images) -> Path:
    key = hashlib.sha256(f"{extractor.identity}|{data_fingerprint(images)}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{cache_prefix(dataset, size, split, extractor)}{key}.npz"


def cached_features(
    extractor: FeatureExtractor,
    images: np.ndarray,
    *,
    dataset: str,
    size: int,
    split: str,
    cache_dir: Path | None = None,
    progress: bool = True,
    log=print,
) -> Features:
    """Features of all `images`, read from the cache when an entry for exactly this extractor and data exists."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_path(cache_dir, dataset, size, split, extractor, images)
    found = read_entry(path, extractor.identity, len(images), log)
    if found is not None:
        log(f"real features: cached {path}")
        return found
    log(f"real features: extracting {len(images)} images with {extractor.name} (cached afterwards in {path})")
    features = extractor.extract(images, progress=progress, desc=f"real {extractor.name}")
    write_entry(path, features, {"identity": extractor.identity, "num_images": len(images), "split": split})
    for stale in path.parent.glob(f"{cache_prefix(dataset, size, split, extractor)}*.npz"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return features


def read_entry(path: Path, identity: str, num_images: int, log=print) -> Features | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            features = Features(archive["features"], archive["probs"] if "probs" in archive else None)
    except (OSError, ValueError, KeyError) as err:
        log(f"ignoring unreadable cache entry {path} ({err})")
        return None
    if meta.get("identity") != identity or meta.get("num_images") != num_images or len(features.features) != num_images:
        log(f"ignoring cache entry {path}: it was written for another extractor or data")
        return None
    return features


def write_entry(path: Path, features: Features, meta: dict) -> None:
    arrays = {"features": features.features, "meta": np.asarray(json.dumps(meta))}
    if features.probs is not None:
        arrays["probs"] = features.probs
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
