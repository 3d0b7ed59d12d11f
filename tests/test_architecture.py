"""The package's import rules (docs/ARCHITECTURE.md), checked on the source, and every module imports."""
import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import distalign

ROOT = Path(distalign.__file__).parent


def imported_distalign_packages(path: Path) -> set[str]:
    """Second-level distalign packages a file imports (absolute or relative)."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(ROOT).parts[0] if len(path.relative_to(ROOT).parts) > 1 else ""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [f"distalign.{package}"]
            elif node.level >= 2:
                names = [f"distalign.{node.module}" if node.module else "distalign"]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "distalign" and len(parts) > 1:
                found.add(parts[1])
    return found


def package_files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package, forbidden", [
    ("objectives", {"config", "data", "models", "rewards", "training", "evaluation", "testbed", "cli", "demo"}),
    ("evaluation", {"training", "cli", "demo"}),
    ("testbed", {"cli", "demo"}),
    ("training", {"cli", "demo", "evaluation"}),
    ("models", {"training", "evaluation", "testbed", "cli", "demo"}),
    ("data", {"training", "evaluation", "testbed", "cli", "demo", "models"}),
    ("config", {"training", "evaluation", "testbed", "cli", "demo", "models", "data"}),
])
def test_imports_point_one_way(package, forbidden):
    for path in package_files(package):
        bad = imported_distalign_packages(path) & forbidden
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_nothing_imports_cli():
    for path in ROOT.rglob("*.py"):
        if path.parent.name == "cli" or path.name == "__main__.py":
            continue
        assert "cli" not in imported_distalign_packages(path), path


def test_every_module_imports():
    failures = []
    for info in pkgutil.walk_packages([str(ROOT)], prefix="distalign."):
        if info.name == "distalign.__main__":
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as err:
            # optional backends are import-guarded inside functions, never at module level
            failures.append(f"{info.name}: {err}")
    assert not failures, failures


def test_no_file_over_600_lines():
    long = [f"{p.relative_to(ROOT)} ({n})" for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600]
    assert not long, long
