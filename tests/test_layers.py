"""Issue 20 item 2: the package's layers are a contract (``[tool.importlinter]`` in
pyproject.toml), checked here by the real ``lint-imports``: an upward import or a cycle between
sibling modules fails CI. And no module imports another module's private names."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "cxr_lung_risk"


def _lint_imports(cwd: Path, src_root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not os.path.exists(exe):
        pytest.fail("lint-imports is not installed (pip install -e '.[test]': import-linter)")
    env = dict(os.environ, PYTHONPATH=str(src_root))
    return subprocess.run([exe, "--no-cache", "--config", str(cwd / "pyproject.toml")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds_with_zero_cycles():
    p = _lint_imports(REPO, REPO / "src")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Contracts: 3 kept, 0 broken." in p.stdout, p.stdout


@pytest.mark.parametrize("module, line, summary", [
    # a cycle: the job runner importing the Ray adapter that is built on it (both contracts break)
    ("jobs.py", "from .cluster import RayEngine  # noqa\n", "Contracts: 1 kept, 2 broken."),
    # an upward import: the models importing the job runner (a layer broken, no cycle)
    ("engine.py", "from . import jobs  # noqa\n", "Contracts: 2 kept, 1 broken."),
    # a package's private module used from outside it
    ("pipeline.py", "from .dicom_io import _common  # noqa\n", "Contracts: 2 kept, 1 broken."),
])
def test_a_cycle_or_an_upward_import_breaks_the_contract(tmp_path, module, line, summary):
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(SRC, tmp_path / "src" / "cxr_lung_risk", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "src" / "cxr_lung_risk" / module
    text = target.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    target.write_text(head + sep + line + rest)
    p = _lint_imports(tmp_path, tmp_path / "src")
    assert p.returncode != 0, p.stdout
    assert summary in p.stdout, p.stdout
    assert "BROKEN" in p.stdout


def _private_imports() -> list[str]:
    """``from <another cxr_lung_risk module> import _name`` anywhere in the package."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            ours = node.level > 0 or (node.module or "").startswith("cxr_lung_risk")
            if not ours or node.module == "__future__":
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}")
    return found


def test_no_module_imports_another_modules_private_names():
    assert _private_imports() == []


def test_argparse_stays_in_the_cli():
    """The command line is the only module that knows argparse: every other module takes typed
    options (pydicom's ``cli/`` style: the Namespace never leaves it)."""
    users = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "argparse" or n.startswith("argparse.") for n in names):
                users.append(str(path.relative_to(SRC)))
    assert users == ["cli.py"], users
