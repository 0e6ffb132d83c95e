"""What data a generator was trained on, and the refusal to score it on data it saw.

Every pipeline a train script saves records its training data in its config as `provenance`:

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
num_images}): the student learnt from those too, so the checks follow them as well. A latent diffusion model
(bloodgen_hf/training/latent.py) names the autoencoder it decodes with in `autoencoder` (its folder, content hash
and record): every image it makes comes out of that decoder, so the checks follow it too.

In memory the record is that one nested dict. Saved (and on the Hub) it is provenance.json next to
model_index.json, flat: every record once, keyed by a hash of its content, each origin naming its model's
record by key (bloodgen_hf/pipelines/blood_pipeline_utils.py writes and reads it, as the remote code does);
model_index.json keeps a short summary. Folders saved before provenance.json hold the nested record in
model_index.json; they load as they did (bloodgen_hf.registry.read_provenance). The paths in a record are
relative to the folder a run started in (the repo), or replaced by a name and a content hash
(`portable_provenance`): no absolute path of the machine that trained it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bloodgen_hf.errors import UsageError
from bloodgen_hf.pipelines.blood_pipeline_utils import (
    ORIGIN_KEYS,
    PROVENANCE_NAME,
    is_provenance_summary,
    read_provenance_file,
)
from bloodgen_hf.registry import ModelLoadError, read_provenance, resolve_model

ALL_SPLITS = "all"
HASHED = "@sha256:"  # "<file or folder name>@sha256:<its content's hash>": a path outside the run's folder
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
            raise UsageError("--subset-seed only picks a subset together with --subset-fraction")
        return
    if not 0 < fraction <= 1:
        raise UsageError(f"--subset-fraction must be in (0, 1], got {fraction}")


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
    """The provenance of a saved pipeline (bundled name, folder or Hub repo), or of a single-model folder beside
    its provenance.json (an autoencoder's), the whole chain; None if absent or unreadable."""
    single = Path(source).expanduser() / PROVENANCE_NAME
    if single.is_file() and not single.with_name("model_index.json").is_file():
        return read_provenance_file(single)
    try:
        return read_provenance(resolve_model(source))
    except ModelLoadError:
        return None


def pipeline_provenance(pipe) -> dict | None:
    provenance = pipe.config.get("provenance") if hasattr(pipe, "config") else None
    if is_provenance_summary(provenance):  # the whole record was never read: its ancestors are unknown
        raise UsageError(
            f"this {type(pipe).__name__} holds only the summary of its training data that model_index.json keeps "
            "(diffusers does not download provenance.json); load it with bloodgen_hf.registry.load_pipeline"
        )
    return dict(provenance) if provenance else None


# --- no absolute paths -------------------------------------------------------------------------------


def portable_provenance(provenance: dict | None, root: str | Path | None = None) -> dict | None:
    """The record with every absolute path in it (an --init-from folder, a pairs file, a --dataset folder)
    made portable: relative to `root` (default: the working directory, the repo a run starts in) when inside
    it, else `portable_path`'s name and content hash."""
    root = os.path.abspath(root or os.getcwd())

    def walk(value):
        if isinstance(value, dict):
            return {key: walk(v) for key, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return portable_path(value, root) if isinstance(value, str) and is_absolute_path(value) else value

    return walk(provenance)


def is_absolute_path(text: str) -> bool:
    """`/...`, `~...` or a Windows drive (`C:\\...`): a path that names one machine's folders."""
    return text.startswith(("/", "~", "\\")) or re.match(r"[A-Za-z]:[\\/]", text) is not None


def portable_path(text: str, root: str | Path) -> str:
    """An absolute path as a record keeps it: relative to `root` when inside it (POSIX separators), else the
    file or folder's name and the sha256 of its content (`name@sha256:...`), or its name alone if it is gone."""
    path, root = os.path.abspath(os.path.expanduser(text)), os.path.abspath(root)
    if os.path.commonpath([path, root]) == root:
        return Path(os.path.relpath(path, root)).as_posix()
    name = os.path.basename(path) or path.strip("/\\")
    return f"{name}{HASHED}{content_sha256(Path(path))}" if os.path.exists(path) else name


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes; of a folder, of each file's relative path and sha256, in sorted order."""
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    lines = "".join(f"{p.relative_to(path).as_posix()}\0{content_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# --- the refusal -------------------------------------------------------------------------------------


def splits_seen(provenance: dict) -> set[str]:
    """The splits whose images may be in the training data ('all' is every split: a wildcard)."""
    split = str(provenance.get("split"))
    return {ALL_SPLITS} if split == ALL_SPLITS else {split}


def same_dataset(a: str, b: str) -> bool:
    """The same dataset name (any case), folder, or folder content: a folder recorded by name and hash
    (`portable_path`, it was outside the run's folder) is the same as any folder with that content."""

    def key(dataset: str, hashed: bool) -> str:
        path = Path(dataset).expanduser()
        if HASHED in dataset:
            return dataset.rpartition(HASHED)[2]
        if not path.exists():
            return dataset.strip().lower()
        return content_sha256(path) if hashed else str(path.resolve())

    hashed = HASHED in str(a) or HASHED in str(b)
    return key(str(a), hashed) == key(str(b), hashed)


# How each origin's model passed its data on (the keys are those provenance.json links by record key).
ORIGIN_WORDS = {"init_from": "started from", "distilled_from": "distilled from", "autoencoder": "decoded by"}
ORIGINS = tuple((key, ORIGIN_WORDS[key]) for key in ORIGIN_KEYS)


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
            f"{name} records no training data (no `provenance` saved with it), so it may have seen "
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
    is in provenance.json)."""
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
                if pairs.get("guidance_interval"):
                    text += " guiding noise levels ({:g}, {:g}]".format(*pairs["guidance_interval"])
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
