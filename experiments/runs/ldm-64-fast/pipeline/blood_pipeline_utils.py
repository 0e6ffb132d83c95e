"""Helpers shared by the bloodgen pipelines: class-label parsing (and diffusers' `id2label` / `get_label_ids`),
output conversion, and the remote-code layout `save_pretrained` writes.

Imports only torch/numpy/PIL/diffusers (and bloodgen_hf's UsageError where it is installed): this file travels
with saved pipelines as remote code, so a pipeline loaded with `trust_remote_code=True` works and saves the same
complete layout again without bloodgen_hf.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:  # bloodgen_hf's own class where it is installed, so its commands report these as bad input, not as bugs
    from bloodgen_hf.errors import UsageError
except ImportError:  # remote code without bloodgen_hf

    class UsageError(ValueError):
        """The pipeline refuses its arguments; the message says why."""


OUTPUT_TYPES = ("pil", "np", "pt")
DEFAULT_NUM_IMAGES = 8  # for a call that gives neither num_images nor a list of labels


def resolve_class_labels(
    class_labels: None | int | str | Sequence[int | str] | torch.Tensor,
    num_images: int | None,
    class_names: Sequence[str] | None,
    num_classes: int,
) -> torch.Tensor:
    """The class of each image to make, as diffusers' class-conditional pipelines (DiTPipeline) take them:
    a list (or 1-D tensor) of labels -> one image per label (num_images, if given, must be its length);
    one label -> num_images images of it; None -> num_images images of the classes in turn (balanced).
    num_images defaults to DEFAULT_NUM_IMAGES. A label is a class index or name (`class_to_index`)."""
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1):
        raise UsageError(f"num_images must be a positive integer, got {num_images!r}")
    count = DEFAULT_NUM_IMAGES if num_images is None else num_images
    if class_labels is None:
        return torch.arange(count) % num_classes
    if isinstance(class_labels, (int, str, np.integer)) or getattr(class_labels, "ndim", None) == 0:
        return torch.full((count,), class_to_index(class_labels, class_names, num_classes), dtype=torch.long)
    labels = [class_to_index(c, class_names, num_classes) for c in list(class_labels)]
    if not labels:
        raise UsageError("class_labels is an empty list; give at least one label (one image is made per label)")
    if num_images is not None and len(labels) != num_images:
        raise UsageError(
            f"got {len(labels)} class labels for {num_images} images: give one label per image, or leave out "
            "num_images to make one image per label"
        )
    return torch.tensor(labels, dtype=torch.long)


def normalise_class_name(name) -> str:
    """Case-insensitive, with '-', ' ' and '_' alike: "Immature granulocyte" == "immature_granulocyte"."""
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def class_to_index(label: int | str, class_names: Sequence[str] | None, num_classes: int) -> int:
    if isinstance(label, torch.Tensor):
        label = int(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < num_classes:
            return int(label)
        raise UsageError(f"class index {label} out of range 0..{num_classes - 1}")
    key = normalise_class_name(label)
    if key.isdigit():
        return class_to_index(int(key), class_names, num_classes)
    for i, name in enumerate(class_names or ()):
        if key in (normalise_class_name(name), normalise_class_name(name) + "s"):
            return i
    raise UsageError(f"unknown class {label!r}; choose from: {', '.join(class_names or map(str, range(num_classes)))}")


def postprocess(images: torch.Tensor, output_type: str):
    """[-1, 1] NCHW -> PIL list, float NHWC numpy in [0, 1], or float NCHW tensor in [0, 1]."""
    if output_type not in OUTPUT_TYPES:
        raise UsageError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    images = (images.float().clamp(-1, 1) + 1) / 2
    if output_type == "pt":
        return images.cpu()
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


# Components of these libraries are loaded by diffusers from `[library, class]` without shipped code.
LIBRARY_ROOTS = ("diffusers", "transformers")


def source_file(cls: type) -> Path:
    """The .py file a class is defined in: pipelines/ and bloodgen_hf/models/ when installed, the copies in
    diffusers' module cache when loaded as remote code (which are the same files)."""
    return Path(inspect.getfile(cls))


