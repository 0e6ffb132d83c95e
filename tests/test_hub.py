"""Issue 6: saved pipelines load as remote code without bloodgen_hf, and publish to the Hub.

Remote-code loading runs in a separate interpreter that cannot import bloodgen_hf or pipelines.
Publishing is tested against FakeHub, a recorded stand-in for huggingface_hub.HfApi (no network)
that keeps each repo's files per commit, so a pushed repo can be laid out as an offline HF cache
and loaded back.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import shlex
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import tests.conftest as fixtures
from bloodgen_hf import publish
from bloodgen_hf.cli import app
from bloodgen_hf.data import CLASS_NAMES
from bloodgen_hf.model_card import find_train_config, read_eval_results, training_command, write_eval_results
from bloodgen_hf.registry import SPECS, WEIGHTS_NAME, bundled_models, family_of, load_pipeline, save_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
SEEDS = [3, 1, 4, 1, 5]
LABELS = ["basophil", 3, "platelet", 7, 0]
TOKEN = "hf_test_token"

# Runs with `python -I -S`: no cwd, no PYTHONPATH, no site-packages .pth files (so no editable-install
# finder); the parent passes the site-packages folders to add as plain path entries.
LOADER = r"""
import importlib.util, json, sys
request = json.loads(sys.argv[1])
sys.path.extend(request["site"])
for name in ("bloodgen_hf", "pipelines"):
    if importlib.util.find_spec(name) is not None:
        raise SystemExit(f"{name} is importable: {importlib.util.find_spec(name).origin}")
try:
    import bloodgen_hf  # noqa: F401
    raise SystemExit("import bloodgen_hf worked")
except ModuleNotFoundError:
    pass
import numpy as np
import torch
from diffusers import DiffusionPipeline
torch.set_num_threads(request["threads"])  # CPU kernels split work by thread count, which moves the last bit
for i, job in enumerate(request["jobs"]):
    pipe = DiffusionPipeline.from_pretrained(job["source"], trust_remote_code=True, **job["load"])
    generators = [torch.Generator().manual_seed(s) for s in request["seeds"]]
    kwargs = {"class_labels": request["labels"], "generator": generators, "output_type": "np", **job["call"]}
    images = pipe(num_images=len(generators), **kwargs).images
    np.save(f"{request['out']}/{i}.npy", images)
    print("loaded", type(pipe).__module__, {k: type(v).__module__ for k, v in pipe.components.items()})
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("bloodgen_hf", "pipelines"))
if leaked:
    raise SystemExit(f"imported {leaked}")
