"""Serving-correction kernel against the base product, per linear layer of a ViT-B vision block.

For each layer shape and density: M models × R token rows (a mixed batch of M one-image requests
on ViT-B-32: 50 tokens each), the base product F.linear over all M·R rows against the compiled
kernel's corrections of all M models (`sparseshot.kernels.csr_add`, one call), best of N runs each,
side by side in one process.

    python -m benchmarks.kernel --threads 2 --models 8 --rows 50 --densities 0.005,0.02,0.05

With --forward MODEL, the whole vision forward of the serving engine instead
(`sparseshot.serving.ServingEngine.image_features`, random init): M images through the bare base
against M images of M distinct models (synthetic deltas of `density` over every SO-trained vision
matrix, as `benchmarks.serving` makes them), in `--pairs` back-to-back pairs; per density the
median of the pairs' ratios (base time ÷ mixed time), its quartiles, and the median time of the
kernel's calls in a mixed forward. No scheduler, decoding or HTTP: the engine alone.

    python -m benchmarks.kernel --forward ViT-B-32 --threads 2 --models 8 --densities 0.005,0.02,0.05
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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


@contextmanager
def _timed_kernel() -> Iterator[list[float]]:
    """Seconds spent in `kernels.csr_add_rows` (the engine's one kernel call per layer), summed
    into the yielded list's item 0 until the block ends."""
    spent = [0.0]
    inner = kernels.csr_add_rows

    def timed(*args: Any) -> None:
        t0 = time.perf_counter()
        inner(*args)
        spent[0] += time.perf_counter() - t0

    kernels.csr_add_rows = timed  # type: ignore[assignment]
    try:
        yield spent
    finally:
        kernels.csr_add_rows = inner  # type: ignore[assignment]


def forward(*, model: str, threads: int, models: int, densities: Sequence[float], pairs: int,
            seed: int = 0) -> list[dict[str, Any]]:
    """Per density: the engine's mixed forward of `models` models against the bare base (module doc)."""
    from benchmarks.serving import Config, synth_delta
    from sparseshot.base import load_base
    from sparseshot.delta import SparseDelta
    from sparseshot.recipe import trainable_weights
    from sparseshot.serving import ServingEngine, prepare

    torch.set_num_threads(threads)
    base = load_base(Config(model=model).spec)  # NAME means NAME:random, as in benchmarks.serving
    names = list(trainable_weights(base.model, encoder="vision"))
    engine = ServingEngine(base)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(models, 3, base.image_size, base.image_size, generator=g)
    bare = [(None, models)]
    out = []
    for i, d in enumerate(densities):
        mixed = [(prepare(base, SparseDelta.from_bytes(synth_delta(base, names, d, seed + 1000 * i + m))), 1)
                 for m in range(models)]
        engine.image_features(pixels, bare), engine.image_features(pixels, mixed)  # warm
        ratios, kernel_ms = [], []
        for _ in range(pairs):
            t0 = time.perf_counter()
            engine.image_features(pixels, bare)
            t1 = time.perf_counter()
            with _timed_kernel() as spent:
                engine.image_features(pixels, mixed)  # type: ignore[arg-type]
            ratios.append((t1 - t0) / (time.perf_counter() - t1))
            kernel_ms.append(spent[0] * 1e3)
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out.append({"density": d, "models": models, "pairs": pairs,
                    "many_over_base": statistics.median(ratios), "q1": q[0], "q3": q[2],
                    "kernel_ms": statistics.median(kernel_ms)})
    return out


def _print_forward(rows: list[dict[str, Any]]) -> None:
    print("| density | mixed ÷ base (median) | quartiles | kernel ms per mixed forward |")
    print("|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['density']:g} | {r['many_over_base']:.3f} | {r['q1']:.3f}–{r['q3']:.3f} "
              f"| {r['kernel_ms']:.1f} |")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--rows", type=int, default=50, help="token rows per model")
    ap.add_argument("--densities", default="0.005,0.02,0.05")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--forward", metavar="MODEL", help="time the engine's whole vision forward of this "
                    "open_clip model (random init) instead of single layers")
    ap.add_argument("--pairs", type=int, default=30, help="with --forward: base/mixed pairs per density")
    a = ap.parse_args(argv)
    densities = [float(v) for v in a.densities.split(",")]
    if a.forward:
        rows = forward(model=a.forward, threads=a.threads, models=a.models, pairs=a.pairs,
                       densities=densities)
        _print_forward(rows)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2))
        return 0
    rows = run(threads=a.threads, models=a.models, rows=a.rows, reps=a.reps, shapes=SHAPES,
               densities=densities)
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
