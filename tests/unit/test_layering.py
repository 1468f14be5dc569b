"""Imports point one way: router -> workers -> policies; policies imports neither torch nor Ray."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "policies": {"torch", "ray", "workers", "router", "fla", "safetensors", "tokenizers"},
    "workers": {"router"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    offenders = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files}
    assert {f: bad for f, bad in offenders.items() if bad} == {}


def test_ray_only_in_router_and_the_worker_deployment():
    allowed = {ROOT / "workers" / "deployment.py"}
    for f in sorted((ROOT / "workers").rglob("*.py")):
        if f not in allowed:
            assert "ray" not in imported_roots(f), f
