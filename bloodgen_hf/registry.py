"""The local model registry: bundled models by name, folders by path, Hub repos by id; loading and saving
pipelines in the remote-code layout.

A saved pipeline folder is a complete Hugging Face repo: model_index.json naming
`[<pipeline module>, <class>]`, the pipeline's .py (and its helper) at the root, each custom
component's .py in its own folder, configs and safetensors weights, and provenance.json, the data it
was trained on (model_index.json keeps a summary). So
`DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` works without
bloodgen_hf. The pipelines' own `save_pretrained` writes that layout (see
bloodgen_hf/pipelines/blood_pipeline_utils.py, which ships with it, so a pipeline loaded as remote
code saves it too). Inside bloodgen_hf we load the same folder with our own classes instead (no
remote code is executed).

A leaf of the package: it imports the pipelines and models only. Publishing to the Hub is
bloodgen_hf/publish.py; what the provenance means, bloodgen_hf/provenance.py.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from diffusers import DiffusionPipeline
from huggingface_hub.utils import HFValidationError, validate_repo_id

from bloodgen_hf.models import gan as gan_models
from bloodgen_hf.models import vae as vae_models
from bloodgen_hf.pipelines import BloodDDPMPipeline, BloodGANPipeline, BloodLDMPipeline, BloodVAEPipeline
from bloodgen_hf.pipelines.blood_pipeline_utils import PROVENANCE_NAME, is_provenance_summary, read_provenance_file

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


def pipeline_spec(pipeline_class: type, **components: tuple[type, ModuleType]) -> PipelineSpec:
    """The spec of a pipeline whose custom components are `name=(class, source module)`; the remote module
    names come from the pipeline class (`remote_code_modules`), which its save_pretrained uses."""
    names = pipeline_class.remote_code_modules
    if set(names) != set(components):
        named = f"{pipeline_class.__name__}.remote_code_modules names {sorted(names)}"
        raise ValueError(f"{named}, but its spec has the custom components {sorted(components)}")
    entries = {name: (names[name], cls, source) for name, (cls, source) in components.items()}
    return PipelineSpec(pipeline_class, sys.modules[pipeline_class.__module__], entries)


SPECS: dict[str, PipelineSpec] = {
    "BloodGANPipeline": pipeline_spec(BloodGANPipeline, gan=(gan_models.ConditionalGenerator, gan_models)),
    # UNet2DModel and the schedulers are stock diffusers classes: no remote code but the pipeline's.
    "BloodDDPMPipeline": pipeline_spec(BloodDDPMPipeline),
    "BloodVAEPipeline": pipeline_spec(BloodVAEPipeline, vae=(vae_models.ConditionalAutoencoderKL, vae_models)),
    # Its autoencoder is diffusers' own AutoencoderKL; the DDPM pipeline it derives from ships beside it.
    "BloodLDMPipeline": pipeline_spec(BloodLDMPipeline),
}


def family_of(spec: PipelineSpec) -> str:
    """'gan' for pipelines/pipeline_bloodgen_gan.py: the name `bloodgen-hf train` knows the family by."""
    return spec.pipeline_module.__name__.rsplit(".", 1)[-1].removeprefix("pipeline_bloodgen_")


def bundled_models() -> dict[str, Path]:
    """Names of the models shipped inside the package -> their folders."""
    if not BUNDLED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED_DIR.iterdir()) if (p / "model_index.json").is_file()}


def resolve_model(name_or_path: str) -> Path:
    """A bundled model's folder, a local folder, or a Hub repo id (`org/name`) downloaded to the HF cache."""
    bundled = bundled_models()
    if name_or_path in bundled:
        return bundled[name_or_path]
    path = Path(name_or_path).expanduser()
    if not path.exists() and looks_like_repo_id(name_or_path):
        path = download_repo(name_or_path)
    if not path.exists():
        names = ", ".join(bundled) or "none installed"
        raise ModelLoadError(f"no model {name_or_path!r}: not a bundled model ({names}) nor an existing folder")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path / 'model_index.json'} is missing: {path} is not a saved pipeline folder")
    return path


def looks_like_repo_id(name: str) -> bool:
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def download_repo(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # offline, no such repo, no access: all end the same way for the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"no local folder {repo_id!r}, and it could not be downloaded from the Hub: {reason}"
        ) from err


