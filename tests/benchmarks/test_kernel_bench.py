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


def test_forward_mode_tiny() -> None:
    """--forward: the engine's mixed forward against the bare base, one row per density."""
    if not kernels.available():
        pytest.skip("no C compiler here")
    rows = kernel.forward(model="sparseshot-tiny", threads=1, models=2, densities=[0.05, 0.2], pairs=3)
    assert [r["density"] for r in rows] == [0.05, 0.2]
    for r in rows:
        assert r["many_over_base"] > 0 and r["q1"] <= r["many_over_base"] <= r["q3"]
        assert r["kernel_ms"] > 0  # the mixed forward went through the compiled kernel
    assert kernels.csr_add_rows.__name__ == "csr_add_rows"  # the timing wrapper is gone again
