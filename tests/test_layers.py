"""DESIGN.md "Layers": imports point down only. Entry points -> training/, evaluation/ ->
common/, tokenizers/, diffusion/ -> data/. Function-level imports count too: hiding a circle
inside a function is still a circle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> packages it must never import (at module or function level)
FORBIDDEN = {
    "tokenizers": {"training", "evaluation"},
    "diffusion": {"training", "evaluation"},
    "data": {"training", "evaluation", "tokenizers", "diffusion"},
    "common": {"training", "evaluation"},
    "evaluation": {"training"},
    "training": {"evaluation"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_down_only(package):
    offences = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                for path in sorted((ROOT / package).rglob("*.py"))
                for name, line in imported_packages(path) if name in FORBIDDEN[package]]
    assert not offences, "\n".join(offences)


def test_the_layer_check_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from training.module import TokenizerModule\n")
    assert ("training", 2) in imported_packages(module)
