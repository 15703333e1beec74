"""Few-shot adaptation of a CLIP base model: SO (the paper's recipe), LoRA (CLIP-LoRA) and zero-shot.

`adapt(base, images, labels, classes, method=...)` trains a private copy of ``base.model`` (the
shared base is never modified) and returns an `AdaptResult` whose delta holds the changed weights
(sparse entries for SO, low-rank blocks for LoRA, nothing for zero-shot) and the class text
embeddings of the adapted text encoder, so that serving only runs the vision tower.

Both training methods share one loop:
- a step takes a batch of ``min(batch_size, N)`` images in a seeded random order (one pass over the
  N images is an epoch), augments them with ``base.preprocess_train``, recomputes the class text
  features from the tokenised prompts, and minimises cross-entropy over logit_scale · cos(image, text);
- the learning rate follows a cosine schedule from ``lr`` to 1e-6 over ``n_iters · shots`` steps,
  where shots = round(N / number of classes), at least 1 (the mean images per class: a user's
  classes need not be balanced, and the mean keeps one small class from shrinking the schedule);
- SO stops early once an epoch's mean loss falls below ``early_stop_loss``.

Randomness (data order, augmentation, dropout, SO supports) comes from `seed` only: the loop runs
inside ``torch.random.fork_rng`` with the global RNG seeded, so CPU runs are bit-for-bit
reproducible and callers' RNG state is untouched. With ``checkpoint=path`` the training state is
saved atomically every `CHECKPOINT_EVERY_STEPS` steps or `CHECKPOINT_EVERY_S` seconds (and on
cancellation), and an interrupted run with the same inputs resumes from it and ends with the same
result as an uninterrupted one; the file is removed when training completes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseshot.io import atomic_write

__all__ = [
    "AdaptResult",
    "Cancelled",
    "METHODS",
    "Progress",
    "adapt",
    "hparam_defaults",
    "planned_steps",
    "trainable_weights",
    "validate_hparams",
]

METHODS = ("so", "lora", "zeroshot")
DEFAULT_TEMPLATE = "a photo of a {}."
# Per block, the weights the SO recipe trains (names relative to a residual block).
SO_WEIGHTS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
CHECKPOINT_EVERY_STEPS = 50
CHECKPOINT_EVERY_S = 30.0
PROGRESS_EVERY_S = 0.5
FINAL_LR = 1e-6
_CHECKPOINT_VERSION = 1

_DEFAULTS: dict[str, dict[str, Any]] = {
    "so": {
        "lr": 2e-4,
        "betas": (0.9, 0.999),
        "density": 5e-4,
        "refresh_every": 10,
        "batch_size": 32,
        "n_iters": 2000,
        "early_stop_loss": 0.01,
        "encoder": "both",
        "positions": "all",
        "template": DEFAULT_TEMPLATE,
        "seed": 0,
    },
    "lora": {
        "rank": 2,
        "alpha": 1.0,
        "dropout": 0.25,
        "lr": 2e-4,
        "weight_decay": 1e-2,
        "batch_size": 32,
        "n_iters": 500,
        "encoder": "both",
        "positions": "all",
        "template": DEFAULT_TEMPLATE,
        "seed": 0,
    },
    "zeroshot": {"template": DEFAULT_TEMPLATE},
}


class Cancelled(Exception):
    """Raised by `adapt` when ``should_stop()`` returned True."""


@dataclass
class Progress:
    step: int  # steps done
    total_steps: int  # planned steps (training may stop earlier)
    loss: float  # mean loss over the current epoch so far
    train_accuracy: float  # accuracy on the augmented batches of the current epoch so far
    eta_seconds: float  # estimated seconds left for the planned steps
    lr: float | None = None  # learning rate of the step just taken (first param group)
    elapsed_seconds: float | None = None  # training seconds so far (across resumes)


@dataclass
class AdaptResult:
    delta: Any  # sparseshot.delta.SparseDelta
    class_embeddings: Tensor  # (C, D) fp32, L2-normalised, on CPU
    metrics: dict[str, Any]  # steps, total_steps, final_loss, train_accuracy, train_seconds, ...
    method: str
    hparams: dict[str, Any] = field(default_factory=dict)


# ==================================================================================================
# Hyperparameters
# ==================================================================================================


def hparam_defaults(method: str) -> dict[str, Any]:
    """The recipe's default hyperparameters of `method` (a fresh dict)."""
    if method not in _DEFAULTS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return copy.deepcopy(_DEFAULTS[method])


