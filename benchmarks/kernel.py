"""Serving-correction kernel against the base product, per linear layer of a ViT-B vision block.

For each layer shape and density: M models × R token rows (a mixed batch of M one-image requests
on ViT-B-32: 50 tokens each), the base product F.linear over all M·R rows against the compiled
kernel's corrections of all M models (`sparseshot.kernels.csr_add`, one call), best of N runs each,
side by side in one process.

    python -m benchmarks.kernel --threads 2 --models 8 --rows 50 --densities 0.005,0.02,0.05
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sparseshot import kernels

SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072))  # in_proj, out_proj, c_fc, c_proj (out, in)


def best_ms(fn: Callable[[], None], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _corrections(y: torch.Tensor, x: torch.Tensor, models: int, rows: int, density: float,
                 g: torch.Generator) -> list[kernels.Correction]:
    """One random Δ (out, in) of `density` per model, on that model's rows of x (M·R, in) / y."""
    out, inn = y.shape[1], x.shape[1]
    jobs = []
    for m in range(models):
        d = torch.zeros(out, inn)
        k = int(density * d.numel())
        d.view(-1)[torch.randperm(d.numel(), generator=g)[:k]] = torch.randn(k, generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            c = d.to_sparse_csr()
        crow, col = c.crow_indices().int(), c.col_indices().int()
        part = slice(m * rows, (m + 1) * rows)
        jobs.append(kernels.Correction(y[part], x[part], crow, col, c.values()))
    return jobs


def run(*, threads: int, models: int, rows: int, densities: Sequence[float],
        shapes: Sequence[tuple[int, int]], reps: int, seed: int = 0) -> list[dict[str, Any]]:
    if not kernels.available():
        raise SystemExit("no C compiler: the kernel is not built (torch.sparse.mm is used instead)")
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    out_rows = []
    for out, inn in shapes:
        w, x = torch.randn(out, inn, generator=g), torch.randn(models * rows, inn, generator=g)
        y = torch.zeros(models * rows, out)
        dense = best_ms(lambda: F.linear(x, w), reps)  # noqa: B023 - timed at once
        for d in densities:
            jobs = _corrections(y, x, models, rows, d, g)
            corr = best_ms(lambda: kernels.csr_add(jobs), reps)  # noqa: B023 - timed at once
            out_rows.append({"out": out, "in": inn, "density": d, "dense_ms": dense, "correction_ms": corr,
                             "ratio": corr / dense})
    return out_rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--rows", type=int, default=50, help="token rows per model")
    ap.add_argument("--densities", default="0.005,0.02,0.05")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", help="write the rows to this file")
    a = ap.parse_args(argv)
    rows = run(threads=a.threads, models=a.models, rows=a.rows, reps=a.reps, shapes=SHAPES,
               densities=[float(v) for v in a.densities.split(",")])
    print("| out × in | density | base product ms | corrections ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['out']}×{r['in']} | {r['density']:g} | {r['dense_ms']:.2f} | {r['correction_ms']:.2f} "
              f"| {r['ratio']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
