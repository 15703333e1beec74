"""schemathesis (`--checks all`) against a live loopback server with a valid key, bounded to a few
examples per operation (`bash scripts/schemathesis.sh` is the full run).

The one kind of failure allowed: a schema-valid request refused for what a schema cannot say -
uploaded *content* that is not an image, a zip or a delta file (upload, classify and import), and a `label`
filter that is not one of that dataset's classes (the image listing). Anything else (a 5xx, an
undocumented status or content type, a schema-valid JSON body refused, a wrong Allow header...)
fails this test.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTENT_OPERATIONS = {"POST /v1/datasets/{dataset_id}/images", "POST /v1/models/{model_id}/classify",
                      "POST /v1/models/import", "GET /v1/datasets/{dataset_id}/images"}


@pytest.mark.slow
def test_schemathesis_finds_no_failure() -> None:
    pytest.importorskip("schemathesis")
    env = {**os.environ, "MAX_EXAMPLES": "8", "WORKERS": "1"}
    out = subprocess.run(["bash", "scripts/schemathesis.sh", "--exclude-path", "/readyz", "--no-color"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    text = out.stdout + out.stderr
    assert "generated" in text, text[-3000:]
    failures: list[tuple[str, str]] = []
    operation = ""
    for line in text.splitlines():
        head = re.match(r"^_+ (\S+ \S+) _+$", line)
        if head:
            operation = head.group(1)
        code = re.match(r"^- (ST\d+) ", line)
        if code:
            failures.append((operation, code.group(1)))
    unexpected = [f for f in failures if not (f[1] == "ST202" and f[0] in CONTENT_OPERATIONS)]
    assert not unexpected, text[-6000:]
    assert out.returncode == 0 or failures, text[-3000:]
