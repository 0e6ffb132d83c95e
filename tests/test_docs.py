"""The README, docs/, the model cards and experiments/README.md stay a manual whose links work: every relative
link and image resolves (anchors included), no machine's absolute paths leak in, the README stays short and keeps
the set-up block `.ci/run` reads, and git ignores nothing it tracks."""

import json
import re
import subprocess
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import read_configuration

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [ROOT / "README.md", ROOT / "experiments" / "README.md", *(ROOT / "docs").glob("*.md")]
    + list((ROOT / "model_cards").glob("*.md"))
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and with inline code reduced to its content."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`([^`]*)`", r"\1", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    found, seen = set(), {}
    for line in prose(path.read_text()).splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(doc):
    broken = []
    for target in relative_links(doc):
        file, _, anchor = target.partition("#")
        resolved = (doc.parent / file).resolve() if file else doc
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_absolute_machine_paths(doc):
    assert not re.findall(r"(?<![\w.])/(?:work|root|home|tmp)/\S*", doc.read_text())


def test_the_readme_is_a_short_manual_that_starts_with_the_two_set_up_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    first = lines.index("```bash")
    install, test = lines[first + 1 : first + 3]
    assert install.endswith("pip install -e . && bloodgen-hf sample --n 10000")
    assert test.endswith('pip install -e ".[dev]" && python -m pytest')  # .ci/run takes this line
    assert lines[first + 3] == "```"
    images = [t for t in relative_links(ROOT / "README.md") if re.search(r"\.(png|jpe?g|svg|gif)$", t)]
    assert all(t.startswith(("model_cards/images/", "docs/images/")) for t in images), images


def test_git_ignores_nothing_it_tracks():
    listed = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    assert listed.stdout == ""


def test_experiment_records_are_not_package_data():
    config = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]
    assert not [p for p in config["packages"] if p.split(".")[0] not in ("bloodgen_hf",)]
    assert set(config.get("package-data", {})) <= {"bloodgen_hf"}
    assert not [d for d in config.get("package-dir", {}).values() if d.startswith("experiments")]


def test_augmentation_tables_are_those_of_their_results():
    """Every table marked `augment-table` in the docs is what experiments/update_tables.py makes from its
    results.json today: edit the study, not the table."""
    from experiments import update_tables

    assert update_tables.main(["--check"]) == 0


def test_a_marked_table_is_rewritten_from_its_results(tmp_path):
    from experiments import update_tables

    def run(seed, setting, value):
        report = {"accuracy": value, "macro_f1": value, "precision": [value], "recall": [value], "f1": [value]}
        return {"setting": setting, "recipe": "2x", "fraction": 0.1, "seed": seed, "num_real": 10, "num_synthetic": 0,
                "confusion": [[1]], **report}  # fmt: skip

    runs = [run(0, "real", 0.5), run(1, "real", 0.7), run(0, "real+synthetic", 0.6)]
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    marker = f"<!-- augment-table results={tmp_path / 'results.json'} key=macro_f1 label=macro-F1 -->\n"
    text = update_tables.updated(f"before\n{marker}| stale |\n<!-- /augment-table -->\nafter")
    assert "| stale |" not in text and text.startswith("before\n") and text.endswith("<!-- /augment-table -->\nafter")
    assert "| macro-F1 | 10% real |" in text and "| real+synthetic (2x) | 0.600 ± 0.000 (+10.0) [seeds 0] |" in text
