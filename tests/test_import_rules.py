"""Layering: contract/ is pure and imports no side; agent/ and hub/ never import each other."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Modules whose use means I/O, a clock, randomness or a process: none of them in contract/.
IMPURE_MODULES = {
    "asyncio",
    "glob",
    "http",
    "httpx",
    "importlib.resources",
    "io",
    "multiprocessing",
    "onnxruntime",
    "os",
    "paho",
    "pathlib",
    "psutil",
    "random",
    "requests",
    "secrets",
    "shutil",
    "socket",
    "sqlite3",
    "sqlite_utils",
    "subprocess",
    "sys",
    "tempfile",
    "threading",
    "time",
    "urllib.request",  # urllib.parse only splits strings
    "urllib.robotparser",
}
IMPURE_BUILTINS = {"open", "print", "input", "exec", "eval", "__import__"}


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def is_under(module: str, roots: set[str]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def test_packages_exist() -> None:
    for package in ("contract", "agent", "hub"):
        assert python_files(package), f"{package}/ has no Python files"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("contract", {"agent", "hub"}), ("agent", {"hub"}), ("hub", {"agent"})],
)
def test_forbidden_cross_imports(package: str, forbidden: set[str]) -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in python_files(package)
        for line, module in imported_modules(path)
        if is_under(module, forbidden)
    ]
    assert not offenders, "\n".join(offenders)


def test_contract_does_no_io() -> None:
    offenders: list[str] = []
    for path in python_files("contract"):
        where = path.relative_to(ROOT)
        for line, module in imported_modules(path):
            if is_under(module, IMPURE_MODULES):
                offenders.append(f"{where}:{line} imports {module}")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in IMPURE_BUILTINS
            ):
                offenders.append(f"{where}:{node.lineno} calls {node.func.id}()")
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_an_offence(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os.path\nfrom hub.cli import main\n")
    modules = {module for _, module in imported_modules(sample)}
    assert is_under("os.path", IMPURE_MODULES)
    assert "hub.cli" in modules
    assert is_under("hub.cli.main", {"hub"})