def custom_components(pipe) -> dict[str, str]:
    """Component name -> the file stem its code is shipped as, for every component diffusers cannot load by
    itself; a custom class without a declared file name would give a folder that cannot load, so it is refused."""
    declared = getattr(pipe, "remote_code_modules", {})
    custom = {}
    for name, component in pipe.components.items():
        if component is None or type(component).__module__.split(".")[0] in LIBRARY_ROOTS:
            continue
        if name not in declared:
            raise UsageError(
                f"cannot save component {name!r} ({type(component).__module__}.{type(component).__name__}) as remote"
                f" code: {type(pipe).__name__}.remote_code_modules names no file for it"
            )
        custom[name] = declared[name]
    return custom


def remote_code_index(pipe) -> dict[str, list[str]]:
    """The model_index.json entries that point diffusers at the shipped code: `[file stem, class]`."""
    entries = {"_class_name": [source_file(type(pipe)).stem, type(pipe).__name__]}
    for name, module_name in custom_components(pipe).items():
        entries[name] = [module_name, type(getattr(pipe, name)).__name__]
    return entries


def pipeline_classes(pipe) -> list[type]:
    """The pipeline's class, then the bloodgen pipelines it derives from (BloodLDMPipeline: BloodDDPMPipeline),
    whose modules it imports, so they ship with it."""
    return [cls for cls in type(pipe).__mro__ if issubclass(cls, BloodPipelineMixin) and cls is not BloodPipelineMixin]


def remote_code_files(pipe) -> dict[str, Path]:
    """Path in the saved folder -> the source file copied there: the pipeline's module (and those of the pipelines
    it derives from) and this helper at the root, each custom component's module in its own folder."""
    helper = Path(__file__)
    files = {source_file(cls).name: source_file(cls) for cls in pipeline_classes(pipe)} | {helper.name: helper}
    for name, module_name in custom_components(pipe).items():
        files[f"{name}/{module_name}.py"] = source_file(type(getattr(pipe, name)))
    return files


def write_remote_code(pipe, folder: str | os.PathLike) -> None:
    """Copy the pipeline's code files into `folder` (whose component folders save_pretrained has written)."""
    for relative, source in remote_code_files(pipe).items():
        target = Path(folder) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and target.samefile(source):  # saving over the folder whose code this is
            continue
        if target.is_symlink():  # replace the link itself, never write through it into another file
            target.unlink()
        shutil.copyfile(source, target)


# --- provenance.json: the training-data record, each origin once -----------------------------------------------
#
# A pipeline's `provenance` (see bloodgen_hf/provenance.py) is one nested record in memory: its own data, and under
# `init_from` / `distilled_from` each model its weights came from with that model's record, however far back, under
# `autoencoder` the autoencoder a latent model decodes with (its images come out of it), and under `adversarial` the
# real images of an adversarial term. Saved, it is flat: provenance.json holds every record
# once, keyed by a hash of its content, and an origin names its model's record by that key (a teacher that is
# also an ancestor's teacher is stored once). model_index.json keeps a short summary (`provenance_summary`).

PROVENANCE_NAME = "provenance.json"
PROVENANCE_FORMAT = 1
ORIGIN_KEYS = ("init_from", "distilled_from", "autoencoder")  # {"model": ..., "provenance": <its record>, ...}
DATA_KEYS = ("adversarial",)  # a plain data record: {"dataset", "split", "resolution", "num_images"}
# Records a nested chain may hold, each reference counted: real chains hold tens; a damaged or hostile file
# whose records refer to the same ones many times over would otherwise expand without end.
MAX_NESTED_RECORDS = 10_000


