"""Size and speed of sparse deltas on a real-sized CLIP.

Changes a fraction `--touched` of the entries of every SO-trainable matrix (attention in/out
projections and MLP weights of both towers), then measures the delta file (fp32 values and fp16
differences), the weight fingerprint, load + verify, apply and revert. 2% is about what 2,000 SO
steps at density 5e-5, T = 5 touch (1 - exp(-steps * density / T)).

    python -m benchmarks.delta_size --model ViT-B-16 --touched 0.02 --json delta.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sparseshot.base import load_base
from sparseshot.delta import SparseDelta, weights_fingerprint
from sparseshot.recipe import trainable_weights


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _touch(model: torch.nn.Module, names: list[str], fraction: float, seed: int) -> torch.nn.Module:
    """A copy of `model` with `fraction` of the entries of each named tensor nudged at random."""
    adapted = copy.deepcopy(model)
    state = adapted.state_dict(keep_vars=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            flat = state[name].view(-1)  # (n,)
            k = max(1, int(fraction * flat.numel()))
            idx = torch.randperm(flat.numel(), generator=g)[:k]
            flat[idx] += 1e-3 * torch.randn(k, generator=g)
    return adapted


def run(model: str, touched: float, seed: int = 0) -> dict[str, Any]:
    base, load_s = _timed(lambda: load_base(f"{model}:random", device="cpu"))
    m = base.model
    names = list(trainable_weights(m))
    total = sum(m.get_parameter(n).numel() for n in names)
    fp, fp_s = _timed(lambda: weights_fingerprint(m))
    adapted = _touch(m, names, touched, seed)
    meta = {"base_fingerprint": base.fingerprint}
    delta, diff_s = _timed(lambda: SparseDelta.from_models(m, adapted, names=names, meta=meta))
    half = SparseDelta.from_models(m, adapted, names=names, value_dtype=torch.float16, meta=meta)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.delta")
        _, save_s = _timed(lambda: delta.save(path))
        loaded, load_delta_s = _timed(lambda: SparseDelta.load(path))
    _, apply_s = _timed(lambda: loaded.apply(m, fingerprint=base.fingerprint))
    _, revert_s = _timed(lambda: loaded.revert(m))
    if weights_fingerprint(m) != fp:
        raise RuntimeError("revert did not restore the base weights bit for bit")
    return {
        "model": model, "touched": touched, "trainable_entries": total, "nnz": delta.nnz,
        "density": delta.density, "file_mb_fp32": delta.nbytes / 1e6, "file_mb_fp16": half.nbytes / 1e6,
        "dense_fp32_mb": total * 4 / 1e6, "load_base_s": load_s, "fingerprint_s": fp_s,
        "from_models_s": diff_s, "save_s": save_s, "load_verify_s": load_delta_s,
        "apply_s": apply_s, "revert_s": revert_s,
    }


def _print(r: dict[str, Any]) -> None:
    print(f"{r['model']}: {r['nnz']:,} of {r['trainable_entries']:,} trainable entries changed "
          f"(density {r['density']:.4f})")
    print("| measure | value |\n|---|---:|")
    print(f"| delta file, fp32 values | {r['file_mb_fp32']:.1f} MB |")
    print(f"| delta file, fp16 differences | {r['file_mb_fp16']:.1f} MB |")
    print(f"| same tensors dense, fp32 | {r['dense_fp32_mb']:.0f} MB |")
    for key, label in [("fingerprint_s", "weight fingerprint"), ("from_models_s", "diff (from_models)"),
                       ("save_s", "save (atomic)"), ("load_verify_s", "load + verify"),
                       ("apply_s", "apply"), ("revert_s", "revert (bit-exact)")]:
        print(f"| {label} | {r[key]:.3f} s |")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16", help="open_clip model name (random init)")
    ap.add_argument("--touched", type=float, default=0.02, help="fraction of entries changed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.model, args.touched)
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