"""


# --- helpers -------------------------------------------------------------------------------------


def tiny_pipeline(class_name: str):
    """Every registered pipeline needs a tiny builder in conftest, named after its family."""
    family = family_of(SPECS[class_name])
    builder = getattr(fixtures, f"tiny_{family}_pipeline", None)
    assert builder is not None, f"add tiny_{family}_pipeline() to tests/conftest.py to test {class_name} on the Hub"
    return builder()


def call_kwargs(pipe) -> dict:
    """Two denoising steps where a pipeline has steps: these tests are about loading, not quality."""
    return {"num_inference_steps": 2} if "num_inference_steps" in inspect.signature(pipe.__call__).parameters else {}


def reference_images(pipe, call: dict | None = None) -> np.ndarray:
    """The images the isolated loader draws: SEEDS and LABELS, with `call` (default: `call_kwargs`)."""
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    call = call_kwargs(pipe) if call is None else call
    return pipe(num_images=len(SEEDS), class_labels=LABELS, generator=generators, output_type="np", **call).images


def offline_cache(hf_home: Path, repo_id: str, snapshots: dict[str, Path], main: str) -> None:
    """The layout huggingface_hub's cache has: models--org--name/{snapshots/<sha>/..., refs/main}."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    for sha, files in snapshots.items():
        shutil.copytree(files, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(main)


def run_isolated(tmp_path: Path, hf_home: Path, jobs: list[dict]) -> list[np.ndarray]:
    """Load each job's source with DiffusionPipeline.from_pretrained in an interpreter without bloodgen_hf."""
    origin = Path(importlib.util.find_spec("bloodgen_hf").origin).resolve()
    if not origin.is_relative_to(REPO_ROOT):
        pytest.skip(f"bloodgen_hf is installed as a copy ({origin}); this test needs the editable install")
    site_dirs = [
        p for p in site.getsitepackages() if Path(p).is_dir() and not Path(p).resolve().is_relative_to(REPO_ROOT)
    ]
    out, cwd = tmp_path / "isolated_out", tmp_path / "elsewhere"
    out.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "PYTHON", "DIFFUSERS"))}
    env |= {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    request = {"site": site_dirs, "jobs": jobs, "seeds": SEEDS, "labels": LABELS, "out": str(out)}
    request["threads"] = torch.get_num_threads()
    script = tmp_path / "load_remote.py"
    script.write_text(LOADER)
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(script), json.dumps(request)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("loaded diffusers_modules.") == len(jobs), proc.stdout
    return [np.load(out / f"{i}.npy") for i in range(len(jobs))]


@dataclass
class Commit:
    oid: str
    commit_url: str


@dataclass
class FakeHub:
    """Stands in for huggingface_hub.HfApi: records every call, keeps each repo's files per commit."""

    calls: list[tuple[str, dict]] = field(default_factory=list)
    tokens: list[str | None] = field(default_factory=list)
    repos: dict[tuple[str, str], dict] = field(default_factory=dict)  # (type, id) -> {"private", "branches"}
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # oid -> the repo's files at that commit
    failure: tuple[str, Exception] | None = None  # (method, what it raises)

    def api(self, token: str | None = None, **_) -> FakeHub:
        self.tokens.append(token)
        return self

    def _record(self, name: str, **kwargs) -> None:
        self.calls.append((name, kwargs))
        if self.failure and self.failure[0] == name:
            raise self.failure[1]

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
        self._record("create_repo", repo_id=repo_id, private=private, exist_ok=exist_ok, repo_type=repo_type)
        self.repos.setdefault((repo_type or "model", repo_id), {"private": private, "branches": {"main": {}}})

    def create_branch(self, repo_id, *, branch, repo_type=None, exist_ok=False, **kwargs):
        self._record("create_branch", repo_id=repo_id, branch=branch, repo_type=repo_type)
        branches = self.repos[(repo_type or "model", repo_id)]["branches"]
        branches.setdefault(branch, dict(branches["main"]))

    def _commit(self, repo_id, repo_type, revision, files: dict[str, bytes]) -> Commit:
        branches = self.repos[(repo_type or "model", repo_id)]["branches"]  # KeyError: repo never created
        state = {**branches[revision or "main"], **files}  # KeyError: branch never created
        oid = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in state.items())).encode())
        branches[revision or "main"] = self.commits[oid.hexdigest()] = state
        return Commit(oid.hexdigest(), f"https://huggingface.co/{repo_id}/commit/{oid.hexdigest()}")

    def upload_folder(self, *, repo_id, folder_path, revision=None, repo_type=None, commit_message=None, **kwargs):
        self._record("upload_folder", repo_id=repo_id, revision=revision, repo_type=repo_type, message=commit_message)
        root = Path(folder_path)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        return self._commit(repo_id, repo_type, revision, files)

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, revision=None, repo_type=None, **kwargs):
        self._record("upload_file", repo_id=repo_id, path_in_repo=path_in_repo, revision=revision, repo_type=repo_type)
        return self._commit(repo_id, repo_type, revision, {path_in_repo: Path(path_or_fileobj).read_bytes()})

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        return self.repos[(repo_type, repo_id)]["branches"][revision]

    def write_snapshot(self, oid: str, folder: Path) -> Path:
        for name, content in self.commits[oid].items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(content)
        return folder


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(publish, "HfApi", fake.api)
    return fake


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))


