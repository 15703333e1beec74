"""The training run of SO and LoRA: state, one step, the loop, the delta budget and the result.

A `Run` trains a private copy of ``base.model`` (the shared base is never modified):
- a step takes a batch of ``min(batch_size, N)`` images in a seeded random order (one pass over the
  N images is an epoch), augments them with ``base.preprocess_train``, recomputes the class text
  features from the tokenised prompts, and minimises cross-entropy over logit_scale · cos(image, text);
- the learning rate follows a cosine schedule from ``lr`` to 1e-6 over ``n_iters · shots`` steps;
- SO stops early once an epoch's mean loss falls below ``early_stop_loss``.

Delta budget (SO, ``delta_budget`` < 1): after the main phase, each trained matrix of n entries keeps
only its ``floor(delta_budget · n)`` entries of largest |Δ| (Δ = adapted − base; the others go back to
the base value; only entries SO changed are kept), and, when that dropped any changed entry, a
refine phase of ``ceil(refine_fraction · steps run)`` steps re-trains exactly those entries (SO
with the supports pinned: Adam on the kept entries, a fresh cosine schedule from
``refine_lr_scale · lr``).
The stored delta therefore holds at most delta_budget of the trained entries. The main phase does
not depend on the budget, so `execute_budgets` trains it once and branches per budget, each
branch giving what a separate run with that budget gives (tested).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseshot import __version__
from sparseshot.checkpoint import CHECKPOINT_EVERY_S, CHECKPOINT_EVERY_STEPS, CheckpointFile, run_key
from sparseshot.delta import CLASS_EMBEDDINGS, SparseDelta
from sparseshot.lora import add_lora, lora_delta_parts, select_blocks
from sparseshot.metrics import evaluate, report_json
from sparseshot.optim import SO
from sparseshot.prompts import DEFAULT_TEMPLATE, embed_tokens, format_prompts, text_features
from sparseshot.sparse_grad import SparseGradHandle, enable_sparse_grads

if TYPE_CHECKING:  # base pulls in open_clip, which training itself never needs
    from sparseshot.base import BaseModel

__all__ = ["SO_WEIGHTS", "AdaptResult", "Cancelled", "Progress", "Run", "planned_steps", "result_meta",
           "trainable_weights"]

# Per block, the weights the SO recipe trains (names relative to a residual block).
SO_WEIGHTS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
PROGRESS_EVERY_S = 0.5
# A validation pass runs at a progress report only once training has run VAL_COST_FACTOR times as
# long as the previous pass took (and always at the final report): at most ~1/VAL_COST_FACTOR overhead.
VAL_COST_FACTOR = 10
FINAL_LR = 1e-6


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
    val_accuracy: float | None = None  # on the held-out images, when measured at this report


@dataclass
class AdaptResult:
    delta: SparseDelta
    class_embeddings: Tensor  # (C, D) fp32, L2-normalised, on CPU
    metrics: dict[str, Any]  # steps, total_steps, final_loss, train_accuracy, train_seconds, ...
    method: str
    hparams: dict[str, Any] = field(default_factory=dict)
    # With held-out images: (n_val, C) class probabilities of each by the final model, in input order.
    val_probs: list[list[float]] | None = None


def trainable_weights(
    model: nn.Module, encoder: str = "both", positions: str | Sequence[int] = "all"
) -> dict[str, nn.Parameter]:
    """name -> parameter of the SO recipe's weights in the selected blocks (see SO_WEIGHTS)."""
    params = dict(model.named_parameters())
    out: dict[str, nn.Parameter] = {}
    for prefix, _ in select_blocks(model, encoder, positions):
        for w in SO_WEIGHTS:
            name = f"{prefix}.{w}"
            if name not in params:
                raise ValueError(f"model has no parameter {name!r} (not an open_clip ViT CLIP?)")
            out[name] = params[name]
    return out


def planned_steps(hparams: Mapping[str, Any], n_images: int, n_classes: int) -> tuple[int, int, int]:
    """(shots, total steps, batch) of a run: shots = round(N / C) >= 1, n_iters steps per shot
    (the main phase; a budgeted SO run adds its refine steps once pruning shows they are needed)."""
    shots = max(1, round(n_images / max(1, n_classes)))
    return shots, int(hparams["n_iters"]) * shots, min(int(hparams["batch_size"]), max(1, n_images))


