"""Contrastive pretraining of the project's own small CLIP on the synthetic shapes world.

The offline benchmark needs a base model whose zero-shot classification means something, without
downloading weights. This script trains one on procedurally generated image-caption pairs
(benchmarks.datasets: shapes x colours x sizes x positions x backgrounds) with the CLIP loss,
deterministically for a seed, and caches it under .cache/sparseshot/:

    synthetic-clip-<hash>.pt     {"config": open_clip model config, "state_dict": weights}
    synthetic-clip-<hash>.json   the same config as a JSON file

where <hash> covers the config, the training settings and the world's vocabulary. Load it with
`sparseshot.load_base(str(pt_path))` or `load_base(f"{json_path}:{pt_path}")`.

    python -m benchmarks.synthetic_pretrain [--steps N] [--batch-size B] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import datasets as ds
from sparseshot.io import atomic_write

# Model: 32 px images in 8 px patches (16 tokens), 4 layers of width 128 in both towers, 64-d
# embedding. A little bigger than the bundled sparseshot-tiny (width 64, 2 layers) so that it learns
# the world well, and small enough to pretrain in a few CPU minutes.
MODEL_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
DEFAULTS = {"steps": 400, "batch_size": 192, "lr": 1e-3, "weight_decay": 0.1, "warmup": 40, "seed": 0}
# CLIP normalisation (open_clip's OPENAI_DATASET_MEAN / STD), as the base model's preprocess uses.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSESHOT_CACHE_DIR", ".cache/sparseshot"))


def settings_hash(settings: dict) -> str:
    blob = json.dumps({"model": MODEL_CONFIG, "train": settings, "world": _world_signature()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _world_signature() -> dict:
    return {"shapes": ds.SHAPES, "colours": ds.COLOURS, "sizes": ds.SIZES, "positions": ds.POSITIONS,
            "backgrounds": ds.BACKGROUNDS, "version": 1}


def paths(settings: dict, cache_dir: Path | None = None) -> tuple[Path, Path]:
    root = cache_dir or default_cache_dir()
    stem = root / f"synthetic-clip-{settings_hash(settings)}"
    return stem.with_suffix(".json"), stem.with_suffix(".pt")


def base_spec(config_path: Path, ckpt_path: Path) -> str:
    """The load_base spec of a pretrained checkpoint (it carries its config; the JSON is a copy)."""
    return str(ckpt_path)


def build_model() -> torch.nn.Module:
    import open_clip

    return open_clip.CLIP(MODEL_CONFIG["embed_dim"], MODEL_CONFIG["vision_cfg"], MODEL_CONFIG["text_cfg"])


def _attribute_codes(scenes: list[ds.Scene], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scene attributes as ints (n, 5), and which of them each caption mentions (n, 5) bool."""
    tables = [ds.SHAPES, list(ds.COLOURS), list(ds.SIZES), list(ds.POSITIONS), list(ds.BACKGROUNDS)]
    codes = torch.tensor([[tables[a].index(v) for a, v in enumerate(_values(s))] for s in scenes])
    mention = torch.tensor(
        [[True, True, f" {s.size} " in t, s.position in t, f"{s.background} background" in t]
         for s, t in zip(scenes, texts, strict=True)]
    )
    return codes, mention


def _values(s: ds.Scene) -> tuple[str, str, str, str, str]:
    return (s.shape, s.colour, s.size, s.position, s.background)


def make_batch(n: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Images (n, 3, H, W) normalised, captions, and the match matrix (n, n) bool:
    match[i, j] = caption j is true of image i (every attribute it mentions agrees)."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    size = MODEL_CONFIG["vision_cfg"]["image_size"]
    scenes = [ds.random_scene(rng) for _ in range(n)]
    texts = [ds.caption(s, rng) for s in scenes]
    arr = np.stack([ds.render(s, size, nrng) for s in scenes])  # (n, H, W, 3) in [0, 1]
    images = torch.from_numpy(arr).permute(0, 3, 1, 2)
    images = (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    codes, mention = _attribute_codes(scenes, texts)
    agree = codes[:, None, :] == codes[None, :, :]  # (n, n, 5): attribute a of image i == of scene j
    match = (agree | ~mention[None, :, :]).all(-1)
    return images, texts, match


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, match: torch.Tensor):
    """Symmetric CLIP loss with multiple positives: targets spread over every true caption/image.
    img, txt: (n, D) L2-normalised; match: (n, n) bool with a true diagonal."""
    logits = scale * img @ txt.t()  # (n, n)
    t = match.float()
    loss_i = -(t / t.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    loss_t = -(t / t.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
    return (loss_i + loss_t) / 2


def pretrain(settings: dict, *, log=print) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(settings["seed"])
    model = build_model()
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=MODEL_CONFIG["text_cfg"]["context_length"])
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    steps, warm = settings["steps"], settings["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    cache: dict[str, torch.Tensor] = {}  # caption -> token ids (ctx,)
    model.train()
    t0 = time.time()
    for step in range(steps):
        images, texts, match = make_batch(settings["batch_size"], seed=settings["seed"] * 1_000_003 + step)
        for t in set(texts) - cache.keys():
            cache[t] = tok([t])[0]
        tokens = torch.stack([cache[t] for t in texts])
        img, txt, scale = model(images, tokens)  # normalised features (n, D), logit scale
        loss = contrastive_loss(img, txt, scale, match)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == steps - 1:
            log(f"pretrain step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    return model.eval()


def ensure_pretrained(settings: dict | None = None, *, cache_dir: Path | None = None, force: bool = False,
                      log=print) -> tuple[str, float]:
    """Pretrain (or reuse the cached) synthetic CLIP; returns (load_base spec, seconds spent now)."""
    settings = {**DEFAULTS, **(settings or {})}
    cfg_path, ckpt_path = paths(settings, cache_dir)
    if cfg_path.exists() and ckpt_path.exists() and not force:
        log(f"using cached synthetic CLIP {ckpt_path}")
        return base_spec(cfg_path, ckpt_path), 0.0
    t0 = time.time()
    model = pretrain(settings, log=log)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # The checkpoint carries its config, so load_base(str(ckpt_path)) works on its own.
    atomic_write(ckpt_path, lambda fh: torch.save({"config": MODEL_CONFIG, "state_dict": state}, fh))
    atomic_write(cfg_path, lambda fh: fh.write(json.dumps(MODEL_CONFIG, indent=2).encode()))
    seconds = time.time() - t0
    log(f"pretrained synthetic CLIP in {seconds:.0f} s -> {ckpt_path}")
    return base_spec(cfg_path, ckpt_path), seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparseshot bench pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--force", action="store_true", help="retrain even when a cached checkpoint exists")
    a = p.parse_args(argv)
    settings = {**DEFAULTS, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed}
    spec, _ = ensure_pretrained(settings, cache_dir=a.cache_dir, force=a.force)
    print(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