def gan_train_config(folder: Path) -> dict:
    """The train_config.json the training core writes, as for the real run in runs/gan-28."""
    from bloodgen_hf.training.core import TrainConfig

    config = TrainConfig(output_dir=str(folder.parent), data_dir="../shared/data", epochs=15, log_every=50)
    config.extra = {"loss": "hinge", "latent_dim": 16, "base_channels": 8, "spectral_norm": False, "diffaugment": ""}
    (folder / "train_config.json").write_text(json.dumps(config.__dict__, indent=2))
    return json.loads(json.dumps(config.__dict__))  # as read back: JSON has lists where the config has tuples


# --- remote code ---------------------------------------------------------------------------------


def test_remote_module_names_are_unique_per_model():
    """diffusers caches remote code by file name, so two models shipping the same name would collide."""
    names = []
    for class_name, spec in SPECS.items():
        family = family_of(spec)
        own = [spec.pipeline_module.__name__.rsplit(".", 1)[-1], *(m for m, _, _ in spec.components.values())]
        assert all(family in name for name in own), (class_name, own)
        names += own
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("class_name", sorted(SPECS))
def test_saved_code_is_the_single_source(class_name, tmp_path):
    spec = SPECS[class_name]
    folder = save_pipeline(tiny_pipeline(class_name), tmp_path / "repo")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == [spec.pipeline_module.__name__.rsplit(".", 1)[-1], class_name]
    copies = {folder / Path(inspect.getfile(spec.pipeline_module)).name: spec.pipeline_module}
    copies |= {folder / name / f"{module}.py": source for name, (module, _, source) in spec.components.items()}
    for copy, source in copies.items():
        assert copy.read_bytes() == Path(inspect.getfile(source)).read_bytes()
    for name, (module, cls, _) in spec.components.items():
        assert index[name] == [module, cls.__name__]
        assert (folder / name / WEIGHTS_NAME).is_file()
    # no second, drifting copy of the remote-code modules anywhere in the source tree: the bundled folders
    # hold links to the single source (copied into wheels)
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    pipeline_file = REPO_ROOT / "pipelines" / Path(inspect.getfile(spec.pipeline_module)).name
    sources = {
        pipeline_file.name: pipeline_file,
        "blood_pipeline_utils.py": pipeline_file.with_name("blood_pipeline_utils.py"),
    }
    for _, (module, _, source) in spec.components.items():
        sources[f"{module}.py"] = REPO_ROOT / "bloodgen_hf" / "models" / Path(inspect.getfile(source)).name
    found = [REPO_ROOT / f for f in listed.stdout.splitlines() if Path(f).name in sources]
    copied = [f for f in found if f.resolve() != sources[f.name].resolve()]
    assert not copied, f"copies of remote-code modules (link them to the source instead): {copied}"
    assert [f for f in found if f.name == pipeline_file.name and not f.is_symlink()] == [pipeline_file]


def test_every_pipeline_loads_without_bloodgen_hf_from_folder_and_offline_hub_cache(fake_hub, tmp_path):
    """A fresh interpreter without bloodgen_hf loads each registered pipeline from (a) a saved folder and
    (b) a pushed repo id in an offline HF cache, at the commit the model card pins and at main after a
    second push, and reproduces the in-package images bit for bit. One interpreter serves all pipelines."""
    hf_home, jobs, expected = tmp_path / "hf_home", [], []
    for class_name in sorted(SPECS):
        pipe, work = tiny_pipeline(class_name), tmp_path / class_name
        folder = save_pipeline(pipe, work / "saved")
        original = reference_images(pipe)
        np.testing.assert_array_equal(reference_images(load_pipeline(str(folder))), original, err_msg=class_name)

        repo_id, call = f"bloodgen-test/tiny-{family_of(SPECS[class_name])}", call_kwargs(pipe)
        first = publish.push_to_hub(str(folder), repo_id, token=TOKEN, grid_per_class=1, grid_options=call)
        pinned = pinned_revision(fake_hub.files(repo_id)["README.md"])
        assert pinned == first.commit
        retrained = perturbed(tiny_pipeline(class_name))
        second = publish.push_to_hub(retrained, repo_id, token=TOKEN, grid_per_class=1, grid_options=call)
        snapshots = {oid: fake_hub.write_snapshot(oid, work / oid) for oid in (pinned, second.card_commit)}
        offline_cache(hf_home, repo_id, snapshots, main=second.card_commit)

        jobs += [
            {"source": str(folder), "load": {}, "call": call},
            {"source": repo_id, "load": {"revision": pinned}, "call": call},
            {"source": repo_id, "load": {}, "call": call},
        ]
        retrained_images = reference_images(retrained)
        assert not np.array_equal(retrained_images, original)  # so main and the pinned commit differ
        expected += [
            (class_name, "folder", original),
            (class_name, "pinned", original),
            (class_name, "main", retrained_images),
        ]

    for (class_name, source, images), loaded in zip(expected, run_isolated(tmp_path, hf_home, jobs)):
        np.testing.assert_array_equal(loaded, images, err_msg=f"{class_name} from {source}")