def record_key(record: dict) -> str:
    """A record's key in provenance.json: the start of the sha256 of its JSON (origins already as keys)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def record_links(record: dict) -> list[str]:
    """The keys a flat record refers to: its origins' records, then its adversarial images' record."""
    links = [record[key].get("provenance") for key in ORIGIN_KEYS if isinstance(record.get(key), dict)]
    return [k for k in links + [record.get(key) for key in DATA_KEYS] if k is not None]


def flatten_provenance(provenance: dict) -> dict:
    """The nested record as provenance.json holds it: {"format", "model": <its key>, "records": {key: record}},
    every record once, the model's own first, then the ones it refers to, depth first."""
    records: dict[str, dict] = {}

    def add(record: dict | None) -> str | None:
        if record is None:
            return None
        if not isinstance(record, dict):
            raise ValueError(f"a provenance record must be a JSON object or null, got {record!r}")
        flat = dict(record)
        for key in ORIGIN_KEYS:
            origin = flat.get(key)
            if isinstance(origin, dict) and "provenance" in origin:
                flat[key] = {**origin, "provenance": add(origin["provenance"])}
        for key in DATA_KEYS:
            if flat.get(key) is not None:
                flat[key] = add(flat[key])
        flat = json.loads(json.dumps(flat, sort_keys=True))  # plain JSON values, keys in order
        key = record_key(flat)
        records[key] = flat
        return key

    root, ordered = add(provenance), {}
    pending = [root]
    while pending:
        key = pending.pop(0)
        if key not in ordered:
            ordered[key] = records[key]
            pending[:0] = record_links(records[key])
    return {"format": PROVENANCE_FORMAT, "model": root, "records": ordered}


def expand_provenance(document: dict) -> dict:
    """The nested record of a provenance.json document (flatten_provenance undone); ValueError says what is
    wrong with a damaged one."""
    if not isinstance(document, dict) or not isinstance(document.get("records"), dict):
        raise ValueError('expected {"format": 1, "model": <record key>, "records": {<key>: <record>, ...}}')
    records, built = document["records"], 0

    def build(key, seen: frozenset) -> dict:
        nonlocal built
        if not isinstance(key, str) or not isinstance(records.get(key), dict):
            raise ValueError(f"no record {key!r} in its records")
        if key in seen:
            raise ValueError(f"record {key} is among its own origins")
        built += 1
        if built > MAX_NESTED_RECORDS:
            raise ValueError(f"its records refer to each other more than {MAX_NESTED_RECORDS:,} times over")
        record = dict(records[key])
        for name in ORIGIN_KEYS:
            origin = record.get(name)
            if isinstance(origin, dict) and origin.get("provenance") is not None:
                record[name] = {**origin, "provenance": build(origin["provenance"], seen | {key})}
        for name in DATA_KEYS:
            if record.get(name) is not None:
                record[name] = build(record[name], seen | {key})
        return record

    return build(document.get("model"), frozenset())


def is_provenance_summary(provenance) -> bool:
    """Whether a pipeline's `provenance` is the summary model_index.json keeps, not the record itself."""
    return isinstance(provenance, dict) and provenance.get("file") == PROVENANCE_NAME


def provenance_summary(provenance: dict) -> dict:
    """What model_index.json keeps of a record: the data this model was trained on, the models its weights came
    from and the real images of an adversarial term, by name; the whole chain is in provenance.json (`file`),
    under `record`."""
    if is_provenance_summary(provenance):
        return dict(provenance)
    own = ("dataset", "split", "resolution", "num_images", "subset")
    summary = {"file": PROVENANCE_NAME, "record": flatten_provenance(provenance)["model"]}
    summary |= {key: provenance.get(key) for key in own}
    origins = {key: provenance[key].get("model") for key in ORIGIN_KEYS if isinstance(provenance.get(key), dict)}
    for key in DATA_KEYS:
        if isinstance(provenance.get(key), dict):
            origins[key] = {k: provenance[key].get(k) for k in ("dataset", "split")}
    return {**summary, "origins": origins} if origins else summary


def read_provenance_file(file: str | os.PathLike) -> dict:
    """The nested record of a provenance.json; ValueError (with the file's name) if it cannot be read."""
    try:
        return expand_provenance(json.loads(Path(file).read_text()))
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"cannot read {file}: {err}") from None


