"""The serving benchmark runs end to end on the tiny config, in-process and against `sparseshot serve`."""

from __future__ import annotations

import json

import pytest

from app.core.config import get_settings
from benchmarks import serving


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    for name in ("SPARSESHOT_DATA_DIR", "SPARSESHOT_BASE_MODEL", "SPARSESHOT_DEVICE",
                 "SPARSESHOT_DATABASE_URL", "SPARSESHOT_SERVING_QUEUE_IMAGES",
                 "SPARSESHOT_MAX_FILES_PER_REQUEST", "SPARSESHOT_MAX_DELTA_BYTES"):
        monkeypatch.delenv(name, raising=False)  # restored after the test; the benchmark sets them
    yield
    get_settings.cache_clear()


def test_serving_bench_quick(tmp_path, capsys) -> None:
    out = tmp_path / "serving.json"
    argv = ["--model", "sparseshot-tiny:random", "--concurrency", "2", "--images", "1,2",
            "--densities", "0.05", "--many", "3", "--zipf-models", "5", "--zipf-cache-models", "2",
            "--cold-models", "1", "--requests", "6", "--http-rows", "base,one,cold", "--http-images", "1,2",
            "--rounds", "2", "--json", str(out)]
    assert serving.main(argv) == 0
    r = json.loads(out.read_text())
    for mode, names in (("library", ["base", "one/0.05", "many/0.05", "zipf/0.05", "cold/0.05"]),
                        ("http", ["base", "one/0.05", "cold/0.05"])):
        for name in names:
            for per in (1, 2):
                row = r["rows"][f"{mode}/{name}/x{per}"]
                assert row["errors"] == 0 and row["img_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
                assert row["images_per_request"] == per and row["resident_mb"] > 0
    for name in ("library/one/0.05/x1", "library/many/0.05/x1", "library/zipf/0.05/x1", "http/one/0.05/x2"):
        extra = r["rows"][name]["extra"]  # measured beside a paired base
        assert extra["base_img_s"] > 0 and extra["base_errors"] == 0
    assert set(r["ratios"]) == {"one_over_base", "many_over_base", "zipf_over_base"}
    many = r["rows"]["library/many/0.05/x1"]
    assert r["ratios"]["many_over_base"] == pytest.approx(many["img_s"] / many["extra"]["base_img_s"])
    assert all(v > 0 for v in r["ratios"].values())
    assert r["config"]["prepared_mb"]["0.05"] > 0
    assert "| library/many/0.05/x1 |" in capsys.readouterr().out
