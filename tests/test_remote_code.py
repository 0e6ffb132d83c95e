"""Issue 13: plain `save_pretrained` writes the remote-code layout, the bundled folders load as remote code,
and the pipelines install as `bloodgen_hf.pipelines` (no top-level `pipelines` module). Issue 32: loaded so,
every bundled folder takes diffusers' class labels (`class_labels=[0, 1, 2]` gives 3 images, `id2label`) and knows
its image size (`resolution`).

Remote-code loading runs in a fresh interpreter where a meta-path blocker makes `bloodgen_hf` and
`pipelines` unimportable, as in a Python without bloodgen-hf; unlike `python -I -S` this works for an
editable install and a wheel install alike. One interpreter serves every job (importing torch is slow).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from setuptools import find_packages
from setuptools.config.pyprojecttoml import read_configuration

import tests.conftest as fixtures
from bloodgen_hf.pipelines.blood_pipeline_utils import remote_code_files
from bloodgen_hf.registry import BUNDLED_DIR, SPECS, bundled_models, family_of, load_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
SEEDS = [2, 7, 1, 8]
BUNDLED = sorted(bundled_models())  # every bundled pipeline, a future student included
LABELS = ["platelet", 0, "lymphocyte", 5]
BLOCKED = ("bloodgen_hf", "pipelines")

LOADER = r"""
import importlib.abc, json, shutil, sys

request = json.loads(open(sys.argv[1]).read())
BLOCKED = tuple(request["blocked"])


class Blocker(importlib.abc.MetaPathFinder):
    # Ahead of every other finder (the editable install's too): these packages do not exist here.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
for name in BLOCKED:
    try:
        __import__(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"import {name} worked")

import numpy as np
import torch
from diffusers import DiffusionPipeline

torch.set_num_threads(request["threads"])  # CPU kernels split work by thread count, which moves the last bit


def images(pipe, call):
    generators = [torch.Generator().manual_seed(s) for s in request["seeds"]]
    kwargs = {"class_labels": request["labels"], "generator": generators, "output_type": "np", **call}
    return pipe(num_images=len(generators), **kwargs).images


def load(source):
    pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
    components = {name: type(c).__module__ for name, c in pipe.components.items()}
    remote = type(pipe).__module__.startswith("diffusers_modules.")
    if not remote or not all(m.startswith(("diffusers_modules.", "diffusers.")) for m in components.values()):
        raise SystemExit(f"{source} was not loaded as remote code: {type(pipe).__module__}, {components}")
    return pipe


def label_conventions(pipe, call):
    # diffusers' class-conditional convention (DiTPipeline): a list of labels and no count, one image per label
    made = pipe(class_labels=[0, 1, 2], output_type="np", **call).images
    try:
        pipe(num_images=2, class_labels=[0, 1, 2], **call)
        mismatch = None
    except ValueError as err:
        mismatch = [type(err).__name__, str(err)]
    return {
        "shape": list(made.shape),
        "resolution": pipe.resolution,
        "id2label": pipe.id2label,
        "label_ids": pipe.get_label_ids(["platelet", "Basophil"]),
        "mismatch": mismatch,
    }


for job in request["jobs"]:
    pipe = load(job["source"])
    np.save(job["out"] + ".npy", images(pipe, job["call"]))
    if job.get("labels"):
        open(job["labels"], "w").write(json.dumps(label_conventions(pipe, job["call"])))
    if job.get("provenance"):  # what the remote code read from provenance.json
        open(job["provenance"], "w").write(json.dumps(pipe.config.provenance))
    if job.get("resave"):  # saving again needs no bloodgen_hf either
        pipe.save_pretrained(job["resave"])
        np.save(job["out"] + "-resaved.npy", images(load(job["resave"]), job["call"]))

