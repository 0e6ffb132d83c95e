"""Publishing to the Hugging Face Hub: a pipeline as a model repo that loads without bloodgen_hf (weights,
remote code, provenance.json, a sample grid and a model card), and a sampled dataset as parquet shards with a
dataset card.

Models are found and saved by bloodgen_hf/registry.py; the cards are rendered by bloodgen_hf/model_card.py.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from bloodgen_hf.errors import UsageError
from bloodgen_hf.io import save_image
from bloodgen_hf.model_card import (
    EVAL_RESULTS_NAME,
    SAMPLE_GRID_NAME,
    TRAIN_CONFIG_NAME,
    find_train_config,
    grid_image,
    read_eval_results,
    render_dataset_card,
    render_model_card,
    sample_images,
)
from bloodgen_hf.provenance import pipeline_provenance
from bloodgen_hf.registry import SPECS, ModelLoadError, family_of, load_pipeline, resolve_model, save_pipeline
from bloodgen_hf.sampling import pipeline_class_names, read_hf_dataset

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


def count_parameters(pipe: DiffusionPipeline) -> int:
    return sum(p.numel() for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters())


def check_repo_id(repo_id: str) -> str:
    """Only 'org/name': a bare name would land in whichever account the token belongs to."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UsageError(f"bad repo id {repo_id!r}: {str(err).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise UsageError(f"bad repo id {repo_id!r}: expected org/name")
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

    The repo is written by `save_pipeline` (weights, remote code, provenance.json), plus a sample grid and the
    folder's train_config.json / eval_results.json. Two commits: those files first, then README.md,
    whose usage snippet pins the first commit, so `trust_remote_code` runs exactly that code.
    `revision` is the branch to commit to (created if missing); `grid_options` go to the pipeline
    for the sample grid (e.g. num_inference_steps).
    """
    check_repo_id(repo_id)
    api = HfApi(token=resolve_token(token))
    folder = None if isinstance(model, DiffusionPipeline) else resolve_model(str(model))
    pipe = model if folder is None else load_pipeline(str(folder), device)
    if type(pipe).__name__ not in SPECS:
        raise ModelLoadError(f"cannot publish {type(pipe).__name__}: not a bloodgen pipeline ({', '.join(SPECS)})")
    spec = SPECS[type(pipe).__name__]
    provenance = pipeline_provenance(pipe)  # refused here, before any upload, if only its summary was loaded
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
            provenance=provenance,
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
