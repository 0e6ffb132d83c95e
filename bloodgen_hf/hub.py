"""Saving and loading pipelines: bundled models by name, folders by path, remote-code layout.

A saved pipeline folder is a complete Hugging Face repo: model_index.json naming
`[<pipeline module>, <class>]`, the pipeline's .py (and its helper) at the root, each custom
component's .py in its own folder, configs and safetensors weights. So
`DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` works without
bloodgen_hf. The pipelines' own `save_pretrained` writes that layout (see
bloodgen_hf/pipelines/blood_pipeline_utils.py, which ships with it, so a pipeline loaded as remote
code saves it too). Inside bloodgen_hf we load the same folder with our own classes instead (no
remote code is executed).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from bloodgen_hf.models import gan as gan_models
from bloodgen_hf.models import vae as vae_models
from bloodgen_hf.pipelines import BloodDDPMPipeline, BloodGANPipeline, BloodVAEPipeline

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
}


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


# --- publishing to the Hugging Face Hub -------------------------------------------------------

HUB_URL = "https://huggingface.co"
MAX_SHARD_BYTES = 500 * 2**20  # parquet shard size for pushed datasets


class HubError(RuntimeError):
    """Publishing failed (no token, the Hub refused, no network); the message is meant for the user as is."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str
    commit: str  # the commit with the weights and code, which the model card's usage snippet pins
    card_commit: str | None = None


def family_of(spec: PipelineSpec) -> str:
    """'gan' for pipelines/pipeline_bloodgen_gan.py: the name `bloodgen-hf train` knows the family by."""
    return spec.pipeline_module.__name__.rsplit(".", 1)[-1].removeprefix("pipeline_bloodgen_")


def count_parameters(pipe: DiffusionPipeline) -> int:
    return sum(p.numel() for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters())


def check_repo_id(repo_id: str) -> str:
    """Only 'org/name': a bare name would land in whichever account the token belongs to."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"bad repo id {repo_id!r}: {str(err).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"bad repo id {repo_id!r}: expected org/name")
    return repo_id


def resolve_token(token: str | None = None) -> str:
    """--token, else $HF_TOKEN or the token stored by `hf auth login`."""
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: pass --token, set HF_TOKEN or log in with `hf auth login`")
    return token


def network_errors() -> tuple[type[Exception], ...]:
    """OSError covers Hub HTTP errors and offline mode; failed connections raise the TransportError of
    huggingface_hub's HTTP client (httpx2 in huggingface_hub 2, httpx in 1), which is no OSError."""
    clients = [importlib.import_module(name) for name in ("httpx2", "httpx") if importlib.util.find_spec(name)]
    return (OSError, *(client.TransportError for client in clients))


@contextlib.contextmanager
def hub_errors(action: str):
    """Hub and network failures (HTTP errors, offline mode, no connection) as one HubError line."""
    try:
        yield
    except network_errors() as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubError(f"{action} failed: {reason}") from err


