"""The package's layout holds: each subpackage imports only the layers below it
(docs/architecture.md), optional extras are never imported by ``import togembed``, and no
module or class grows past the size a reader can hold in mind."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "togembed"

# subpackage -> the togembed subpackages it may import (top-level modules are not layers)
ALLOWED = {
    "core": set(),
    "api": {"core"},
    "local": {"core"},
    "jobs": {"core", "api"},
    "server": {"core", "local"},
    "ray": {"core", "api", "jobs"},
    "cli": {"core", "api", "jobs", "server", "local", "ray"},
}
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 270  # "~250": the few above it are one concept that would not split well


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imported_subpackages(path: Path) -> set[str]:
    """The togembed subpackages a module imports (relative or absolute)."""
    own = list(path.relative_to(PACKAGE).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        target: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = own[: len(own) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "togembed":
                target = node.module.split(".")[1:]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "togembed":
                    target = alias.name.split(".")[1:]
        if target:
            found.add(target[0])
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = {}
    for path in _modules():
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2 or parts[0] != layer:
            continue
        bad = {t for t in _imported_subpackages(path) if t in ALLOWED and t != layer}
        bad -= ALLOWED[layer]
        if bad:
            wrong[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert not wrong, f"imports against the layering: {wrong}"


def test_importing_togembed_loads_no_optional_extra() -> None:
    code = (
        "import sys, togembed\n"
        "heavy = ('aiohttp.web', 'onnxruntime', 'pyarrow', 'ray', 'redis', 'tokenizers', 'click')\n"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_class_is_longer_than_a_reader_can_hold() -> None:
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    long[f"{path.relative_to(PACKAGE)}:{node.name}"] = size
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"