if request.get("push"):  # diffusers' own push_to_hub, with the Hub calls recorded instead of sent
    import diffusers.utils.hub_utils as hub_utils

    push = request["push"]

    class Repo:
        repo_id = push["repo_id"]

    def upload_folder(repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, push["out"])
        return f"https://huggingface.co/{repo_id}/commit/0"

    hub_utils.create_repo = lambda repo_id, **kwargs: Repo()
    hub_utils.upload_folder = upload_folder
    pipe = load(push["source"])
    pipe.push_to_hub(push["repo_id"])
    np.save(push["out"] + ".npy", images(load(push["out"]), {}))

leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
if leaked:
    raise SystemExit(f"imported {leaked}")
print("all loaded as remote code")
"""


def tiny_pipeline(class_name: str):
    return getattr(fixtures, f"tiny_{family_of(SPECS[class_name])}_pipeline")()


def call_kwargs(pipe) -> dict:
    """Two denoising steps where a pipeline has steps: these tests are about loading, not quality."""
    return {"num_inference_steps": 2} if hasattr(pipe, "scheduler") else {}


def reference_images(pipe) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    kwargs = {"class_labels": LABELS, "generator": generators, "output_type": "np", **call_kwargs(pipe)}
    return pipe(num_images=len(SEEDS), **kwargs).images


def run_without_bloodgen_hf(work: Path, request: dict) -> None:
    """Run LOADER on `request` in a fresh interpreter, in a folder outside the repo, with no PYTHONPATH."""
    script, request_file = work / "load_remote.py", work / "request.json"
    script.write_text(LOADER)
    request_file.write_text(json.dumps({**request, "blocked": BLOCKED, "seeds": SEEDS, "labels": LABELS}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "PYTHON", "DIFFUSERS"))}
    env |= {"HF_HOME": str(work / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(request_file)], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "all loaded as remote code" in proc.stdout


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> dict:
    """Save each tiny pipeline with plain save_pretrained, then in one interpreter without bloodgen_hf: load it,
    save it again and load that, load each bundled folder, and push a loaded GAN with diffusers' push_to_hub."""
    work = tmp_path_factory.mktemp("remote")
    jobs, expected = [], {}
    for class_name in sorted(SPECS):
        pipe = tiny_pipeline(class_name)
        folder = work / class_name / "saved"
        pipe.save_pretrained(folder)
        expected[class_name] = reference_images(pipe)
        out, resave = work / class_name / "images", work / class_name / "resaved"
        jobs.append({"source": str(folder), "resave": str(resave), "out": str(out), "call": call_kwargs(pipe)})
    for family in BUNDLED:
        pipe = load_pipeline(family)
        expected[f"bundled-{family}"] = reference_images(pipe)
        out = str(work / f"bundled-{family}")
        call = call_kwargs(pipe)
        jobs.append({"source": str(BUNDLED_DIR / family), "out": out, "call": call, "labels": out + ".json"})
        jobs[-1]["provenance"] = out + "-provenance.json"
    push = {"source": str(work / "BloodGANPipeline" / "saved"), "repo_id": "org/tiny-gan", "out": str(work / "pushed")}
    run_without_bloodgen_hf(work, {"jobs": jobs, "push": push, "threads": torch.get_num_threads()})
    return {"work": work, "expected": expected}


@pytest.mark.parametrize("class_name", sorted(SPECS))
def test_plain_save_pretrained_writes_the_remote_code_layout(class_name, tmp_path):
    spec = SPECS[class_name]
    pipe = tiny_pipeline(class_name)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == [spec.pipeline_module.__name__.rsplit(".", 1)[-1], class_name]
    assert "_name_or_path" not in index
    sources = {spec.pipeline_module, sys.modules["bloodgen_hf.pipelines.blood_pipeline_utils"]}
    bases = [c for c in spec.pipeline_class.__mro__[1:] if c.__module__.startswith("bloodgen_hf.pipelines.pipeline_")]
    sources |= {sys.modules[c.__module__] for c in bases}  # a derived pipeline (LDM) ships the one it derives from
    expected = {Path(m.__file__).name: Path(m.__file__) for m in sources}
    for name, (module_name, cls, source) in spec.components.items():
        assert index[name] == [module_name, cls.__name__]
        expected[f"{name}/{module_name}.py"] = Path(source.__file__)
    assert remote_code_files(pipe) == expected
    for relative, source in expected.items():
        assert (tmp_path / relative).read_bytes() == source.read_bytes(), relative
    for name in pipe.components.keys() - spec.components.keys():  # the others are stock diffusers classes
        assert index[name][0] == "diffusers", (name, index[name])


