"""Cost of one few-shot CLIP training step: SO against its alternatives and the floor.

    python -m benchmarks.train_step [--model ViT-B-32] [--batch 32] [--classes 10] [--threads 2]
                                    [--device cpu|cuda] [--json FILE] [--quick] [--rows so,adamw,...]
    sparseshot bench train-step ...   (same options)

Setting (the paper's): open_clip model with random weights, `batch` images at the model's size
against `classes` prompts whose text features are recomputed at every step; CLIP loss
(cross-entropy of logit_scale·cos). Trainable: the attention in/out projections and the MLP
weights of every block of both encoders. Rows:

- so            SO (density 5e-5, T = 5) with the support-only backward (sparseshot.sparse_grad);
- so_ref_style  the same optimizer fed with dense autograd gradients gathered at S afterwards (the
                reference implementation's way);
- adamw         dense AdamW on the same matrices;
- lora          LoRA rank 2 on q, k, v of every block (alpha 1, dropout 0.25, as CLIP-LoRA), AdamW;
- bound         forward + backward with no parameter needing a gradient: the token embeddings
                entering each tower's transformer are made to require grad, so backward runs
                through every block; plain attention as in the rows above: the floor for any method;
- stock         the same floor on the unmodified open_clip model (nn.MultiheadAttention).

All method rows use `PlainAttention` (the `so` row needs it), so they differ only by the method.
Each row runs in its own process (`--row NAME`), with glibc told to keep freed memory
(MALLOC_MMAP_MAX_=0, high MALLOC_TRIM_THRESHOLD_) so large buffers are not returned to the OS and
page-faulted back in at every step. After warm-up, times are means over whole refresh periods
(`--periods`·T steps), so the steps that redraw supports are counted. Columns: step_s (whole
step: zero_grad, forward, loss, backward, optimizer step), opt_s (optimizer step alone), peak_mb
(peak RSS of the row's process on CPU; torch.cuda.max_memory_allocated on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

ROWS = ("so", "so_ref_style", "adamw", "lora", "bound", "stock")
DENSITY = 5e-5
REFRESH_EVERY = 5  # T
LR = 2e-4
TINY = "sparseshot-tiny"
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}

# Targets of the issue: (label, numerator row, column, denominator row, column, max ratio).
TARGETS = (
    ("so.step_s / bound.step_s", "so", "step_s", "bound", "step_s", 1.10),
    ("so.step_s / adamw.step_s", "so", "step_s", "adamw", "step_s", 0.85),
    ("so.step_s / lora.step_s", "so", "step_s", "lora", "step_s", 1.00),
    ("so.peak_mb / lora.peak_mb", "so", "peak_mb", "lora", "peak_mb", 1.00),
    ("so.peak_mb / adamw.peak_mb", "so", "peak_mb", "adamw", "peak_mb", 0.75),
    ("so.opt_s / so.step_s", "so", "opt_s", "so", "step_s", 0.02),
)
INFO_RATIOS = (
    ("so_ref_style.step_s / so.step_s", "so_ref_style", "step_s", "so", "step_s"),
    ("so_ref_style.peak_mb / so.peak_mb", "so_ref_style", "peak_mb", "so", "peak_mb"),
    ("stock.step_s / bound.step_s", "stock", "step_s", "bound", "step_s"),
)


# --------------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help=f"open_clip model name or config JSON path (default ViT-B-32; {TINY} with --quick)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 32; 8 with --quick)")
    p.add_argument("--classes", type=int, default=10, help="prompts (classes) per step")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --quick)")
    p.add_argument("--periods", type=int, default=2, help="timed refresh periods of T=5 steps (>= 2)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    p.add_argument("--jobs", type=int, default=1,
                   help="rows measured at once (>1 only for smoke tests: rows then compete for the CPU)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results to this file")
    p.add_argument("--quick", action="store_true", help=f"smoke test: {TINY} model, batch 8, 1 warm-up")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # child mode: measure one row
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.model is None:
        args.model = TINY if args.quick else "ViT-B-32"
    if args.batch is None:
        args.batch = 8 if args.quick else 32
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.periods < 2:
        raise SystemExit("--periods must be >= 2 (times are means over >= 2·T steps)")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    args.row_list = rows
    return args


# --------------------------------------------------------------------------------------------------
# One row, in this process


def _build_model(name: str) -> Any:
    import open_clip

    if name == TINY or name.endswith(".json"):
        if name == TINY:
            text = resources.files("sparseshot").joinpath("model_configs", f"{TINY}.json").read_text()
        else:
            text = Path(name).read_text()
        cfg = json.loads(text)
        cfg = cfg.get("model_cfg", cfg)
        return open_clip.CLIP(**cfg)
    return open_clip.create_model(name, pretrained=None)


def _trainable(model: Any) -> list[Any]:
    """Freeze everything but the paper's matrices (the SO recipe's, every block of both towers)."""
    from sparseshot.recipe import trainable_weights

    _freeze(model)
    params = list(trainable_weights(model).values())
    for p in params:
        p.requires_grad_(True)
    return params


def _freeze(model: Any) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _tokens_require_grad(model: Any) -> None:
    """Make the token embeddings entering both towers' transformers require grad (bound rows)."""

    def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0].detach().requires_grad_(True), *args[1:])

    model.visual.transformer.register_forward_pre_hook(hook)
    model.transformer.register_forward_pre_hook(hook)


