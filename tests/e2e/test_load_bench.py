"""benchmarks/load.py for a few seconds on the embedded defaults: every operation runs, no server
errors, and the figures have the documented shape (the full figures come from the command line)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks import load

pytestmark = pytest.mark.slow


def test_load_smoke_embedded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "load.json"
    rc = load.main(["--modes", "embedded", "--clients", "4", "--tenants", "2", "--duration", "4",
                    "--max-requests", "5000", "--json", str(out)])
    result = json.loads(out.read_text())
    figures = result["modes"]["embedded"]
    assert load.server_errors(result) == 0 and rc == 0, json.dumps(figures["ops"], indent=1)
    assert set(figures["ops"]) == set(load.OPS)
    for op, s in figures["ops"].items():
        assert s["requests"] > 0 and s["ok"] > 0, (op, s)
        assert s["requests"] == s["ok"] + s["refused"] + s["errors"]
        assert 0 < s["p50_ms"] <= s["p99_ms"], (op, s)
    assert figures["requests"] == sum(s["requests"] for s in figures["ops"].values()) <= 5000
    assert sum(figures["jobs"].values()) == figures["ops"]["submit"]["ok"]  # every accepted job is there
    assert "embedded     poll" in capsys.readouterr().out


def test_recorder_stops_at_the_request_budget_and_the_deadline() -> None:
    rec = load.Recorder(max_requests=3, deadline=time.monotonic() + 600)
    assert [rec.take() for _ in range(5)] == [True, True, True, False, False]
    assert not load.Recorder(max_requests=100, deadline=time.monotonic() - 1).take()


def test_percentiles_are_nearest_rank() -> None:
    lat = [float(i) for i in range(1, 101)]  # 1..100 s
    assert load.percentile_ms(lat, 0.5) == 50_000 and load.percentile_ms(lat, 0.99) == 99_000
    assert load.percentile_ms([2.0], 0.99) == 2000 and load.percentile_ms([], 0.5) is None