def test_the_bundled_few_step_student_loads_as_remote_code_at_1_and_4_steps(tmp_path):
    """The bundled student (issue 14) is a BloodDDPMPipeline folder like the others: an interpreter without
    bloodgen_hf loads it with trust_remote_code and draws the in-package images bit for bit."""
    folder, pipe = bundled_models()["ddpm-fast"], load_pipeline("ddpm-fast")
    calls = [{"num_inference_steps": steps} for steps in (1, 4)]
    jobs = [{"source": str(folder), "load": {}, "call": call} for call in calls]
    expected = [reference_images(pipe, call) for call in calls]
    assert not np.array_equal(*expected)  # the step count reaches the sampler
    for steps, images, loaded in zip((1, 4), expected, run_isolated(tmp_path, tmp_path / "hf_home", jobs)):
        np.testing.assert_array_equal(loaded, images, err_msg=f"{steps} step(s)")


def pinned_revision(readme: bytes) -> str:
    """The revision the model card's usage snippet pins."""
    return ModelCard(readme.decode()).text.split('revision="')[1].split('"')[0]


def perturbed(pipe):
    """The same architecture with other weights, as a later training run would give."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for p in component.parameters():
                    p.add_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return pipe


# --- publishing ----------------------------------------------------------------------------------


def test_push_uploads_weights_code_grid_and_card(tiny_gan_dir, fake_hub):
    train_config = gan_train_config(tiny_gan_dir)
    metrics = [{"type": "fid", "value": 41.25, "name": "FID (Inception-v3)"}, {"type": "kid", "value": 0.0312}]
    write_eval_results(tiny_gan_dir, metrics, split="test", num_generated=1000)

    result = publish.push_to_hub(str(tiny_gan_dir), "bloodgen-test/tiny-gan", private=True, token=TOKEN)

    assert fake_hub.tokens == [TOKEN]
    assert [name for name, _ in fake_hub.calls] == ["create_repo", "upload_folder", "upload_file"]
    assert fake_hub.calls[0][1] == {
        "repo_id": "bloodgen-test/tiny-gan",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    assert fake_hub.calls[2][1]["path_in_repo"] == "README.md"
    pushed = fake_hub.commits[result.commit]  # weights and code: the commit the card pins
    assert sorted(pushed) == [
        "blood_pipeline_utils.py",
        "eval_results.json",
        "gan/bloodgen_gan_models.py",
        "gan/config.json",
        "gan/diffusion_pytorch_model.safetensors",
        "model_index.json",
        "pipeline_bloodgen_gan.py",
        "samples.png",
        "train_config.json",
    ]
    assert pushed["pipeline_bloodgen_gan.py"] == (REPO_ROOT / "pipelines" / "pipeline_bloodgen_gan.py").read_bytes()
    snapshot = fake_hub.write_snapshot(result.commit, Path(tiny_gan_dir.parent / "snapshot"))
    weights = "gan/diffusion_pytorch_model.safetensors"
    for name, tensor in load_file(tiny_gan_dir / weights).items():
        assert torch.equal(load_file(snapshot / weights)[name], tensor)
    grid = Image.open(snapshot / "samples.png")
    side = 3 * (8 * 30 + 2)  # 8 x 8 images of 28 px with 2 px padding, enlarged 3 times
    assert grid.height == side and side < grid.width < side + 200  # plus the class names on the left

    main = fake_hub.files("bloodgen-test/tiny-gan")
    assert set(main) == set(pushed) | {"README.md"} and result.card_commit != result.commit
    card = ModelCard(main["README.md"].decode())
    assert card.data.license == "apache-2.0" and card.data.library_name == "diffusers"
    assert {"bloodmnist", "gan", "image-generation"} <= set(card.data.tags)
    assert card.data.datasets == ["albertvillanova/medmnist-v2"]
    measured = {(r.metric_type, r.metric_value, r.dataset_split) for r in card.data.eval_results}
    assert measured == {("fid", 41.25, "test"), ("kid", 0.0312, "test")}
    assert f'revision="{result.commit}"' in card.text and "trust_remote_code=True" in card.text
    assert "![" in card.text and "(samples.png)" in card.text
    assert training_command("gan", train_config) in card.text
    assert all(name in card.text for name in CLASS_NAMES)


def test_push_a_pipeline_object_to_a_branch(fake_hub):
    pipe = fixtures.tiny_gan_pipeline()
    result = publish.push_to_hub(pipe, "bloodgen-test/tiny-gan", revision="v1", token=TOKEN)
    names = [name for name, _ in fake_hub.calls]
    assert names == ["create_repo", "create_branch", "upload_folder", "upload_file"]
    assert fake_hub.calls[1][1]["branch"] == "v1"
    assert all(kwargs["revision"] == "v1" for name, kwargs in fake_hub.calls if name.startswith("upload"))
    files = fake_hub.files("bloodgen-test/tiny-gan", revision="v1")
    assert "train_config.json" not in files and "eval_results.json" not in files
    assert fake_hub.files("bloodgen-test/tiny-gan") == {}  # main untouched
    card = ModelCard(files["README.md"].decode())
    assert card.data.eval_results is None and "Not evaluated yet." in card.text
    assert "No training configuration was saved" in card.text
    assert result.url == "https://huggingface.co/bloodgen-test/tiny-gan"


def test_push_uploads_provenance_json_and_the_card_names_the_training_data(fake_hub, tmp_path):
    """The whole record goes up as provenance.json (model_index.json keeps its summary) and loads back from the
    pushed repo; a pipeline that holds only the summary is refused before anything is uploaded."""
    from bloodgen_hf.provenance import training_provenance

    start = {"model": "first", "provenance": training_provenance("bloodmnist", 28, "all", 80)}
    provenance = {**training_provenance("bloodmnist", 28, "train", 48), "init_from": start}
    pipe = fixtures.tiny_gan_pipeline()
    folder = save_pipeline(type(pipe)(**pipe.components, provenance=provenance), tmp_path / "gan")
    result = publish.push_to_hub(str(folder), "bloodgen-test/tiny-gan", token=TOKEN, grid_per_class=1)
    pushed = fake_hub.commits[result.commit]
    assert pushed["provenance.json"] == (folder / "provenance.json").read_bytes()
    summary = json.loads(pushed["model_index.json"])["provenance"]
    assert summary["file"] == "provenance.json" and summary["origins"] == {"init_from": "first"}
    snapshot = fake_hub.write_snapshot(result.commit, tmp_path / "snapshot")
    assert load_pipeline(str(snapshot)).config.provenance == provenance
    card = ModelCard(fake_hub.files("bloodgen-test/tiny-gan")["README.md"].decode())
    assert (
        "Training data: split 'train' of bloodmnist at 28x28, 48 images; started from first; the models it "
        "descends from were trained on split 'all' of bloodmnist." in " ".join(card.text.split())
    )

    summary_only = type(pipe)(**pipe.components, provenance=summary)  # as diffusers loads it from a Hub repo
    fake_hub.calls.clear()
    with pytest.raises(ValueError, match="holds only the summary of its training data"):
        publish.push_to_hub(summary_only, "bloodgen-test/other", token=TOKEN, grid_per_class=1)
    assert fake_hub.calls == []


def test_training_command_parses_back_to_the_same_config(tmp_path):
    """The card's command, fed to the GAN train script's parser, gives the run's config again."""
    import argparse

    from bloodgen_hf.training.core import add_train_arguments, config_from_args
    from bloodgen_hf.training.gan import add_gan_arguments

    (tmp_path / "pipeline").mkdir()
    saved = gan_train_config(tmp_path / "pipeline")
    words = shlex.split(training_command("gan", saved))
    assert words[:3] == ["bloodgen-hf", "train", "gan"]
    parser = add_gan_arguments(add_train_arguments(argparse.ArgumentParser()))
    parsed = json.loads(json.dumps(config_from_args(parser.parse_args(words[3:])).__dict__))  # as it is saved
    assert {k: v for k, v in parsed.items() if k != "extra"} == {k: v for k, v in saved.items() if k != "extra"}
    assert {k: parsed["extra"][k] for k in saved["extra"]} == saved["extra"]


