"""The architecture is enforced: import-linter contracts (pyproject.toml) hold."""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_import_contracts_hold():
    lint = shutil.which("lint-imports")
    assert lint, "import-linter is a test dependency"
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_router_uses_only_the_key_vocabulary_of_kvcache():
    """The gateway may speak kvcache's keys (and events), never reach into the store."""
    allowed = {"kvcache.keys", "kvcache.events"}
    offenders = []
    for path in (ROOT / "router").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "kvcache" and n not in allowed]
    assert not offenders, offenders