def _setup_row(row: str, model: Any) -> tuple[Any, dict[str, Any]]:
    """Prepare `model` for `row`; returns (optimizer or None, info)."""
    import torch

    from sparseshot.lora import add_lora
    from sparseshot.optim import SO
    from sparseshot.sparse_grad import enable_sparse_grads, use_plain_attention

    info: dict[str, Any] = {}
    if row != "stock":
        use_plain_attention(model)
    if row in ("bound", "stock"):
        _freeze(model)
        _tokens_require_grad(model)
        return None, info
    if row == "lora":
        _freeze(model)
        params = add_lora(model, rank=2, alpha=1.0, dropout=0.25)  # q, k, v of every block
        return torch.optim.AdamW(params, lr=LR), info
    params = _trainable(model)
    info["trainable"] = sum(p.numel() for p in params)
    if row == "adamw":
        return torch.optim.AdamW(params, lr=LR), info
    so = SO(params, lr=LR, density=DENSITY, refresh_every=REFRESH_EVERY,
            generator=torch.Generator(device=params[0].device).manual_seed(0))
    if row == "so":
        info["sparse_matrices"] = enable_sparse_grads(model, so).num_patched
    return so, info


def _batch(model: Any, batch: int, classes: int, device: Any) -> tuple[Any, Any, Any]:
    import open_clip
    import torch

    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen)
    ctx = int(model.context_length)
    vocab = int(model.vocab_size)
    prompts = [f"a photo of a class{i} object." for i in range(classes)]
    text = open_clip.tokenize(prompts, context_length=ctx)
    text = text.clamp(max=vocab - 1)  # tiny configs may have a smaller vocabulary
    labels = torch.arange(batch) % classes
    return images.to(device), text.to(device), labels.to(device)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(model: Any, opt: Any, images: Any, text: Any, labels: Any) -> Callable[[], float]:
    """One training step; returns the seconds spent in opt.step() (0 without optimizer)."""
    import torch.nn.functional as F

    device = images.device

    def step() -> float:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        img = F.normalize(model.encode_image(images), dim=-1)  # (B, D)
        txt = F.normalize(model.encode_text(text), dim=-1)  # (C, D): recomputed every step
        logits = model.logit_scale.detach().exp() * img @ txt.t()  # (B, C)
        F.cross_entropy(logits, labels).backward()
        if opt is None:
            return 0.0
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    return step


def _peak_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def measure_row(args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up and time one row in this process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = _build_model(args.model).to(device).train()
    opt, info = _setup_row(args.row, model)
    images, text, labels = _batch(model, args.batch, args.classes, device)
    step = _step_fn(model, opt, images, text, labels)
    for _ in range(args.warmup):
        step()
    n = args.periods * REFRESH_EVERY
    _sync(device)
    t0 = time.perf_counter()
    opt_total = sum(step() for _ in range(n))
    _sync(device)
    step_s = (time.perf_counter() - t0) / n
    result = {"step_s": step_s, "opt_s": opt_total / n, "peak_mb": _peak_mb(device)}
    return {"result": result, "info": info, "steps": n, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------------
# All rows, one process each


def _child_cmd(args: argparse.Namespace, row: str) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--row", row, "--model", args.model,
           "--batch", str(args.batch), "--classes", str(args.classes), "--device", args.device,
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--periods", str(args.periods)]
    return cmd


def _run_child(args: argparse.Namespace, row: str) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, **MALLOC_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(_child_cmd(args, row), cwd=root, env=env, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"row {row!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _ratio(results: dict[str, Any], a: str, ca: str, b: str, cb: str) -> float | None:
    if a not in results or b not in results or not results[b][cb]:
        return None
    return float(results[a][ca] / results[b][cb])


def report(results: dict[str, Any], rows: Sequence[str]) -> str:
    """Markdown table of the rows plus the target ratios."""
    lines = ["| row | step_s | opt_s | peak_mb |", "|---|---:|---:|---:|"]
    for row in rows:
        r = results[row]
        lines.append(f"| {row} | {r['step_s']:.3f} | {r['opt_s']:.4f} | {r['peak_mb']:.0f} |")
    lines += ["", "| ratio | value | target | ok |", "|---|---:|---:|:---:|"]
    for label, a, ca, b, cb, limit in TARGETS:
        v = _ratio(results, a, ca, b, cb)
        if v is not None:
            lines.append(f"| {label} | {v:.3f} | ≤ {limit:.2f} | {'yes' if v <= limit else 'NO'} |")
    for label, a, ca, b, cb in INFO_RATIOS:
        v = _ratio(results, a, ca, b, cb)
        if v is not None:
            lines.append(f"| {label} | {v:.3f} | | |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every requested row in its own process; returns the JSON-able results."""
    out: dict[str, Any] = {"device": _device_name(args.device)}
    config = {"model": args.model, "batch": args.batch, "classes": args.classes,
              "threads": args.threads or None, "warmup": args.warmup,
              "timed_steps": args.periods * REFRESH_EVERY, "density": DENSITY,
              "refresh_every": REFRESH_EVERY}
    def one(row: str) -> dict[str, Any]:
        print(f"[train_step] measuring {row} ...", file=sys.stderr, flush=True)
        return _run_child(args, row)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        children = list(pool.map(one, args.row_list))
    for row, child in zip(args.row_list, children, strict=True):
        out[row] = child["result"]
        config.setdefault("threads_used", child["threads"])
        config.update({f"{row}.{k}": v for k, v in child["info"].items()})
    out["config"] = config
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _resolve(build_parser().parse_args(None if argv is None else list(argv)))
    if args.row is not None:
        print("RESULT " + json.dumps(measure_row(args)), flush=True)
        return 0
    results = run(args)
    cmd = "python -m benchmarks.train_step " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{cmd}\ndevice: {results['device']}, model {args.model}, batch {args.batch}, "
          f"{args.classes} classes, {results['config']['timed_steps']} timed steps per row\n")
    print(report(results, args.row_list))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