def result_meta(
    base: BaseModel, classes: Sequence[str], method: str, hparams: Mapping[str, Any]
) -> dict[str, Any]:
    """delta.meta of a result: base model and fingerprint, classes, template, method, hparams, ..."""
    return {
        "base_model": base.spec,
        "base_fingerprint": base.fingerprint,
        "classes": list(classes),
        "template": hparams.get("template", DEFAULT_TEMPLATE),
        "method": method,
        "hparams": json.loads(json.dumps(dict(hparams))),
        "library_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


class Run:
    """One SO or LoRA training run (state, loop, budget, checkpointing)."""

    model: Any  # the trainable copy of base.model (an open_clip CLIP; open_clip is untyped)
    handle: SparseGradHandle | None  # while an SO optimizer drives sparse gradients
    opt: torch.optim.Optimizer
    step: int
    elapsed: float  # training seconds so far (across resumes)
    epoch_loss: list[float]  # step losses of the current epoch
    epoch_correct: int
    epoch_seen: int
    last_epoch: tuple[float, float] | None  # (mean loss, accuracy) of the last finished epoch
    stopped_early: bool
    phase: str  # "main", then "refine" for an SO run with delta_budget < 1
    main_end: int  # step at which the main phase ended
    refine_end: int  # step at which the refine phase ends
    kept: dict[str, Tensor]  # refine phase: name -> kept flat indices (ascending)

    def __init__(self, base: BaseModel, images: list[Any], labels: list[int], classes: list[str], method: str,
                 hp: dict[str, Any], on_progress: Callable[[Progress], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 checkpoint: str | os.PathLike[str] | None = None,
                 val: tuple[list[Any], list[int]] | None = None) -> None:
        self.base, self.images, self.labels, self.classes = base, images, labels, classes
        # Held-out images (never trained on) and their labels; accuracy reported as val_accuracy.
        self.val_images, val_labels = val if val is not None and val[0] else ([], [])
        self.val_labels_t = torch.tensor(val_labels, dtype=torch.long)
        self.val_cost, self.val_done_at = 0.0, -math.inf  # seconds of the last pass, when it ended
        self.method, self.hp = method, hp
        self.on_progress, self.should_stop = on_progress, should_stop
        self.ckpt = CheckpointFile(checkpoint, run_key(method, hp, classes, labels, base.fingerprint, images))
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
        self.sched = self._schedule(self.total_steps)
        self.tokens = self.base.tokenizer(format_prompts(self.classes, hp["template"])).to(self.device)
        # A frozen tower needs no graph: its features are computed under no_grad.
        enc = hp["encoder"]
        self.train_vision = enc in ("vision", "both")
        self.train_text = enc in ("text", "both")

    def _schedule(self, steps: int, lr: float | None = None) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine from the optimizer's lr to FINAL_LR (at most the peak `lr`) over `steps`."""
        peak = self.hp["lr"] if lr is None else lr
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt, T_max=max(1, steps), eta_min=min(FINAL_LR, peak))

    def _build_so(self) -> None:
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
        hp = self.hp
        params = add_lora(self.model, rank=hp["rank"], alpha=hp["alpha"], dropout=hp["dropout"],
                          encoder=hp["encoder"], positions=hp["positions"])
        self.opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            self.amp_dtype = torch.bfloat16  # mixed precision on GPU (bf16: no loss scaling needed)

    def _drop_handle(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    # ---- delta budget ------------------------------------------------------------------------

    @property
    def budgeted(self) -> bool:
        return self.method == "so" and self.hp["delta_budget"] < 1.0

    def _refine_steps(self, steps_run: int) -> int:
        return math.ceil(self.hp["refine_fraction"] * steps_run) if self.budgeted else 0

    @torch.no_grad()
    def _prune(self) -> tuple[dict[str, Tensor], bool]:
        """Per trained matrix (n entries), keep its changed entries of largest |Δ|, at most
        floor(budget·n), and put the others back to the base value.

        Returns (name -> kept flat indices, ascending; whether any changed entry was dropped). Only
        changed entries are kept, so a budget never makes a delta larger than SO left it."""
        budget = self.hp["delta_budget"]
        kept: dict[str, Tensor] = {}
        dropped = False
        with self.base.lock:  # the base's weights, with no Classifier's delta applied
            base_params = dict(self.base.model.named_parameters())
            for name in self.so_names:
                flat = self.trainable[name].view(-1)  # (n,)
                ref = base_params[name].detach().view(-1).to(flat.device)  # (n,)
                size = (flat.float() - ref.float()).abs()  # (n,) |Δ|
                changed = int((flat != ref).sum())
                k = min(int(budget * flat.numel()), changed)
                dropped |= k < changed
                idx = torch.sort(size, descending=True, stable=True).indices[:k].sort().values  # (k,)
                values = flat.index_select(0, idx)
                flat.copy_(ref)
                flat.index_copy_(0, idx, values)
                kept[name] = idx
        return kept, dropped

    def _start_refine(self, kept: dict[str, Tensor], steps: int) -> None:
        """Refine phase: an SO optimizer pinned to the kept entries, a fresh cosine schedule."""
        hp = self.hp
        self._drop_handle()
        params = []
        for name, p in self.trainable.items():
            p.requires_grad_(kept[name].numel() > 0)  # a matrix that keeps nothing stays at the base
            if p.requires_grad:
                params.append(p)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(hp["seed"] * 2 + 2)
        lr = hp["lr"] * hp["refine_lr_scale"]  # the main phase ended near 1e-6: re-warm gently
        self.opt = SO(params, lr=lr, betas=tuple(hp["betas"]), density=hp["delta_budget"],
                      refresh_every=hp["refresh_every"], generator=gen)
        for name, p in self.trainable.items():
            if p.requires_grad:
                self.opt.fix_support(p, kept[name])
        self.sched = self._schedule(steps, lr)
        self.handle = enable_sparse_grads(self.model, self.opt)
        self.phase, self.refine_end, self.kept = "refine", self.step + steps, kept

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
                txt = text_features(self.model, self.tokens)  # (C, D)
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

    # ---- runs --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        """The run's RNG: global torch RNG seeded, callers' state restored afterwards."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.hp["seed"])
            yield

    def execute(self) -> AdaptResult:
        with self._seeded():
            self._build()
            try:
                self._restore()
                if self.phase == "main":
                    self._run_steps(self.total_steps, main=True)
                    self._finish_main()
                self._run_steps(self.refine_end, main=False)
            finally:
                self._drop_handle()
        self.model.eval()
        result = self._result()
        self.ckpt.remove()
        return result

    def execute_budgets(self, budgets: Sequence[float]) -> dict[float, AdaptResult]:
        """One result per delta budget, training the (budget-independent) main phase once.

        Each result equals that of a separate run with hparams {..., "delta_budget": b}."""
        results: dict[float, AdaptResult] = {}
        hp = self.hp
        with self._seeded():
            self._build()
            try:
                self._restore()
                self._run_steps(self.total_steps, main=True)
                self._drop_handle()
                snap = self._snapshot()
                for b in budgets:
                    self._reset(snap, {**hp, "delta_budget": float(b)})
                    self._finish_main()
                    self._run_steps(self.refine_end, main=False)
                    self._drop_handle()
                    self.model.eval()
                    results[b] = self._result()
            finally:
                self._drop_handle()
        return results

    def _finish_main(self) -> None:
        """End of the main phase: prune to the budget and enter the refine phase (budgeted SO)."""
        self._drop_handle()
        self.main_end = self.refine_end = self.step
        if not self.budgeted:
            return
        kept, dropped = self._prune()
        steps = self._refine_steps(self.step)
        if dropped and steps > 0 and any(i.numel() for i in kept.values()):
            self._start_refine(kept, steps)  # nothing dropped: the delta already fits, as trained

    def _snapshot(self) -> dict[str, Any]:
        devices = [self.device] if self.device.type == "cuda" else []
        return {"params": {n: p.detach().clone() for n, p in self.trainable.items()},
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": [torch.cuda.get_rng_state(d) for d in devices],
                "counters": (self.step, self.elapsed, list(self.epoch_loss), self.epoch_correct,
                             self.epoch_seen, self.last_epoch, self.stopped_early)}

    @torch.no_grad()
    def _reset(self, snap: dict[str, Any], hp: dict[str, Any]) -> None:
        """Back to the end of the main phase (a snapshot), with hyperparameters `hp`."""
        self.hp = hp
        for name, value in snap["params"].items():
            self.trainable[name].copy_(value)
            self.trainable[name].requires_grad_(True)
        torch.set_rng_state(snap["rng_cpu"])
        if snap["rng_cuda"]:
            torch.cuda.set_rng_state(snap["rng_cuda"][0], self.device)
        (self.step, self.elapsed, epoch_loss, self.epoch_correct, self.epoch_seen, self.last_epoch,
         self.stopped_early) = snap["counters"]
        self.epoch_loss = list(epoch_loss)
        self.phase, self.kept = "main", {}

    def _planned(self) -> int:
        """Planned steps as known now: the main phase's, extended once a refine phase starts (whether
        one runs is only known after pruning: a delta that already fits the budget needs none)."""
        return self.refine_end if self.phase == "refine" else self.total_steps

    def _run_steps(self, end: int, *, main: bool) -> None:
        """Steps until `end` (main phase: or until converged); progress, cancellation, checkpoints."""
        self.model.train()
        t_start = time.perf_counter() - self.elapsed
        last_report = last_save = time.perf_counter()
        saved_at = self.step
        while self.step < end:
            if self.should_stop is not None and self.should_stop():
                self._save(time.perf_counter() - t_start)
                raise Cancelled(f"training stopped at step {self.step}/{self._planned()}")
            loss, correct, n = self._step(self.step)
            self.step += 1
            self.epoch_loss.append(loss)
            self.epoch_correct += correct
            self.epoch_seen += n
            epoch_end = self.step % self.steps_per_epoch == 0
            stop_early = main and epoch_end and self._converged()
            now = time.perf_counter()
            final = stop_early or self.step == end
            if self.on_progress is not None and (final or now - last_report >= PROGRESS_EVERY_S):
                self.on_progress(self._progress(now - t_start, final=final))
                last_report = now
            if epoch_end:
                self.last_epoch = (sum(self.epoch_loss) / len(self.epoch_loss),
                                   self.epoch_correct / max(1, self.epoch_seen))
                self.epoch_loss, self.epoch_correct, self.epoch_seen = [], 0, 0
            if stop_early:
                self.stopped_early = True
                break
            if self.ckpt and (self.step - saved_at >= CHECKPOINT_EVERY_STEPS
                              or now - last_save >= CHECKPOINT_EVERY_S):
                self._save(now - t_start)
                saved_at, last_save = self.step, time.perf_counter()
        self.elapsed = time.perf_counter() - t_start

    def _converged(self) -> bool:
        if self.method != "so":
            return False
        return sum(self.epoch_loss) / len(self.epoch_loss) < self.hp["early_stop_loss"]

    def _progress(self, elapsed: float, final: bool = False) -> Progress:
        done_now = max(1, self.step - self.start_step)
        rate = (elapsed - self.start_elapsed) / done_now  # seconds per step in this process
        loss = sum(self.epoch_loss) / max(1, len(self.epoch_loss))
        acc = self.epoch_correct / max(1, self.epoch_seen)
        planned = self._planned()
        eta = max(0.0, rate * (planned - self.step))
        lr = float(self.opt.param_groups[0]["lr"])
        return Progress(self.step, planned, loss, acc, eta, lr, elapsed, self._val_if_due(final))

    def _val_if_due(self, final: bool) -> float | None:
        """Accuracy on the held-out images when a pass is due (see VAL_COST_FACTOR), else None."""
        now = time.perf_counter()
        if not self.val_images or not (final or now - self.val_done_at >= VAL_COST_FACTOR * self.val_cost):
            return None
        self.model.eval()  # no dropout; eval preprocessing draws no random numbers
        try:
            acc = self._accuracy(self.val_images, self.val_labels_t)
        finally:
            self.model.train()
        self.val_done_at = time.perf_counter()
        self.val_cost = self.val_done_at - now
        return acc

    # ---- result ------------------------------------------------------------------------------

    @torch.no_grad()
    def _accuracy(self, images: list[Any], labels: Tensor) -> float:
        """Top-1 accuracy of the adapted model on (non-augmented) images with labels (n,)."""
        txt = text_features(self.model, self.tokens)
        correct = 0
        for s in range(0, len(images), 64):
            chunk = images[s:s + 64]
            x = torch.stack([self.base.preprocess_eval(im) for im in chunk]).to(self.device)
            img = F.normalize(self.model.encode_image(x), dim=-1)
            pred = (img.float() @ txt.float().t()).argmax(1).cpu()
            correct += int((pred == labels[s:s + 64]).sum())
        return correct / len(images)

    @torch.no_grad()
    def _probabilities(self, images: list[Any]) -> Tensor:
        """(n, C) softmax over logit_scale · cos(image, class) of (non-augmented) images."""
        txt = text_features(self.model, self.tokens).float()
        scale = float(self.model.logit_scale.exp())
        out = []
        for s in range(0, len(images), 64):
            x = torch.stack([self.base.preprocess_eval(im) for im in images[s:s + 64]]).to(self.device)
            img = F.normalize(self.model.encode_image(x), dim=-1).float()
            out.append((scale * img @ txt.t()).softmax(dim=-1).cpu())
        return torch.cat(out)

    def _result(self) -> AdaptResult:
        meta = result_meta(self.base, self.classes, self.method, self.hp)
        emb = embed_tokens(self.model, self.tokens).cpu()  # adapted text encoder (C, D)
        if self.method == "so":
            with self.base.lock:
                delta = SparseDelta.from_models(self.base.model, self.model, names=self.so_names, meta=meta)
        else:
            delta = self._lora_delta(meta)
        delta.extras[CLASS_EMBEDDINGS] = emb
        probs = self._probabilities(self.val_images).tolist() if self.val_images else None
        return AdaptResult(delta, emb, self._metrics(delta, probs), self.method, dict(self.hp), probs)

    def _metrics(self, delta: SparseDelta, val_probs: list[list[float]] | None) -> dict[str, Any]:
        last_loss = self.last_epoch[0] if self.last_epoch else None
        metrics: dict[str, Any] = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "shots": self.shots,
            "epochs": self.step / self.steps_per_epoch,
            "stopped_early": self.stopped_early,
            "final_loss": last_loss,
            "train_accuracy": self._accuracy(self.images, self.labels_t),
            "train_seconds": self.elapsed,
            "nnz": delta.nnz,
        }
        if val_probs is not None:  # the final model on the held-out images
            report = evaluate(val_probs, self.val_labels_t.tolist(), len(self.classes))
            metrics.update(val_accuracy=report.accuracy, val_images=len(self.val_images),
                           train_images=len(self.images),
                           validation={"mode": "holdout", **report_json(report, self.classes)})
        if self.method == "so":
            trained = sum(p.numel() for p in self.trainable.values())
            metrics.update(trained_entries=trained, delta_fraction=delta.nnz / max(1, trained),
                           refine_steps=self.step - self.main_end if self.phase == "refine" else 0)
        return metrics

    def _lora_delta(self, meta: dict[str, Any]) -> SparseDelta:
        delta = SparseDelta.empty(meta)
        params = dict(self.model.named_parameters())
        for name, row_start, B, A, scale in lora_delta_parts(self.model):
            delta.add_lowrank(name, row_start, B, A, scale, param_numel=params[name].numel())
        return delta

    # ---- checkpointing -----------------------------------------------------------------------

    def _restore(self) -> None:
        """Fresh state, or the state of a matching checkpoint (either phase)."""
        self.step, self.elapsed = 0, 0.0
        self.epoch_loss = []
        self.epoch_correct = self.epoch_seen = 0
        self.last_epoch = None
        self.stopped_early = False
        self.phase, self.refine_end, self.main_end, self.kept = "main", 0, 0, {}
        state = self.ckpt.read(self.device)
        if state is not None and set(state.get("params", {})) == set(self.trainable):
            self._load_state(state)
        self.start_step, self.start_elapsed = self.step, self.elapsed

    @torch.no_grad()
    def _load_state(self, state: dict[str, Any]) -> None:
        for name, value in state["params"].items():
            self.trainable[name].copy_(value)
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        if state.get("phase") == "refine":
            self.main_end = int(state["main_end"])
            self._start_refine(dict(state["kept"]), int(state["refine_end"]) - self.step)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.epoch_loss = list(state["epoch_loss"])
        self.epoch_correct, self.epoch_seen = int(state["epoch_correct"]), int(state["epoch_seen"])
        last = state["last_epoch"]
        self.last_epoch = (float(last[0]), float(last[1])) if last else None
        self.stopped_early = bool(state.get("stopped_early", False))

    def _save(self, elapsed: float) -> None:
        if not self.ckpt:
            return
        state = {
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
            "stopped_early": self.stopped_early,
            "phase": self.phase,
        }
        if self.phase == "refine":
            state.update(main_end=self.main_end, refine_end=self.refine_end,
                         kept={n: i.cpu() for n, i in self.kept.items()})
        self.ckpt.write(state)