def test_train_config_is_found_next_to_a_training_runs_pipeline(tmp_path):
    run = tmp_path / "runs" / "gan-28"
    (run / "pipeline").mkdir(parents=True)
    saved = gan_train_config(run)
    assert find_train_config(run / "pipeline") == saved
    (tmp_path / "runs" / "other").mkdir()
    assert find_train_config(tmp_path / "runs" / "other") is None
    (run / "pipeline" / "train_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="pipeline/train_config.json"):
        find_train_config(run / "pipeline")


@pytest.mark.parametrize(
    "metrics, problem",
    [
        ([], "non-empty list"),
        ([{"value": 1.0}], "needs a 'type'"),
        ([{"type": "fid", "value": float("nan")}], "finite"),
    ],
)
def test_eval_results_are_checked_when_written(metrics, problem, tmp_path):
    with pytest.raises(ValueError, match=problem):
        write_eval_results(tmp_path, metrics, split="test")
    assert not (tmp_path / "eval_results.json").exists()
    write_eval_results(tmp_path, [{"type": "fid", "value": 3.5}], split="test", num_generated=10, extractor="bloodnet")
    assert read_eval_results(tmp_path)["extractor"] == "bloodnet"


def test_cli_push(tiny_gan_dir, fake_hub):
    result = CliRunner().invoke(app, ["push", "--model", str(tiny_gan_dir), "--repo-id", "org/name", "--token", TOKEN])
    assert result.exit_code == 0, result.output
    assert "https://huggingface.co/org/name" in result.output
    assert "README.md" in fake_hub.files("org/name")


@pytest.mark.parametrize("repo_id", ["no-namespace", "org/na me", "a/b/c", "org/name--x"])
def test_cli_push_refuses_a_bad_repo_id(repo_id, tiny_gan_dir, fake_hub):
    result = CliRunner().invoke(app, ["push", "--model", str(tiny_gan_dir), "--repo-id", repo_id, "--token", TOKEN])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"error: bad repo id {repo_id!r}")
    assert fake_hub.calls == []