def push_to_hub(
    model: str | Path | DiffusionPipeline,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    grid_per_class: int = 8,
    grid_options: dict | None = None,
    device: str | torch.device = "cpu",
) -> PushResult:
    """Publish a pipeline (object, bundled name or folder) as a Hub repo that loads without bloodgen_hf.

    The repo is written by `save_pipeline` (weights + remote code), plus a sample grid and the
    folder's train_config.json / eval_results.json. Two commits: those files first, then README.md,
    whose usage snippet pins the first commit, so `trust_remote_code` runs exactly that code.
    `revision` is the branch to commit to (created if missing); `grid_options` go to the pipeline
    for the sample grid (e.g. num_inference_steps).
    """
    from bloodgen_hf.io import save_image
    from bloodgen_hf.model_card import (
        EVAL_RESULTS_NAME,
        SAMPLE_GRID_NAME,
        TRAIN_CONFIG_NAME,
        find_train_config,
        grid_image,
        read_eval_results,
        render_model_card,
        sample_images,
    )
    from bloodgen_hf.provenance import pipeline_provenance
    from bloodgen_hf.sampling import pipeline_class_names

    check_repo_id(repo_id)
    api = HfApi(token=resolve_token(token))
    folder = None if isinstance(model, DiffusionPipeline) else resolve_model(str(model))
    pipe = model if folder is None else load_pipeline(str(folder), device)
    if type(pipe).__name__ not in SPECS:
        raise ModelLoadError(f"cannot publish {type(pipe).__name__}: not a bloodgen pipeline ({', '.join(SPECS)})")
    spec = SPECS[type(pipe).__name__]
    train_config = find_train_config(folder) if folder else None
    eval_results = read_eval_results(folder) if folder else None
    with tempfile.TemporaryDirectory(prefix="bloodgen-push-") as tmp:
        repo = save_pipeline(pipe, Path(tmp) / "repo")
        images = sample_images(pipe, grid_per_class, **(grid_options or {}))
        class_names = pipeline_class_names(pipe)
        save_image(grid_image(images, grid_per_class, class_names), repo / SAMPLE_GRID_NAME)
        for name, content in ((TRAIN_CONFIG_NAME, train_config), (EVAL_RESULTS_NAME, eval_results)):
            if content is not None:
                (repo / name).write_text(json.dumps(content, indent=2) + "\n")
        with hub_errors(f"creating {repo_id} on the Hub"):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
        with hub_errors(f"uploading to {repo_id}"):
            files = api.upload_folder(
                repo_id=repo_id,
                folder_path=repo,
                revision=revision,
                commit_message=f"Upload {type(pipe).__name__}: weights, remote code, sample grid",
            )
        card = render_model_card(
            repo_id=repo_id,
            revision=files.oid,
            pipeline_class=type(pipe).__name__,
            family=family_of(spec),
            class_names=class_names,
            parameters=count_parameters(pipe),
            resolution=images.shape[1],
            grid_per_class=grid_per_class,
            train_config=train_config,
            eval_results=eval_results,
            provenance=pipeline_provenance(pipe),
        )
        card.save(Path(tmp) / "README.md")
        with hub_errors(f"uploading the model card to {repo_id}"):
            card_commit = api.upload_file(
                path_or_fileobj=str(Path(tmp) / "README.md"),
                path_in_repo="README.md",
                repo_id=repo_id,
                revision=revision,
                commit_message=f"Model card (usage pinned to {files.oid[:10]})",
            )
    return PushResult(repo_id, f"{HUB_URL}/{repo_id}", files.oid, card_commit.oid)


def push_dataset(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> PushResult:
    """Publish a dataset written by `bloodgen-hf sample --format hf-dataset` as parquet shards + a card:
    the layout `datasets.load_dataset(repo_id)` reads (the parquet files keep the image/ClassLabel features)."""
    from bloodgen_hf.model_card import render_dataset_card
    from bloodgen_hf.sampling import read_hf_dataset

    check_repo_id(repo_id)
    api = HfApi(token=resolve_token(token))
    dataset, info = read_hf_dataset(Path(folder))
    shards = max(1, math.ceil(dataset.data.nbytes / MAX_SHARD_BYTES))
    with tempfile.TemporaryDirectory(prefix="bloodgen-push-") as tmp:
        repo = Path(tmp)
        for i in range(shards):
            shard = repo / "data" / f"train-{i:05d}-of-{shards:05d}.parquet"
            dataset.shard(shards, i, contiguous=True).to_parquet(str(shard))
        render_dataset_card(dataset, repo_id, info).save(repo / "README.md")
        with hub_errors(f"creating dataset {repo_id} on the Hub"):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="dataset")
        with hub_errors(f"uploading to dataset {repo_id}"):
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=repo,
                repo_type="dataset",
                commit_message=f"Upload {len(dataset)} synthetic images from {info['model']}",
            )
    return PushResult(repo_id, f"{HUB_URL}/datasets/{repo_id}", commit.oid)
