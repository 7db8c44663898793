"""The package's layering (pyproject.toml's import-linter contracts) holds, and no library module
imports the recipes."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    lint_imports = shutil.which("lint-imports")
    assert lint_imports is not None, "import-linter is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run([lint_imports], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_library_module_imports_the_recipes():
    offenders = []
    for path in [*REPO.joinpath("upcycle").rglob("*.py"), *REPO.joinpath("mope").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {name}" for name in names if name.split(".")[0] == "recipes"]
    assert offenders == []


def test_no_library_module_is_over_500_lines():
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text().splitlines())
        for path in [*REPO.joinpath("upcycle").rglob("*.py"), *REPO.joinpath("mope").rglob("*.py")]
    }
    assert {name: lines for name, lines in sizes.items() if lines > 500} == {}