def planned_steps(hparams: Mapping[str, Any], n_images: int, n_classes: int) -> tuple[int, int, int]:
    """(shots, total steps, batch) of a run: shots = round(N / C) >= 1, n_iters steps per shot."""
    shots = max(1, round(n_images / max(1, n_classes)))
    return shots, int(hparams["n_iters"]) * shots, min(int(hparams["batch_size"]), max(1, n_images))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_float(name: str, v: Any, lo: float, hi: float, lo_open: bool, hi_open: bool = False) -> float:
    if not _is_num(v):
        raise ValueError(f"{name} must be a number, got {v!r}")
    below = v <= lo if lo_open else v < lo
    above = v >= hi if hi_open else v > hi
    if below or above:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {v!r}")
    return float(v)


def _check_int(name: str, v: Any, lo: int, hi: int = 2**31) -> int:
    if not _is_int(v):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v!r}")
    return int(v)


def _check_betas(v: Any) -> tuple[float, float]:
    if not isinstance(v, list | tuple) or len(v) != 2:
        raise ValueError(f"betas must be a pair of numbers, got {v!r}")
    return (_check_float("betas[0]", v[0], 0.0, 1.0, False, True),
            _check_float("betas[1]", v[1], 0.0, 1.0, False, True))


def _check_encoder(v: Any) -> str:
    if v not in ("vision", "text", "both"):
        raise ValueError(f"encoder must be 'vision', 'text' or 'both', got {v!r}")
    return str(v)


def _check_positions(v: Any) -> str | list[int]:
    if v == "all":
        return "all"
    if isinstance(v, list | tuple) and v and all(_is_int(i) for i in v):
        return [int(i) for i in v]
    raise ValueError(f"positions must be 'all' or a non-empty list of block indices, got {v!r}")


def _check_template(v: Any) -> str:
    if not isinstance(v, str) or v.count("{}") != 1:
        raise ValueError(f"template must be a string with exactly one '{{}}' for the class name, got {v!r}")
    try:
        v.format("x")
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f"template {v!r} is not a valid format string: {e}") from None
    return v


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "lr": lambda v: _check_float("lr", v, 0.0, 10.0, True),
    "betas": _check_betas,
    "density": lambda v: _check_float("density", v, 0.0, 1.0, True),
    "refresh_every": lambda v: _check_int("refresh_every", v, 1),
    "batch_size": lambda v: _check_int("batch_size", v, 1, 65536),
    "n_iters": lambda v: _check_int("n_iters", v, 1, 10**7),
    "early_stop_loss": lambda v: _check_float("early_stop_loss", v, 0.0, 1e9, False),
    "encoder": _check_encoder,
    "positions": _check_positions,
    "template": _check_template,
    "seed": lambda v: _check_int("seed", v, 0, 2**31 - 1),
    "rank": lambda v: _check_int("rank", v, 1, 4096),
    "alpha": lambda v: _check_float("alpha", v, 0.0, 1e6, True),
    "dropout": lambda v: _check_float("dropout", v, 0.0, 1.0, False, True),
    "weight_decay": lambda v: _check_float("weight_decay", v, 0.0, 1e3, False),
}