def write_provenance(provenance, folder: str | os.PathLike) -> None:
    """provenance.json of a pipeline saved into `folder`: its record, flat; none (an old one removed) when it
    records nothing. A pipeline that holds only the summary (loaded by diffusers from a Hub repo, whose
    provenance.json diffusers does not download) leaves the folder's file as it is."""
    target = Path(folder) / PROVENANCE_NAME
    if is_provenance_summary(provenance):
        return
    if target.is_symlink() or (provenance is None and target.exists()):
        target.unlink()
    if provenance is not None:
        target.write_text(json.dumps(flatten_provenance(provenance), indent=2) + "\n")


class BloodPipelineMixin:
    """Makes plain `save_pretrained(folder)` write a folder that `DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)` loads: model_index.json names `[module, class]` and the code is copied along.

    Class labels as diffusers' DiTPipeline has them: `id2label` (index -> name), `labels` (name -> index) and
    `get_label_ids(names)`; `pipe(class_labels=[...])` makes one image per label. A pipeline using the mixin
    defines `class_names` (None if saved without names), `num_classes` and `resolution` (the side in pixels of its
    square images, read from its components' configs, so callers need not sample an image to learn it).

    `remote_code_modules` maps each custom component to the file stem its code is shipped as (unique per
    model family: diffusers caches remote code by file name). `pipe.push_to_hub(repo_id)` is diffusers' own
    (weights, code, provenance.json); `bloodgen_hf.publish.push_to_hub(pipe, repo_id)` or `bloodgen-hf push` also
    render this project's model card and sample grid. The pipelines never import the publisher, which loads them.

    The training-data record (`provenance`) is saved in provenance.json, each origin once, with a summary in
    model_index.json; loaded from a folder, the pipeline reads it back (see `register_to_config`).
    """

    remote_code_modules: dict[str, str] = {}

    @property
    def id2label(self) -> dict[int, str]:
        """Class index -> class name ("0", "1", ... for a model saved without names)."""
        return dict(enumerate(self.class_names or [str(i) for i in range(self.num_classes)]))

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> class index, sorted by name."""
        return dict(sorted((name, i) for i, name in self.id2label.items()))

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """The class indices of class names, for `class_labels`. Names match whatever their case, with spaces,
        '-' and '_' alike and a plural 's' allowed ("Immature granulocytes"); an unknown one is refused, with
        the valid names."""
        names = [label] if isinstance(label, str) else list(label)
        return [class_to_index(name, self.class_names, self.num_classes) for name in names]

    def to_json_string(self) -> str:
        """model_index.json as diffusers writes it, with the remote-code entries of `remote_code_index` and
        without `_name_or_path` (where it was loaded from means nothing in a saved folder or on the Hub)."""
        index = json.loads(super().to_json_string())
        index.pop("_name_or_path", None)
        index.update(remote_code_index(self))
        if index.get("provenance") is not None:  # the record itself goes to provenance.json (save_config)
            index["provenance"] = provenance_summary(index["provenance"])
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """save_pretrained writes model_index.json last, through here, and uploads after it when asked: the
        code and provenance.json go in first, so the folder (and whatever is pushed) is complete."""
        os.makedirs(save_directory, exist_ok=True)
        write_remote_code(self, save_directory)
        write_provenance(self.config.get("provenance"), save_directory)
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def register_to_config(self, **kwargs) -> None:
        """As diffusers' own; and when from_pretrained records the folder the pipeline was loaded from
        (`_name_or_path`), the record model_index.json only summarises is read from its provenance.json. (From a
        Hub repo id diffusers downloads no provenance.json: the summary stays, and saving keeps it.)"""
        super().register_to_config(**kwargs)
        source = kwargs.get("_name_or_path")
        if source is not None and is_provenance_summary(self.config.get("provenance")):
            file = Path(source) / PROVENANCE_NAME
            if file.is_file():
                super().register_to_config(provenance=read_provenance_file(file))
