"""What data a generator was trained on, and the refusal to score it on data it saw.

Every pipeline a train script saves records its training data in its config (so in model_index.json and
in the Hub copy) as `provenance`:

    {"dataset": "bloodmnist", "resolution": 28, "split": "train", "num_images": 119,
     "subset": {"method": "stratified_subset", "fraction": 0.01, "seed": 0, "size": 119, "of": 11959,
                "indices_sha256": "3f1c..."},
     "init_from": null}

`split` "all" means every split, the test split included. `subset` is null when the whole split was used;
otherwise the images were `real_subset(labels of the split, fraction, seed)`, the very subset R_f that
augment-study gives its classifier at that fraction and seed, and `indices_sha256` is the fingerprint of
those indices (`indices_fingerprint`). `init_from` is null, or the model the weights started from with
that model's own provenance: its data is in the weights too, so the checks follow it. A distilled
student (bloodgen_hf/training/student.py) names its teacher the same way in `distilled_from`, and the real
images its adversarial term's discriminator saw, if any, in `adversarial` ({dataset, split, resolution,
num_images}): the student learnt from those too, so the checks follow them as well.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ALL_SPLITS = "all"
TRAIN_SCRIPT_HINT = "retrain it with a train script (e.g. `bloodgen-hf train ddpm --split train`), which records it"


class LeakError(ValueError):
    """A model would be scored on data it may have been trained on; the message says why, in one line."""


# --- the real subsets R_f ----------------------------------------------------------------------------


def stratified_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of round(fraction x count) random images of every class (at least one each)."""
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members):
            picked.append(rng.choice(members, max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(picked))


def real_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """R_f: the class-stratified subset that augment-study trains its classifier on at (fraction, seed),
    and that `--subset-fraction/--subset-seed` trains a generator on."""
    return stratified_subset(np.asarray(labels), fraction, np.random.default_rng([seed, round(fraction * 1e6)]))


def indices_fingerprint(indices: np.ndarray) -> str:
    """sha256 of the sorted indices written as a compact JSON list ("[3,17,...]"), easy to recompute anywhere."""
    text = json.dumps(sorted(int(i) for i in np.asarray(indices).reshape(-1)), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_subset_options(fraction: float | None, seed: int) -> None:
    if fraction is None:
        if seed != 0:
            raise ValueError("--subset-seed only picks a subset together with --subset-fraction")
        return
    if not 0 < fraction <= 1:
        raise ValueError(f"--subset-fraction must be in (0, 1], got {fraction}")


def subset_record(indices: np.ndarray, fraction: float, seed: int, of: int) -> dict:
    return {
        "method": "stratified_subset",
        "fraction": float(fraction),
        "seed": int(seed),
        "size": int(len(indices)),
        "of": int(of),
        "indices_sha256": indices_fingerprint(indices),
    }


def training_provenance(
    dataset: str,
    resolution: int,
    split: str,
    num_images: int,
    subset: dict | None = None,
    init_from: dict | None = None,
) -> dict:
    return {
        "dataset": str(dataset),
        "resolution": int(resolution),
        "split": str(split),
        "num_images": int(num_images),
        "subset": subset,
        "init_from": init_from,
    }


def origin_record(source: str | None) -> dict | None:
    """`init_from` of a provenance: the source model and what it was trained on (None when not recorded
    or not a pipeline, e.g. a BloodNet folder)."""
    if not source:
        return None
    return {"model": str(source), "provenance": saved_provenance(source)}


def saved_provenance(source: str) -> dict | None:
    """The provenance in a saved pipeline's model_index.json (bundled name, folder or Hub repo); None if absent."""
    from bloodgen_hf.hub import ModelLoadError, read_model_index, resolve_model

    try:
        return read_model_index(resolve_model(source)).get("provenance")
    except ModelLoadError:
        return None


def pipeline_provenance(pipe) -> dict | None:
    provenance = pipe.config.get("provenance") if hasattr(pipe, "config") else None
    return dict(provenance) if provenance else None


# --- the refusal -------------------------------------------------------------------------------------


def splits_seen(provenance: dict) -> set[str]:
    """The splits whose images may be in the training data ('all' is every split: a wildcard)."""
    split = str(provenance.get("split"))
    return {ALL_SPLITS} if split == ALL_SPLITS else {split}


def same_dataset(a: str, b: str) -> bool:
    def key(dataset: str) -> str:
        path = Path(dataset).expanduser()
        return str(path.resolve()) if path.exists() else dataset.strip().lower()

    return key(str(a)) == key(str(b))


ORIGINS = (("init_from", "started from"), ("distilled_from", "distilled from"))


def data_records(provenance: dict | None, label: str) -> Iterator[tuple[str, dict | None]]:
    """Every training-data record behind a model, depth first, each with a label saying how it got there:
    the model's own, then each model its weights came from (`ORIGINS`, however far back; None where one
    records none), then the real images of its adversarial term."""
    yield label, provenance
    if not provenance:
        return
    for key, how in ORIGINS:
        origin = provenance.get(key)
        if origin:
            yield from data_records(origin.get("provenance"), f"{label} ({how} {origin.get('model')})")
    if provenance.get("adversarial"):
        yield from data_records(provenance["adversarial"], f"{label} (its adversarial term)")


def check_unseen(provenance: dict | None, model: str, eval_split: str, dataset: str, purpose: str) -> None:
    """Refuse (LeakError) a model whose training data may include `eval_split` of `dataset`, which `purpose`
    scores on: recorded on that split or 'all', trained on another dataset (which may hold the same images),
    started from or distilled from such a model, adversarially trained on such images, or with nothing
    recorded. Nothing is assumed."""
    for name, record in data_records(provenance, model):
        check_record_unseen(record, name, eval_split, dataset, purpose)


def check_record_unseen(record: dict | None, name: str, eval_split: str, dataset: str, purpose: str) -> None:
    """check_unseen for one record of the chain, without following it."""
    if not record:
        raise LeakError(
            f"{name} records no training data (no `provenance` in its model_index.json), so it may have seen "
            f"the {eval_split} split {purpose} scores on; {TRAIN_SCRIPT_HINT}"
        )
    trained_on = f"split {record.get('split')!r} of {record.get('dataset')}"
    if not same_dataset(record.get("dataset", ""), dataset):
        raise LeakError(
            f"{name} was trained on {trained_on}, not on {dataset}, so it cannot be shown not to hold the "
            f"{eval_split} split {purpose} scores on; use a generator trained on --split train of {dataset}"
        )
    seen = splits_seen(record)
    if ALL_SPLITS in seen or eval_split in seen:
        raise LeakError(
            f"{name} was trained on {trained_on}, which includes the {eval_split!r} split {purpose} scores on; "
            "use a generator trained on --split train (e.g. `bloodgen-hf train ddpm --split train`)"
        )


# --- in words, for cards and reports -------------------------------------------------------------------


def describe_provenance(provenance: dict | None) -> str:
    """One sentence, short however long the chain: this model's own data, the models its weights came from,
    the real images of an adversarial term, then in sum what the models further back saw (the whole chain
    is in model_index.json)."""
    if not provenance:
        return "not recorded"
    text = describe_data(provenance)
    for key, how in ORIGINS:
        origin = provenance.get(key)
        if origin:
            text += f"; {how} {origin.get('model')}"
            if origin.get("pairs"):
                pairs = origin["pairs"]
                text += f", on {pairs['num_pairs']:,} of its images at guidance {pairs['guidance_scale']:g}"
    if provenance.get("adversarial"):
        text += f"; with an adversarial term against real images of {describe_data(provenance['adversarial'])}"
    origins = [provenance[key] for key, _ in ORIGINS if provenance.get(key)]
    earlier = sorted({data_seen(record) for o in origins for _, record in data_records(o.get("provenance"), "")})
    if earlier:
        listed = ", ".join(earlier[:-1]) + " and " + earlier[-1] if len(earlier) > 1 else earlier[0]
        text += f"; the models it descends from were trained on {listed}"
    return text


def describe_data(provenance: dict) -> str:
    """The data one training run saw: "split 'train' of bloodmnist at 28x28, 11,959 images[: the subset ...]"."""
    res = provenance.get("resolution")
    text = f"split {provenance.get('split')!r} of {provenance.get('dataset')} at {res}x{res}"
    text += f", {provenance.get('num_images', '?'):,} images" if provenance.get("num_images") else ""
    subset = provenance.get("subset")
    if subset:
        text += (
            f": the stratified subset at fraction {subset['fraction']:g}, seed {subset['seed']} "
            f"({subset['size']:,} of {subset['of']:,} images; indices sha256 {subset['indices_sha256'][:12]})"
        )
    return text


def data_seen(record: dict | None) -> str:
    if not record:
        return "unrecorded data"
    subset = " (a subset)" if record.get("subset") else ""
    return f"split {record.get('split')!r} of {record.get('dataset')}{subset}"
