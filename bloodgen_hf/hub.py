"""Saving and loading pipelines: bundled models by name, folders by path, remote-code layout.

A saved pipeline folder is a complete Hugging Face repo: model_index.json naming
`[<pipeline module>, <class>]`, the pipeline's .py (and its helper) at the root, each custom
component's .py in its own folder, configs and safetensors weights. So
`DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` works without
bloodgen_hf. Inside bloodgen_hf we load the same folder with our own classes instead (no remote
code is executed).
"""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from diffusers import DiffusionPipeline

import pipelines
from bloodgen_hf.models import gan as gan_models
from pipelines import blood_pipeline_utils, pipeline_bloodgen_gan

BUNDLED_DIR = Path(__file__).parent / "weights"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class ModelLoadError(RuntimeError):
    """A model name or folder that cannot be loaded; the message names the file."""


@dataclass(frozen=True)
class PipelineSpec:
    """How one pipeline class is laid out on disk: its module and its custom components."""

    pipeline_class: type
    pipeline_module: ModuleType
    components: dict[str, tuple[str, type, ModuleType]]  # name -> (remote module name, class, source)


SPECS: dict[str, PipelineSpec] = {
    "BloodGANPipeline": PipelineSpec(
        pipelines.BloodGANPipeline,
        pipeline_bloodgen_gan,
        {"gan": ("bloodgen_gan_models", gan_models.ConditionalGenerator, gan_models)},
    ),
}


def bundled_models() -> dict[str, Path]:
    """Names of the models shipped inside the package -> their folders."""
    if not BUNDLED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED_DIR.iterdir()) if (p / "model_index.json").is_file()}


def resolve_model(name_or_path: str) -> Path:
    bundled = bundled_models()
    if name_or_path in bundled:
        return bundled[name_or_path]
    path = Path(name_or_path).expanduser()
    if not path.exists():
        names = ", ".join(bundled) or "none installed"
        raise ModelLoadError(f"no model {name_or_path!r}: not a bundled model ({names}) nor an existing folder")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path / 'model_index.json'} is missing: {path} is not a saved pipeline folder")
    return path


def read_model_index(folder: Path) -> dict:
    file = folder / "model_index.json"
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {file}: {err}") from err


def spec_for(index: dict, folder: Path) -> PipelineSpec:
    class_name = index.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    if class_name not in SPECS:
        raise ModelLoadError(
            f"{folder / 'model_index.json'}: unknown pipeline {class_name!r} (known: {', '.join(SPECS)})"
        )
    return SPECS[class_name]


def load_pipeline(name_or_path: str, device: str | torch.device = "cpu") -> DiffusionPipeline:
    """Load a bundled model by name or a saved folder by path, with bloodgen_hf's own classes."""
    folder = resolve_model(name_or_path)
    index = read_model_index(folder)
    spec = spec_for(index, folder)
    components = {}
    for name, (_, cls, _) in spec.components.items():
        components[name] = load_component(cls, folder / name)
    for name in index:
        if not name.startswith("_") and name not in components:
            components[name] = load_library_component(index[name], folder / name)
    pipe = spec.pipeline_class(**components)
    return pipe.to(device)


def load_component(cls: type, folder: Path):
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelLoadError(f"missing weights file {weights}")
    try:
        return cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
    except Exception as err:  # diffusers raises many types for bad files; name ours
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"corrupt or mismatched weights in {weights}: {reason}") from err


def load_library_component(entry: list, folder: Path):
    """A stock diffusers/transformers component (e.g. a scheduler) named in model_index.json."""
    library, class_name = entry
    module = __import__(library, fromlist=[class_name])
    cls = getattr(module, class_name)
    try:
        return cls.from_pretrained(folder)
    except Exception as err:
        raise ModelLoadError(f"cannot load {class_name} from {folder}: {err}") from err


def save_pipeline(pipe: DiffusionPipeline, folder: str | Path, with_code: bool = True) -> Path:
    """save_pretrained (safetensors) + the remote-code layout described in the module docstring."""
    folder = Path(folder)
    spec = SPECS[type(pipe).__name__]
    pipe.save_pretrained(folder, safe_serialization=True)
    index = read_model_index(folder)
    index["_class_name"] = [spec.pipeline_module.__name__.rsplit(".", 1)[-1], type(pipe).__name__]
    for name, (module_name, cls, _) in spec.components.items():
        index[name] = [module_name, cls.__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if with_code:
        write_remote_code(spec, folder)
    return folder


def write_remote_code(spec: PipelineSpec, folder: Path) -> None:
    """Copy the single source files from pipelines/ and bloodgen_hf/models/ into the repo layout."""
    for module in (spec.pipeline_module, blood_pipeline_utils):
        shutil.copyfile(inspect.getfile(module), folder / Path(inspect.getfile(module)).name)
    for name, (module_name, _, source) in spec.components.items():
        shutil.copyfile(inspect.getfile(source), folder / name / f"{module_name}.py")