def test_cli_push_without_a_token(tiny_gan_dir, fake_hub, no_token):
    result = CliRunner().invoke(app, ["push", "--model", str(tiny_gan_dir), "--repo-id", "org/name"])
    assert result.exit_code == 2
    assert result.output.startswith("error: no Hugging Face token") and result.output.count("\n") == 1
    assert fake_hub.calls == []


def test_token_from_the_environment(tiny_gan_dir, fake_hub, no_token, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    publish.push_to_hub(str(tiny_gan_dir), "org/name")
    assert fake_hub.tokens == ["hf_from_env"]


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda d: (d / "gan" / WEIGHTS_NAME).unlink(), "gan/diffusion_pytorch_model.safetensors"),
        (lambda d: (d / "gan" / WEIGHTS_NAME).write_bytes(b"not safetensors"), "diffusion_pytorch_model"),
        (lambda d: (d / "model_index.json").unlink(), "model_index.json"),
        (lambda d: (d / "eval_results.json").write_text('{"split": "test", "metrics": []}'), "eval_results.json"),
    ],
)
def test_cli_push_refuses_an_incomplete_model_folder(damage, named, tiny_gan_dir, fake_hub):
    damage(tiny_gan_dir)
    result = CliRunner().invoke(app, ["push", "--model", str(tiny_gan_dir), "--repo-id", "org/name", "--token", TOKEN])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and named in result.output and result.output.count("\n") == 1
    assert fake_hub.calls == []


