"""The ML library never pulls in the web service, the queue or the database layer."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("fastapi", "celery", "sqlalchemy", "app", "worker", "starlette", "kombu")

_SCRIPT = """
import importlib, json, pkgutil, sys
import sparseshot
names = ["sparseshot"]
for info in pkgutil.walk_packages(sparseshot.__path__, prefix="sparseshot."):
    importlib.import_module(info.name)
    names.append(info.name)
forbidden = %r
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(json.dumps({"imported": names, "forbidden_loaded": loaded}))
"""


def test_sparseshot_imports_no_service_modules() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT % (FORBIDDEN,)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"sparseshot.delta", "sparseshot.base", "sparseshot.classifier"} <= set(result["imported"])
    loaded = result["forbidden_loaded"]
    assert loaded == [], f"sparseshot imported service modules: {loaded}"
