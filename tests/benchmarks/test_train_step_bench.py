"""benchmarks.train_step --quick runs every row in its own process and writes the JSON shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import train_step


def test_quick_benchmark_writes_all_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "train_step.json"
    assert train_step.main(["--quick", "--threads", "1", "--jobs", "3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert isinstance(data["device"], str) and data["device"].startswith("cpu")
    for row in train_step.ROWS:
        assert set(data[row]) == {"step_s", "opt_s", "peak_mb"}, row
        assert data[row]["step_s"] > 0 and data[row]["peak_mb"] > 0, row
        assert 0 <= data[row]["opt_s"] < data[row]["step_s"], row
    for row in ("so", "so_ref_style", "adamw", "lora"):
        assert data[row]["opt_s"] > 0, row
    assert data["bound"]["opt_s"] == data["stock"]["opt_s"] == 0
    assert data["config"]["so.sparse_matrices"] == 16  # 4 matrices × 2 blocks × 2 towers
    assert data["config"]["timed_steps"] % train_step.REFRESH_EVERY == 0
    printed = capsys.readouterr().out
    assert "| so |" in printed and "so.step_s / bound.step_s" in printed


def test_rejects_unknown_row() -> None:
    with pytest.raises(SystemExit):
        train_step.main(["--quick", "--rows", "so,nope"])
