"""The import graph follows the layers of docs/ARCHITECTURE.md: a module
imports only its own package and packages on lower layers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import REPO


def _layers() -> dict[str, int]:
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("<!-- layers:", 1)[1]
    rows = re.findall(r"^\| (\d+) \| (\w+) \|", table, re.M)
    return {package: int(layer) for layer, package in rows}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_layer_table_names_every_package() -> None:
    layers = _layers()
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert set(layers) == packages


def test_no_module_imports_its_own_layer_or_above() -> None:
    layers = _layers()
    wrong = []
    for package, layer in layers.items():
        for path in sorted((REPO / package).rglob("*.py")):
            if "out" in path.relative_to(REPO).parts:  # benchmark output (its venvs)
                continue
            for other in _imports(path) & set(layers):
                if other != package and layers[other] >= layer:
                    wrong.append(f"{path.relative_to(REPO)} imports {other} "
                                 f"(layer {layers[other]} >= {layer})")  # fmt: skip
    assert not wrong, "\n".join(wrong)
