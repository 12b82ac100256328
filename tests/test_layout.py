"""The package's dependency rule, checked on the source: imports flow one way between the parts."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "deepcollapse"

# part -> parts it must never import
FORBIDDEN = {
    "measure": {"dufm", "theory", "nets", "experiments", "cli"},
    "dufm": {"theory", "nets", "experiments", "cli"},
    "theory": {"nets", "experiments", "cli"},
    "nets": {"experiments", "cli"},
    "experiments": {"cli"},
}


def _imports(path: Path) -> set[str]:
    """Every ``deepcollapse.<part>`` a module imports (at any indentation)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "deepcollapse" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_part_imports_only_below(part: str) -> None:
    bad = {
        f"{p.relative_to(PKG)} imports deepcollapse.{q}"
        for p in (PKG / part).rglob("*.py")
        for q in _imports(p) & FORBIDDEN[part]
    }
    assert not bad, sorted(bad)


def test_top_level_modules_import_no_part_above_them() -> None:
    for name in ("_validate.py", "files.py", "plots.py"):
        assert not _imports(PKG / name) - {"_validate"}, name


def test_import_pulls_no_cli_plotting_or_cluster_library() -> None:
    heavy = ("typer", "rich", "matplotlib", "ray")
    code = f"import sys, deepcollapse; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