@pytest.mark.parametrize("class_name", sorted(SPECS))
def test_plain_round_trip_without_bloodgen_hf(class_name, remote):
    images = remote["work"] / class_name / "images.npy"
    np.testing.assert_array_equal(np.load(images), remote["expected"][class_name], err_msg=class_name)


@pytest.mark.parametrize("class_name", sorted(SPECS))
def test_a_remote_code_pipeline_saves_the_same_layout_again(class_name, remote):
    saved, resaved = remote["work"] / class_name / "saved", remote["work"] / class_name / "resaved"
    np.testing.assert_array_equal(
        np.load(remote["work"] / class_name / "images-resaved.npy"), remote["expected"][class_name]
    )
    files = sorted(p.relative_to(saved) for p in saved.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(resaved) for p in resaved.rglob("*") if p.is_file())
    for relative in (f for f in files if f.suffix == ".py" or f.name == "model_index.json"):
        assert (resaved / relative).read_bytes() == (saved / relative).read_bytes(), relative
    for relative in (f for f in files if f.parent.name and f.suffix == ".json"):  # diffusers adds where it came from
        config = json.loads((resaved / relative).read_text())
        assert config.pop("_name_or_path", None) in (None, str(saved / relative.parent)), relative
        assert config == json.loads((saved / relative).read_text()), relative


@pytest.mark.parametrize("family", BUNDLED)
def test_bundled_folders_load_as_remote_code(family, remote):
    loaded = np.load(remote["work"] / f"bundled-{family}.npy")
    np.testing.assert_array_equal(loaded, remote["expected"][f"bundled-{family}"], err_msg=family)


@pytest.mark.parametrize("family", BUNDLED)
def test_bundled_folders_take_diffusers_class_labels_without_bloodgen_hf(family, remote):
    """DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)(class_labels=[0, 1, 2]) makes 3 images."""
    found = json.loads((remote["work"] / f"bundled-{family}.json").read_text())
    assert found["shape"] == [3, *remote["expected"][f"bundled-{family}"].shape[1:]]
    assert found["resolution"] == found["shape"][1] == found["shape"][2]  # known to the remote code, without sampling
    id2label = load_pipeline(family).id2label
    assert found["id2label"] == {str(i): name for i, name in id2label.items()} and len(id2label) == 8  # JSON: str keys
    assert found["label_ids"] == [7, 0]
    assert found["mismatch"][0] == "UsageError"  # the remote code's own, a ValueError, without bloodgen_hf
    assert found["mismatch"][1].startswith("got 3 class labels for 2 images: give one label per image")


@pytest.mark.parametrize("family", BUNDLED)
def test_bundled_folders_read_their_provenance_json_as_remote_code(family, remote):
    """Without bloodgen_hf the pipeline holds the whole record, read from provenance.json, not the summary."""
    found = json.loads((remote["work"] / f"bundled-{family}-provenance.json").read_text())
    assert found == load_pipeline(family).config.provenance and "file" not in found


def test_diffusers_push_of_a_remote_code_pipeline_uploads_a_loadable_repo(remote):
    """Without bloodgen_hf, pipe.push_to_hub falls back to diffusers' push, which saves through save_pretrained."""
    pushed, saved = remote["work"] / "pushed", remote["work"] / "BloodGANPipeline" / "saved"
    for relative in (
        "model_index.json",
        "pipeline_bloodgen_gan.py",
        "blood_pipeline_utils.py",
        "gan/bloodgen_gan_models.py",
    ):
        assert (pushed / relative).read_bytes() == (saved / relative).read_bytes(), relative
    assert (pushed / "README.md").is_file()
    np.testing.assert_array_equal(np.load(pushed.with_suffix(".npy")), remote["expected"]["BloodGANPipeline"])


