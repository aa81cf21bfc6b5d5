"""The README's project layout names every source file, and no module imports a layer above
its own (lazy imports inside functions included)."""
import ast
import re

import pytest

from .conftest import ROOT

FOLDERS = ("src/star_mamba", "benchmarks", "experiments")
SRC = ROOT / "src"


def layout_paths() -> set[str]:
    """Every path the README's layout block names: one entry per line, two spaces per level;
    description lines are indented further and name nothing."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Project layout"):]
    block = section.split("```")[1]
    names, stack = set(), []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        token = line.split()[0]
        if indent % 2 or indent // 2 > len(stack) or not re.fullmatch(r"[\w.\-/]+/|[\w.\-]+\.\w+",
                                                                      token):
            continue
        del stack[indent // 2:]
        path = "/".join([*stack, token.rstrip("/")])
        names.add(path)
        if token.endswith("/"):
            stack.append(token.rstrip("/"))
    return names


def source_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for folder in FOLDERS
            for p in (ROOT / folder).rglob("*.py") if p.name != "__init__.py"}


def test_the_layout_names_every_source_file_and_only_files_that_exist():
    named = layout_paths()
    assert {"src/star_mamba/ops/scan.py", "src/star_mamba/tools/arm/keys.py"} <= named  # the parser
    assert not source_files() - named, "files missing from the README's layout"
    stale = {p for p in named if p.endswith(".py") and not (ROOT / p).is_file()}
    assert not stale, "the README's layout names files that do not exist"


LAYERS = {"ops": 0, "sequence": 1, "models": 2, "data": 3, "evaluation": 4, "engine": 5,
          "tasks": 6, "tools": 7, "cli": 7, "__main__": 8}
"""star_mamba's layers, bottom up; config, errors, seeding and checkpoint are below them all."""
LOW = {"config", "errors", "seeding", "checkpoint", ""}


def imported_layers(path) -> set[str]:
    """The top-level star_mamba modules ``path`` imports, absolute or relative, anywhere."""
    parts = path.relative_to(SRC).with_suffix("").parts  # ('star_mamba', 'models', 'io')
    package = parts[:-1] if path.name != "__init__.py" else parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = [*base, *(node.module or "").split(".")] if node.module else list(base)
                if not node.module:  # from . import x, y: the names are modules
                    for alias in node.names:
                        found.add(([*base, alias.name] + [""])[1])
                    continue
            else:
                target = (node.module or "").split(".")
            if target and target[0] == "star_mamba":
                found.add(target[1] if len(target) > 1 else "")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                t = alias.name.split(".")
                if t[0] == "star_mamba":
                    found.add(t[1] if len(t) > 1 else "")
    return found


def test_no_module_imports_a_layer_above_its_own():
    upward = {}
    for path in sorted((SRC / "star_mamba").rglob("*.py")):
        rel = path.relative_to(SRC / "star_mamba").with_suffix("").parts
        if rel == ("__init__",):
            continue  # the package's front door re-exports the public API
        own = rel[0]
        if own in LOW:
            above = {m for m in imported_layers(path) if m in LAYERS}
        else:
            above = {m for m in imported_layers(path)
                     if m in LAYERS and LAYERS[m] > LAYERS[own]}
        if above:
            upward[path.relative_to(ROOT).as_posix()] = sorted(above)
    assert not upward


@pytest.mark.parametrize("text, expected", [("from ..engine import x", {"engine"}),
                                            ("from . import io", {"models"}),
                                            ("import star_mamba.tools.viz", {"tools"})])
def test_the_import_scan_sees_relative_and_absolute_imports(tmp_path, text, expected,
                                                            monkeypatch):
    monkeypatch.setattr(__import__(__name__, fromlist=["SRC"]), "SRC", tmp_path)
    path = tmp_path / "star_mamba" / "models" / "probe.py"  # a module of a package laid out
    path.parent.mkdir(parents=True)                         # as ours, outside the checkout
    path.write_text(text + "\n")
    assert imported_layers(path) == expected
