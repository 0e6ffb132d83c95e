"""Issue 32: the package's modules import each other without circles.

Every `import` / `from ... import` of every module of the installed packages (pyproject's list, with
bloodgen_hf.pipelines in pipelines/) is read with `ast`, at any depth: inside functions and `try` blocks too,
since an import moved into a function to dodge a circle is still a circle. The graph must have none.
"""

from __future__ import annotations

import ast
from pathlib import Path

from setuptools.config.pyprojecttoml import read_configuration

REPO_ROOT = Path(__file__).resolve().parents[1]

# No edge may close a circle (the remote-code pipelines no longer hand push_to_hub to the publisher).
OPTIONAL_EDGES: set[tuple[str, str]] = set()


def package_modules(root: Path, packages: list[str], package_dir: dict[str, str]) -> dict[str, tuple[Path, bool]]:
    """Module name -> (its file, whether it is a package's __init__) for each listed package's .py files."""
    modules = {}
    for package in packages:
        folder = root / package_dir.get(package, package.replace(".", "/"))
        for file in sorted(folder.glob("*.py")):
            is_init = file.stem == "__init__"
            modules[package if is_init else f"{package}.{file.stem}"] = (file, is_init)
    return modules


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """Module -> the modules of `modules` it imports (a name from a module counts as that module; a submodule
    imported by `from package import submodule` as the submodule)."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (file, is_init) in modules.items():
        package = name if is_init else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                found |= {known(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    found.add(submodule if submodule in modules else known(base))
        graph[name] = found - {None, name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each strongly connected group of modules (Tarjan), as [a, b, ..., a]."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:  # walk inside the group from its first module until a module repeats
        path = [min(group)]
        while path.count(path[-1]) < 2:
            path.append(min(graph[path[-1]] & group))
        found.append(path[path.index(path[-1]) :])
    return found


def bloodgen_graph() -> dict[str, set[str]]:
    config = read_configuration(REPO_ROOT / "pyproject.toml")["tool"]["setuptools"]
    graph = import_graph(package_modules(REPO_ROOT, config["packages"], config["package-dir"]))
    for a, b in OPTIONAL_EDGES:
        assert b in graph[a], f"{a} no longer imports {b}: remove the edge from OPTIONAL_EDGES"
        graph[a].discard(b)
    return graph


def test_the_package_has_no_import_circle():
    graph = bloodgen_graph()
    assert {"bloodgen_hf.registry", "bloodgen_hf.publish", "bloodgen_hf.model_card", "bloodgen_hf.provenance"} <= set(
        graph
    )
    found = cycles(graph)
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_registry_is_a_leaf_and_the_publisher_sits_on_top():
    """The registry (names -> folders, loading, saving) imports only the pipelines and models; nothing imports
    the publisher but the command line and the pipelines' optional hand-off."""
    graph = bloodgen_graph()
    assert all(m.startswith(("bloodgen_hf.pipelines", "bloodgen_hf.models")) for m in graph["bloodgen_hf.registry"])
    users = {m for m, imported in graph.items() if "bloodgen_hf.publish" in imported}
    assert users == {"bloodgen_hf.cli"}, users


def test_the_walk_finds_a_circle_hidden_in_a_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import x\n")
    (package / "b.py").write_text(
        "def x():\n    try:\n        from . import c\n    except ImportError:\n        pass\n"
    )
    (package / "c.py").write_text("import os\n\n\ndef y():\n    import pkg.a as a\n    return a\n")
    (package / "d.py").write_text("from pkg import a, c\n")
    graph = import_graph(package_modules(tmp_path, ["pkg"], {}))
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.c"},
        "pkg.c": {"pkg.a"},
        "pkg.d": {"pkg.a", "pkg.c"},
    }
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