@pytest.mark.parametrize("family", BUNDLED)
def test_bundled_folders_are_what_save_pretrained_writes(family, tmp_path):
    """Their model_index.json, provenance.json and code are the saver's, the code linked to (or, installed,
    copied from) the single source in pipelines/ and bloodgen_hf/models/; the weights are untouched."""
    bundled = BUNDLED_DIR / family
    pipe = load_pipeline(family)
    pipe.save_pretrained(tmp_path)
    for name in ("model_index.json", "provenance.json"):
        assert (tmp_path / name).read_text() == (bundled / name).read_text(), name
    for relative, source in remote_code_files(pipe).items():
        assert (bundled / relative).read_bytes() == source.read_bytes(), relative
        if (bundled / relative).is_symlink():
            assert (bundled / relative).resolve() == source.resolve(), relative


def test_a_custom_component_without_a_code_file_name_is_refused(tmp_path):
    pipe = fixtures.tiny_gan_pipeline()
    pipe.remote_code_modules = {}
    with pytest.raises(
        ValueError, match=r"cannot save component 'gan' \(bloodgen_hf\.models\.gan\.ConditionalGenerator"
    ):
        pipe.save_pretrained(tmp_path)
    assert not (tmp_path / "model_index.json").exists()


# --- the namespaced install ----------------------------------------------------------------------

FIND_SPECS = r"""
import importlib.util, json, sys
spec = importlib.util.find_spec("bloodgen_hf.pipelines")
print(json.dumps({"pipelines": importlib.util.find_spec("pipelines") is not None, "origin": spec and spec.origin}))
"""


def find_specs_outside_the_repo(cwd: Path, flags: tuple[str, ...] = (), prelude: str = "") -> dict:
    """Whether `pipelines` and where `bloodgen_hf.pipelines` are found by a fresh interpreter in `cwd`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    command = [sys.executable, *flags, "-c", prelude + FIND_SPECS]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_no_top_level_pipelines_module_is_installed(tmp_path):
    found = find_specs_outside_the_repo(tmp_path)
    assert not found["pipelines"], "a top-level `pipelines` module is importable outside the repo"
    assert found["origin"] and Path(found["origin"]).name == "__init__.py"
    owners = importlib.metadata.packages_distributions()
    assert "bloodgen-hf" not in owners.get("pipelines", []) and "bloodgen-hf" in owners["bloodgen_hf"]


def test_pyproject_lists_every_package():
    """package-dir needs an explicit package list: a new subpackage left out of it would be missing from wheels."""
    config = read_configuration(REPO_ROOT / "pyproject.toml")["tool"]["setuptools"]
    assert config["package-dir"] == {"bloodgen_hf.pipelines": "pipelines"}
    found = find_packages(str(REPO_ROOT), include=["bloodgen_hf", "bloodgen_hf.*"])
    assert sorted(config["packages"]) == sorted([*found, "bloodgen_hf.pipelines"])


INSTALLED = r"""
import json, sys
from pathlib import Path

target, site_dirs = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = [target]
sys.path.extend(site_dirs)  # torch, diffusers, ... as plain entries: no .pth file, so no editable install
import bloodgen_hf
import datasets
from PIL import Image

from bloodgen_hf.data import CLASS_NAMES
from bloodgen_hf.model_card import TEMPLATES_DIR, render_dataset_card, render_model_card
from bloodgen_hf.registry import bundled_models, load_pipeline