def validate_hparams(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults of `method` merged with `params`, checked and normalised (JSON-able values).

    Raises ValueError naming the offending key on an unknown key, a wrong type or a bad range.
    """
    merged = hparam_defaults(method)
    params = dict(params or {})
    unknown = sorted(set(params) - set(merged))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) for method {method!r}: {', '.join(unknown)} "
                         f"(allowed: {', '.join(sorted(merged))})")
    merged.update(params)
    out = {k: _CHECKS[k](v) for k, v in merged.items()}
    if "betas" in out:
        out["betas"] = list(out["betas"])
    return out


# ==================================================================================================
# Helpers shared by the methods
# ==================================================================================================


def trainable_weights(
    model: nn.Module, encoder: str = "both", positions: Any = "all"
) -> dict[str, nn.Parameter]:
    """name -> parameter of the SO recipe's weights in the selected blocks (see SO_WEIGHTS)."""
    from sparseshot.lora import select_blocks

    params = dict(model.named_parameters())
    out: dict[str, nn.Parameter] = {}
    for prefix, _ in select_blocks(model, encoder, positions):
        for w in SO_WEIGHTS:
            name = f"{prefix}.{w}"
            if name not in params:
                raise ValueError(f"model has no parameter {name!r} (not an open_clip ViT CLIP?)")
            out[name] = params[name]
    return out


def _prompts(classes: Sequence[str], template: str) -> list[str]:
    return [template.format(c) for c in classes]


def _text_features(model: Any, tokens: Tensor) -> Tensor:
    """tokens (C, ctx) -> (C, D) L2-normalised text features."""
    return F.normalize(model.encode_text(tokens), dim=-1)


@torch.no_grad()
def _class_embeddings(model: Any, tokens: Tensor) -> Tensor:
    return _text_features(model, tokens).float().cpu()


def _meta(base: Any, classes: Sequence[str], method: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    import sparseshot

    return {
        "base_model": base.spec,
        "base_fingerprint": base.fingerprint,
        "classes": list(classes),
        "template": hparams.get("template", DEFAULT_TEMPLATE),
        "method": method,
        "hparams": json.loads(json.dumps(dict(hparams))),
        "library_version": sparseshot.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _check_inputs(images: Sequence[Any], labels: Sequence[int], classes: Sequence[str], method: str) -> None:
    if not classes:
        raise ValueError("classes must not be empty")
    if any(not isinstance(c, str) or not c.strip() for c in classes):
        raise ValueError("class names must be non-empty strings")
    if len(set(classes)) != len(classes):
        raise ValueError("class names must be unique")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    bad = [y for y in labels if not _is_int(y) or not 0 <= y < len(classes)]
    if bad:
        raise ValueError(f"labels must be integers in [0, {len(classes)}), got {bad[:5]}")
    if method != "zeroshot" and not images:
        raise ValueError(f"method {method!r} needs at least one training image")


# ==================================================================================================
# Entry point
# ==================================================================================================


def adapt(
    base: Any,
    images: Sequence[Any],
    labels: Sequence[int],
    classes: Sequence[str],
    method: str = "so",
    *,
    seed: int = 0,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    **hparams: Any,
) -> AdaptResult:
    """Adapt `base` (a sparseshot.BaseModel) to `classes` from labelled images.

    images: PIL images (converted to RGB); labels: indices into classes; method: "so" | "lora" |
    "zeroshot" (no training, images may be empty). hparams: see `hparam_defaults(method)`.
    Raises ValueError on bad inputs or hyperparameters and `Cancelled` when should_stop() is True.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method != "zeroshot":
        hparams = {**hparams, "seed": seed}
    hp = validate_hparams(method, hparams)
    _check_inputs(images, labels, classes, method)
    if method == "zeroshot":
        return _zeroshot(base, classes, hp)
    run = _Run(base, list(images), [int(y) for y in labels], list(classes), method, hp,
               on_progress, should_stop, checkpoint)
    return run.execute()


def _zeroshot(base: Any, classes: Sequence[str], hp: dict[str, Any]) -> AdaptResult:
    from sparseshot.delta import CLASS_EMBEDDINGS, SparseDelta

    t0 = time.perf_counter()
    tokens = base.tokenizer(_prompts(classes, hp["template"])).to(base.device)
    with base.lock:
        emb = _class_embeddings(base.model, tokens)
    delta = SparseDelta.empty(_meta(base, classes, "zeroshot", hp))
    delta.extras[CLASS_EMBEDDINGS] = emb
    metrics = {"steps": 0, "total_steps": 0, "final_loss": None, "train_accuracy": None,
               "train_seconds": time.perf_counter() - t0}
    return AdaptResult(delta, emb, metrics, "zeroshot", hp)


# ==================================================================================================
# Training run
# ==================================================================================================


class _Run:
    """One SO or LoRA training run (state, loop, checkpointing)."""

    model: Any  # the trainable copy of base.model (an open_clip CLIP)
    handle: Any  # SparseGradHandle of an SO run, else None
    opt: torch.optim.Optimizer
    step: int
    elapsed: float  # training seconds so far (across resumes)
    epoch_loss: list[float]  # step losses of the current epoch
    epoch_correct: int
    epoch_seen: int
    last_epoch: tuple[float, float] | None  # (mean loss, accuracy) of the last finished epoch
    stopped_early: bool

    def __init__(self, base, images, labels, classes, method, hp, on_progress, should_stop, checkpoint):
        self.base, self.images, self.labels, self.classes = base, images, labels, classes
        self.method, self.hp = method, hp
        self.on_progress, self.should_stop = on_progress, should_stop
        self.checkpoint = os.fspath(checkpoint) if checkpoint is not None else None
        self.device = torch.device(base.device)
        n = len(images)
        self.shots, self.total_steps, self.batch = planned_steps(hp, n, len(classes))
        self.steps_per_epoch = math.ceil(n / self.batch)
        self.labels_t = torch.tensor(labels, dtype=torch.long)

    # ---- setup -------------------------------------------------------------------------------

    def _build(self) -> None:
        """The trainable copy, its optimizer and LR schedule."""
        hp = self.hp
        with self.base.lock:  # a Classifier may have a delta applied to the shared model meanwhile
            self.model = copy.deepcopy(self.base.model)  # the shared base is never touched
        self.handle = None
        self.amp_dtype: torch.dtype | None = None
        if self.method == "so":
            self._build_so()
        else:
            self._build_lora()
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        total = self.total_steps
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt, T_max=total, eta_min=min(FINAL_LR, hp["lr"])
        )
        self.tokens = self.base.tokenizer(_prompts(self.classes, hp["template"])).to(self.device)
        # A frozen tower needs no graph: its features are computed under no_grad.
        enc = hp["encoder"]
        self.train_vision = enc in ("vision", "both")
        self.train_text = enc in ("text", "both")

    def _build_so(self) -> None:
        from sparseshot.optim import SO
        from sparseshot.sparse_grad import enable_sparse_grads

        hp = self.hp
        weights = trainable_weights(self.model, hp["encoder"], hp["positions"])
        for p in weights.values():
            p.requires_grad_(True)
        self.so_names = list(weights)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(hp["seed"] * 2 + 1)
        self.opt = SO(list(weights.values()), lr=hp["lr"], betas=tuple(hp["betas"]),
                      density=hp["density"], refresh_every=hp["refresh_every"], generator=gen)
        self.handle = enable_sparse_grads(self.model, self.opt)

    def _build_lora(self) -> None:
        from sparseshot.lora import add_lora

        hp = self.hp
        params = add_lora(self.model, rank=hp["rank"], alpha=hp["alpha"], dropout=hp["dropout"],
                          encoder=hp["encoder"], positions=hp["positions"])
        self.opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            self.amp_dtype = torch.bfloat16  # mixed precision on GPU (bf16: no loss scaling needed)

    # ---- one step ----------------------------------------------------------------------------

    def _batch_indices(self, step: int) -> Tensor:
        """Image indices of step `step` (0-based): the epoch's seeded permutation, chunked."""
        epoch, i = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.hp["seed"] * 1_000_003 + epoch)
        perm = torch.randperm(len(self.images), generator=g)
        return perm[i * self.batch:(i + 1) * self.batch]

    def _step(self, step: int) -> tuple[float, int, int]:
        """One optimisation step; returns (loss, correct, batch size)."""
        idx = self._batch_indices(step)
        x = torch.stack([self.base.preprocess_train(self.images[i]) for i in idx.tolist()])
        x = x.to(self.device)  # (B, 3, S, S)
        y = self.labels_t[idx].to(self.device)  # (B,)
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            with torch.set_grad_enabled(self.train_text):
                txt = _text_features(self.model, self.tokens)  # (C, D)
            with torch.set_grad_enabled(self.train_vision):
                img = F.normalize(self.model.encode_image(x), dim=-1)  # (B, D)
            logits = self.model.logit_scale.exp() * img.float() @ txt.float().t()  # (B, C)
            loss = F.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        correct = int((logits.argmax(1) == y).sum())
        return float(loss.detach()), correct, len(idx)

    # ---- loop --------------------------------------------------------------------------------

    def execute(self) -> AdaptResult:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.hp["seed"])
            self._build()
            try:
                self._restore()
                self._loop()
            finally:
                if self.handle is not None:
                    self.handle.remove()
        result = self._result()
        self._remove_checkpoint()
        return result

    def _loop(self) -> None:
        self.model.train()
        t_start = time.perf_counter() - self.elapsed
        last_report = last_save = time.perf_counter()
        saved_at = self.step
        while self.step < self.total_steps:
            if self.should_stop is not None and self.should_stop():
                self._save(time.perf_counter() - t_start)
                raise Cancelled(f"training stopped at step {self.step}/{self.total_steps}")
            loss, correct, n = self._step(self.step)
            self.step += 1
            self.epoch_loss.append(loss)
            self.epoch_correct += correct
            self.epoch_seen += n
            epoch_end = self.step % self.steps_per_epoch == 0
            stop_early = epoch_end and self._converged()
            now = time.perf_counter()
            final = stop_early or self.step == self.total_steps
            if self.on_progress is not None and (final or now - last_report >= PROGRESS_EVERY_S):
                self.on_progress(self._progress(now - t_start))
                last_report = now
            if epoch_end:
                self.last_epoch = (sum(self.epoch_loss) / len(self.epoch_loss),
                                   self.epoch_correct / max(1, self.epoch_seen))
                self.epoch_loss, self.epoch_correct, self.epoch_seen = [], 0, 0
            if stop_early:
                self.stopped_early = True
                break
            if self.checkpoint and (self.step - saved_at >= CHECKPOINT_EVERY_STEPS
                                    or now - last_save >= CHECKPOINT_EVERY_S):
                self._save(now - t_start)
                saved_at, last_save = self.step, time.perf_counter()
        self.elapsed = time.perf_counter() - t_start
        self.model.eval()

    def _converged(self) -> bool:
        if self.method != "so":
            return False
        return sum(self.epoch_loss) / len(self.epoch_loss) < self.hp["early_stop_loss"]

    def _progress(self, elapsed: float) -> Progress:
        done_now = max(1, self.step - self.start_step)
        rate = (elapsed - self.start_elapsed) / done_now  # seconds per step in this process
        loss = sum(self.epoch_loss) / max(1, len(self.epoch_loss))
        acc = self.epoch_correct / max(1, self.epoch_seen)
        eta = max(0.0, rate * (self.total_steps - self.step))
        lr = float(self.opt.param_groups[0]["lr"])
        return Progress(self.step, self.total_steps, loss, acc, eta, lr, elapsed)

    # ---- result ------------------------------------------------------------------------------

    @torch.no_grad()
    def _train_accuracy(self) -> float:
        """Accuracy of the adapted model on the (non-augmented) training images."""
        txt = _text_features(self.model, self.tokens)
        correct = 0
        for s in range(0, len(self.images), 64):
            chunk = self.images[s:s + 64]
            x = torch.stack([self.base.preprocess_eval(im) for im in chunk]).to(self.device)
            img = F.normalize(self.model.encode_image(x), dim=-1)
            pred = (img.float() @ txt.float().t()).argmax(1).cpu()
            correct += int((pred == self.labels_t[s:s + 64]).sum())
        return correct / len(self.images)

    def _result(self) -> AdaptResult:
        from sparseshot.delta import CLASS_EMBEDDINGS, SparseDelta

        meta = _meta(self.base, self.classes, self.method, self.hp)
        emb = _class_embeddings(self.model, self.tokens)  # adapted text encoder (C, D)
        if self.method == "so":
            with self.base.lock:
                delta = SparseDelta.from_models(self.base.model, self.model, names=self.so_names, meta=meta)
        else:
            delta = self._lora_delta(meta)
        delta.extras[CLASS_EMBEDDINGS] = emb
        last_loss = self.last_epoch[0] if self.last_epoch else None
        metrics = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "shots": self.shots,
            "epochs": self.step / self.steps_per_epoch,
            "stopped_early": self.stopped_early,
            "final_loss": last_loss,
            "train_accuracy": self._train_accuracy(),
            "train_seconds": self.elapsed,
            "nnz": delta.nnz,
        }
        return AdaptResult(delta, emb, metrics, self.method, dict(self.hp))

    def _lora_delta(self, meta: dict[str, Any]) -> Any:
        from sparseshot.delta import SparseDelta
        from sparseshot.lora import lora_delta_parts

        delta = SparseDelta.empty(meta)
        params = dict(self.model.named_parameters())
        for name, row_start, B, A, scale in lora_delta_parts(self.model):
            delta.add_lowrank(name, row_start, B, A, scale, param_numel=params[name].numel())
        return delta

    # ---- checkpointing -----------------------------------------------------------------------

    def _key(self) -> str:
        """Identity of this run's inputs: a checkpoint is only resumed when it matches."""
        h = hashlib.sha256()
        h.update(json.dumps([_CHECKPOINT_VERSION, self.method, self.hp, self.classes, self.labels,
                             self.base.fingerprint], sort_keys=True, default=str).encode())
        for im in self.images:
            h.update(repr((getattr(im, "size", None), getattr(im, "mode", None))).encode())
        return h.hexdigest()

    def _restore(self) -> None:
        """Fresh state, or the state of a matching checkpoint."""
        self.step, self.elapsed = 0, 0.0
        self.epoch_loss = []
        self.epoch_correct = self.epoch_seen = 0
        self.last_epoch = None
        self.stopped_early = False
        state = self._read_checkpoint()
        if state is not None:
            with torch.no_grad():
                for name, value in state["params"].items():
                    self.trainable[name].copy_(value)
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng_cpu"])
            if self.device.type == "cuda" and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)
            self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
            self.epoch_loss = list(state["epoch_loss"])
            self.epoch_correct, self.epoch_seen = int(state["epoch_correct"]), int(state["epoch_seen"])
            last = state["last_epoch"]
            self.last_epoch = (float(last[0]), float(last[1])) if last else None
        self.start_step, self.start_elapsed = self.step, self.elapsed

    def _read_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint or not os.path.exists(self.checkpoint):
            return None
        try:
            state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        except Exception:
            return None  # unreadable (e.g. from another version): start over
        if not isinstance(state, dict) or state.get("key") != self._key():
            return None
        if set(state.get("params", {})) != set(self.trainable):
            return None
        return state

    def _save(self, elapsed: float) -> None:
        if not self.checkpoint:
            return
        state = {
            "key": self._key(),
            "step": self.step,
            "elapsed": elapsed,
            "params": {n: p.detach().cpu().clone() for n, p in self.trainable.items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "epoch_loss": list(self.epoch_loss),
            "epoch_correct": self.epoch_correct,
            "epoch_seen": self.epoch_seen,
            "last_epoch": list(self.last_epoch) if self.last_epoch else None,
        }
        atomic_write(self.checkpoint, lambda fh: torch.save(state, fh))

    def _remove_checkpoint(self) -> None:
        if self.checkpoint and os.path.exists(self.checkpoint):
            os.unlink(self.checkpoint)
