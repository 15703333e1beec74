"""Seconds per training step of a job as the worker runs it (sparseshot.adapt, a preset's recipe).

    python -m benchmarks.job_step [--bases sparseshot-tiny:random,ViT-B-16:random] [--methods so,lora]
                                  [--preset standard] [--classes 10] [--shots 4] [--steps 6]
                                  [--threads 2] [--device cpu] [--json FILE]
    sparseshot bench job-step ...   (same options)

A job of `classes` × `shots` random-noise images (the default 10 × 4 gives batch 32, as a 4-shot,
10-class job) runs through `sparseshot.adapt` with the preset's hyperparameters (early stop off);
the time per step is taken between the first and the last progress report, so model copy, setup
and the first (warm-up) steps are left out. The figures are what `sparseshot.presets.STEP_SECONDS`
records for `estimated_seconds`. `NAME:random` bases are open_clip models with seeded random
weights: the step time does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_BASES = "sparseshot-tiny:random,ViT-B-16:random"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks.job_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--bases", default=DEFAULT_BASES, help="comma-separated base model specs")
    p.add_argument("--methods", default="so,lora", help="comma-separated subset of so,lora")
    p.add_argument("--preset", default="standard", help="preset whose hyperparameters are used")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--shots", type=int, default=4, help="images per class")
    p.add_argument("--steps", type=int, default=6, help="timed steps (after the first progress report)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", dest="json_path", default=None, help="write the results to this file")
    return p


def _images(n: int, size: int) -> list[Any]:
    """n distinct seeded noise images (content does not change the cost of a step)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def measure(base: Any, method: str, preset: str, classes: int, shots: int, steps: int) -> dict[str, Any]:
    """Seconds per step of one adapt run of `method` under `preset` on `base`."""
    import sparseshot
    from sparseshot.presets import preset_params

    hp = preset_params(preset, method)
    names = [f"class{i}" for i in range(classes)]
    images = _images(classes * shots, base.image_size)
    labels = [i % classes for i in range(len(images))]
    batch = min(int(hp.get("batch_size", 32)), len(images))
    reports: list[tuple[int, float]] = []
    stop = [False]

    def on_progress(p: Any) -> None:
        reports.append((p.step, time.perf_counter()))
        if p.step - reports[0][0] >= steps:
            stop[0] = True

    hp.update(n_iters=10**6)
    if method == "so":
        hp["early_stop_loss"] = 0.0
    try:
        sparseshot.adapt(base, images, labels, names, method, on_progress=on_progress,
                         should_stop=lambda: stop[0], **hp)
    except sparseshot.Cancelled:
        pass
    (s0, t0), (s1, t1) = reports[0], reports[-1]
    return {"step_s": round((t1 - t0) / max(1, s1 - s0), 4), "timed_steps": s1 - s0, "batch": batch}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import sparseshot

    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"config": {**vars(args), "threads": torch.get_num_threads(),
                                      "cpu": platform.processor() or platform.machine(),
                                      "torch": torch.__version__}, "rows": []}
    print("| base | method | device | step_s | batch | timed steps |")
    print("|---|---|---|---:|---:|---:|")
    for spec in [s for s in args.bases.split(",") if s]:
        base = sparseshot.load_base(spec, device=args.device)
        for method in [m for m in args.methods.split(",") if m]:
            row = {"base": spec, "method": method, "device": torch.device(args.device).type,
                   **measure(base, method, args.preset, args.classes, args.shots, args.steps)}
            out["rows"].append(row)
            print(f"| {spec} | {method} | {row['device']} | {row['step_s']:.4f} | {row['batch']} | "
                  f"{row['timed_steps']} |", flush=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
