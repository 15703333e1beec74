"""The service layers import downwards only: `app/` (API, services) never imports `worker/` (Celery).

A static scan of every module's import statements (also those inside functions), so a lazy
import cannot hide a dependency. No exception: what `sparseshot serve` and `sparseshot worker` need
of the worker reaches app/cli.py through its `sparseshot.cli` plugin (worker/cli.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported(path: Path) -> set[str]:
    """Top-level package names this module imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_app_does_not_import_worker() -> None:
    modules = sorted((ROOT / "app").rglob("*.py"))
    assert len(modules) > 20  # the scan sees the package
    offenders = [str(p.relative_to(ROOT)) for p in modules if "worker" in _imported(p)]
    assert offenders == [], f"app modules importing worker: {offenders}"


def test_the_scan_finds_lazy_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from worker.dispatch import CeleryQueue\n    import worker.tasks as t\n")
    assert "worker" in _imported(probe)