def load_pretrained_component(name_or_path: str, component: str, cls: type) -> torch.nn.Module:
    """One component of a saved pipeline (`component` "" = the folder is a single `cls` model, as BloodNet's)."""
    if not component:
        path = bundled_models().get(name_or_path) or BUNDLED_DIR / name_or_path
        if not (path / "config.json").is_file():
            path = Path(name_or_path).expanduser()
            if not path.exists() and looks_like_repo_id(name_or_path):
                path = download_repo(name_or_path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path / 'config.json'} is missing: {name_or_path!r} is not a saved {cls.__name__}")
        return load_component(cls, path)
    pipe = load_pipeline(name_or_path)
    found = getattr(pipe, component, None)
    if not isinstance(found, cls):
        raise ModelLoadError(
            f"{name_or_path!r} has no {cls.__name__} component {component!r}: it is a {type(pipe).__name__}"
        )
    return found


def read_model_index(folder: Path) -> dict:
    """The pipeline's config as it loads: model_index.json, with the provenance record it summarises read from
    provenance.json (`read_provenance`)."""
    file = folder / "model_index.json"
    try:
        index = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {file}: {err}") from err
    if not isinstance(index, dict):
        raise ModelLoadError(f"cannot read {file}: not a JSON object")
    if "provenance" in index:
        index["provenance"] = read_provenance(folder, index)
    return index


def read_provenance(folder: Path, index: dict | None = None) -> dict | None:
    """What a saved pipeline was trained on, the whole chain (bloodgen_hf/provenance.py): from provenance.json
    where model_index.json (`index`, read if not given) holds its summary; a folder saved before provenance.json
    holds the record in model_index.json itself. None when nothing is recorded."""
    if index is None:
        index = read_model_index(folder)
    provenance = index.get("provenance")
    if not is_provenance_summary(provenance):
        return provenance
    file = folder / PROVENANCE_NAME
    if not file.is_file():
        raise ModelLoadError(
            f"{file} is missing: {folder / 'model_index.json'} holds only a summary of the data the model was "
            f"trained on; copy {PROVENANCE_NAME} from where the model came from"
        )
    try:
        return read_provenance_file(file)
    except ValueError as err:
        raise ModelLoadError(str(err)) from err


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
    # Like diffusers: __init__ arguments without a default are components, the others plain settings.
    expected, optional = spec.pipeline_class._get_signature_keys(spec.pipeline_class)
    for name in expected:
        if name not in components:
            components[name] = load_library_component(index.get(name), folder / name)
    settings = {name: index[name] for name in optional if name in index}
    try:
        pipe = spec.pipeline_class(**components, **settings)
    except ValueError as err:
        raise ModelLoadError(f"{folder / 'model_index.json'}: {err}") from err
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


def load_library_component(entry: list | None, folder: Path):
    """A stock diffusers model or scheduler named in model_index.json (e.g. UNet2DModel, DDPMScheduler).

    Only diffusers' own model and scheduler classes are accepted: the file may come from anywhere.
    """
    import diffusers
    from diffusers import ModelMixin, SchedulerMixin

    index_file = folder.parent / "model_index.json"
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        raise ModelLoadError(f"{index_file}: component {folder.name!r} should be [library, class], got {entry!r}")
    library, class_name = entry
    cls = getattr(diffusers, class_name, None) if library == "diffusers" else None
    if not (isinstance(cls, type) and issubclass(cls, (ModelMixin, SchedulerMixin))):
        raise ModelLoadError(f"{index_file}: {library}.{class_name} is not a diffusers model or scheduler class")
    if issubclass(cls, ModelMixin):
        return load_component(cls, folder)
    try:
        return cls.from_pretrained(folder)
    except Exception as err:
        raise ModelLoadError(f"cannot load {class_name} from {folder}: {err}") from err


def save_pipeline(pipe: DiffusionPipeline, folder: str | Path) -> Path:
    """A bloodgen pipeline's save_pretrained (safetensors), which writes the remote-code layout itself."""
    if type(pipe).__name__ not in SPECS:
        raise ModelLoadError(f"cannot save {type(pipe).__name__}: not a bloodgen pipeline ({', '.join(SPECS)})")
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
