"""The delta-size benchmark runs end to end on the tiny config and reports consistent figures."""

from __future__ import annotations

import json

from benchmarks import delta_size


def test_delta_size_quick(tmp_path, capsys) -> None:
    out = tmp_path / "delta.json"
    assert delta_size.main(["--model", "sparseshot-tiny", "--touched", "0.05", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    # Entries are drawn without replacement per tensor, so nnz is exact up to the per-tensor floor.
    assert 0.045 * r["trainable_entries"] <= r["nnz"] <= 0.05 * r["trainable_entries"]
    assert abs(r["density"] - r["nnz"] / r["trainable_entries"]) < 1e-9
    assert 0 < r["file_mb_fp16"] < r["file_mb_fp32"] < r["dense_fp32_mb"]
    assert "revert (bit-exact)" in capsys.readouterr().out
