"""benchmarks.kernel: a tiny run gives one row per shape and density with positive timings."""

from __future__ import annotations

import pytest

from benchmarks import kernel
from sparseshot import kernels


def test_kernel_bench_tiny() -> None:
    if not kernels.available():
        pytest.skip("no C compiler here")
    rows = kernel.run(threads=1, models=2, rows=5, densities=[0.01, 0.1], shapes=[(64, 32)], reps=2)
    assert [(r["out"], r["in"], r["density"]) for r in rows] == [(64, 32, 0.01), (64, 32, 0.1)]
    assert all(r["dense_ms"] > 0 and r["correction_ms"] > 0 for r in rows)
