"""Helpers shared by the bloodgen pipelines: class-label parsing, output conversion, and the remote-code
layout `save_pretrained` writes.

Imports only torch/numpy/PIL/diffusers: this file travels with saved pipelines as remote code, so a
pipeline loaded with `trust_remote_code=True` saves the same complete layout again without bloodgen_hf.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

OUTPUT_TYPES = ("pil", "np", "pt")


def resolve_class_labels(
    class_labels: None | int | str | Sequence[int | str] | torch.Tensor,
    num_images: int,
    class_names: Sequence[str] | None,
    num_classes: int,
) -> torch.Tensor:
    """None -> classes in turn (balanced); one class -> all images of it; a sequence -> one label per image."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if class_labels is None:
        return torch.arange(num_images) % num_classes
    if isinstance(class_labels, (int, str, np.integer)):
        return torch.full((num_images,), class_to_index(class_labels, class_names, num_classes))
    labels = [class_to_index(c, class_names, num_classes) for c in list(class_labels)]
    if len(labels) != num_images:
        raise ValueError(f"got {len(labels)} class labels for {num_images} images")
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
        raise ValueError(f"class index {label} out of range 0..{num_classes - 1}")
    key = normalise_class_name(label)
    if key.isdigit():
        return class_to_index(int(key), class_names, num_classes)
    for i, name in enumerate(class_names or ()):
        if key in (normalise_class_name(name), normalise_class_name(name) + "s"):
            return i
    raise ValueError(f"unknown class {label!r}; choose from: {', '.join(class_names or map(str, range(num_classes)))}")


def postprocess(images: torch.Tensor, output_type: str):
    """[-1, 1] NCHW -> PIL list, float NHWC numpy in [0, 1], or float NCHW tensor in [0, 1]."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
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
            raise ValueError(
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


def remote_code_files(pipe) -> dict[str, Path]:
    """Path in the saved folder -> the source file copied there: the pipeline's module and this helper at the
    root, each custom component's module in its own folder."""
    helper = Path(__file__)
    files = {source_file(type(pipe)).name: source_file(type(pipe)), helper.name: helper}
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


class BloodPipelineMixin:
    """Makes plain `save_pretrained(folder)` write a folder that `DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)` loads: model_index.json names `[module, class]` and the code is copied along.

    `remote_code_modules` maps each custom component to the file stem its code is shipped as (unique per
    model family: diffusers caches remote code by file name). `pipe.push_to_hub(repo_id)` publishes through
    bloodgen_hf (with a sample grid and a model card) when it is installed, else as diffusers does.
    """

    remote_code_modules: dict[str, str] = {}

    def to_json_string(self) -> str:
        """model_index.json as diffusers writes it, with the remote-code entries of `remote_code_index` and
        without `_name_or_path` (where it was loaded from means nothing in a saved folder or on the Hub)."""
        index = json.loads(super().to_json_string())
        index.pop("_name_or_path", None)
        index.update(remote_code_index(self))
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """save_pretrained writes model_index.json last, through here, and uploads after it when asked: the
        code goes in first, so the folder (and whatever is pushed) is complete."""
        os.makedirs(save_directory, exist_ok=True)
        write_remote_code(self, save_directory)
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        try:
            from bloodgen_hf.hub import push_to_hub
        except ModuleNotFoundError as err:  # loaded as remote code: diffusers' push, through save_pretrained
            if err.name != "bloodgen_hf":
                raise
            return super().push_to_hub(repo_id, **kwargs)
        return push_to_hub(self, repo_id, **kwargs)