pipes = {name: load_pipeline(name) for name in bundled_models()}  # every weights file loads
provenance = {name: pipe.config.provenance for name, pipe in pipes.items()}
common = {"revision": "abc", "pipeline_class": "BloodDDPMPipeline", "family": "ddpm", "class_names": CLASS_NAMES}
common |= {"parameters": 10, "resolution": 28, "grid_per_class": 2}
card = render_model_card(repo_id="org/ddpm-fast", provenance=provenance["ddpm-fast"], **common)
features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))})
images = {"image": [Image.new("RGB", (28, 28))] * 3, "label": [0, 7, 7]}
dataset = datasets.Dataset.from_dict(images, features=features)
dataset_card = render_dataset_card(dataset, "org/synthetic", {"model": "ddpm-fast", "n": 3})
print(json.dumps({
    "package": bloodgen_hf.__file__, "templates": str(TEMPLATES_DIR), "models": sorted(pipes),
    "provenance": provenance, "model_card": str(card), "dataset_card": str(dataset_card),
}))
"""


def test_the_wheel_installs_the_pipelines_under_bloodgen_hf(tmp_path):
    """Build a wheel from a copy of the source (links kept, as in a checkout) and install it into a folder; from
    there alone (no checkout) it loads every bundled model, with its weights, code and provenance.json intact, and
    renders a model card and a dataset card offline."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("bloodgen_hf", "pipelines"):
        shutil.copytree(REPO_ROOT / name, source / name, symlinks=True, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    build = [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")]
    proc = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("bloodgen_hf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert {n.split("/")[0] for n in names} == {"bloodgen_hf", wheel.name.split("-py3")[0] + ".dist-info"}
        for relative in ("blood_pipeline_utils.py", "pipeline_bloodgen_gan.py", "__init__.py"):
            assert (
                archive.read(f"bloodgen_hf/pipelines/{relative}") == (REPO_ROOT / "pipelines" / relative).read_bytes()
            )
        weights = source / "bloodgen_hf" / "weights"
        bundled_code = sorted(weights.rglob("*.py"))
        assert {p.relative_to(weights).parts[0] for p in bundled_code} == set(bundled_models()), bundled_code
        for link in bundled_code:  # the file the link points to, not the link
            assert archive.read(link.relative_to(source).as_posix()) == link.read_bytes(), link

    target = tmp_path / "installed"
    proc = subprocess.run([*pip, "install", str(wheel), "--no-deps", "--target", str(target)], capture_output=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # -I -S: no cwd, no PYTHONPATH and no site .pth files, so not the editable install: only the wheel's files
    found = find_specs_outside_the_repo(tmp_path, ("-I", "-S"), f"import sys; sys.path.insert(0, {str(target)!r})\n")
    assert not found["pipelines"]
    assert Path(found["origin"]) == target / "bloodgen_hf" / "pipelines" / "__init__.py"

    installed = target / "bloodgen_hf"
    for file in sorted(p for p in (REPO_ROOT / "bloodgen_hf" / "weights").rglob("*") if p.is_file()):
        copy = installed / file.relative_to(REPO_ROOT / "bloodgen_hf")
        assert copy.is_file() and not copy.is_symlink() and copy.read_bytes() == file.read_bytes(), copy
    for template in sorted((REPO_ROOT / "bloodgen_hf" / "templates").glob("*.md")):
        assert (installed / "templates" / template.name).read_bytes() == template.read_bytes(), template.name

    site_dirs = [p for p in site.getsitepackages() if not Path(p).resolve().is_relative_to(REPO_ROOT)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "PYTHON", "DIFFUSERS"))}
    env |= {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-I", "-S", "-c", INSTALLED, str(target), json.dumps(site_dirs)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["package"]) == installed / "__init__.py" and Path(found["templates"]) == installed / "templates"
    assert found["models"] == sorted(bundled_models())
    assert found["provenance"] == {name: load_pipeline(name).config.provenance for name in bundled_models()}
    assert "# BloodMNIST diffusion model (DDPM): ddpm-fast" in found["model_card"]
    assert "Training data: split 'train' of bloodmnist at 28x28, 11,959 images; started from" in found["model_card"]
    assert "# Synthetic BloodMNIST: synthetic" in found["dataset_card"]
    assert "| 7 | platelet | 2 |" in found["dataset_card"]