def forbidden() -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    message = "403 Forbidden: you have no write access to this namespace"
    return HfHubHTTPError(message, response=httpx2.Response(403, request=request))


@pytest.mark.parametrize(
    "failure, message",
    [
        (("create_repo", forbidden()), "creating org/name on the Hub failed: 403 Forbidden: you have no write access"),
        (("upload_folder", httpx2.ConnectError("Name or service not known")), "uploading to org/name failed: Name or"),
    ],
)
def test_cli_push_reports_hub_and_network_failures_in_one_line(failure, message, tiny_gan_dir, fake_hub):
    fake_hub.failure = failure
    result = CliRunner().invoke(app, ["push", "--model", str(tiny_gan_dir), "--repo-id", "org/name", "--token", TOKEN])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {message}") and result.output.count("\n") == 1


def test_pipeline_push_to_hub_is_diffusers_own_and_never_the_publisher(monkeypatch):
    """The pipelines do not import the publisher (no import circle): `pipe.push_to_hub` is diffusers' push;
    `publish.push_to_hub(pipe, ...)` is the one that renders this project's card."""
    from diffusers.utils import PushToHubMixin

    from tests.conftest import tiny_gan_pipeline

    calls = []
    monkeypatch.setattr(publish, "push_to_hub", lambda *a, **kw: calls.append("publisher"))
    monkeypatch.setattr(PushToHubMixin, "push_to_hub", lambda self, repo_id, **kw: calls.append(repo_id) or "ok")
    assert tiny_gan_pipeline().push_to_hub("org/name", private=True) == "ok"
    assert calls == ["org/name"]


def test_push_the_bundled_64_px_model_with_its_code_command_and_measured_scores(fake_hub, tmp_path):
    """The bundled ldm-64 goes to the Hub whole: both diffusers components, the three remote-code files, a 64 px
    grid, and a card with its training command and the 64 px protocol's scores from eval_results.json."""
    folder = bundled_models()["ldm-64"]
    result = publish.push_to_hub(str(folder), "bloodgen-test/ldm-64", token=TOKEN)
    pushed = fake_hub.commits[result.commit]
    for name in ("unet", "vae"):
        assert {f"{name}/config.json", f"{name}/diffusion_pytorch_model.safetensors"} <= set(pushed)
    assert {"pipeline_bloodgen_ldm.py", "pipeline_bloodgen_ddpm.py", "blood_pipeline_utils.py"} <= set(pushed)
    snapshot = fake_hub.write_snapshot(result.commit, tmp_path / "snapshot")
    side = 2 * (8 * 66 + 2)  # 8 x 8 images of 64 px with 2 px padding, enlarged twice
    assert Image.open(snapshot / "samples.png").height == side
    card = ModelCard(fake_hub.files("bloodgen-test/ldm-64")["README.md"].decode())
    assert json.loads((folder / "train_config.json").read_text())["command"] in card.text
    measured = {r.metric_type: r.metric_value for r in card.data.eval_results}
    recorded = json.loads((folder / "eval_results.json").read_text())["metrics"]
    assert measured["fd_bloodnet"] == next(m["value"] for m in recorded if m["type"] == "fd_bloodnet")
    assert "64x64" in card.text
