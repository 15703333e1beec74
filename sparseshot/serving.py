"""Serving many adapted models on one shared base: prepared deltas and a mixed-model batched forward.

Serving runs only the vision tower (the class embeddings in a delta's extras carry the text side),
so the serving form of a delta, `PreparedDelta`, keeps only its ``visual.*`` part, laid out once
at load for the forward:

- each trained linear map of a residual block (``attn.in_proj_weight``, ``attn.out_proj.weight``,
  ``mlp.c_fc.weight``, ``mlp.c_proj.weight``) becomes a `LinearDelta`: Δ = adapted − base as a
  CSR matrix (out, in) over its nonzeros (sparse and dense entries, "assign" or "add" values) plus
  the delta's low-rank blocks kept as factors (B, A);
- every other touched vision tensor (biases, layer norms, embeddings, conv1, proj) is kept whole,
  adapted (they are small, or rarely trained).

`ServingEngine.image_features(pixels, groups)` runs a batch whose rows belong to several models
(rows grouped by model, in order). Each linear map computes the base product once for the whole
batch, then adds each model's correction on that model's rows only: ``y[rows] += (Δ @ x[rows]ᵀ)ᵀ``
(all models of a layer in one call of the compiled kernel, `sparseshot.kernels`; torch CSR × dense
on other devices or without a C compiler) and
``scale · (x A ᵀ) Bᵀ`` for low-rank blocks. Where a layer's delta is dense enough that this costs
more than a dense product (a cost model per layer: ``nnz · sparse_cost + low-rank work > in · out``),
that model's rows are recomputed with its adapted weight, built on demand in a byte-bounded LRU
(`DenseWeights`) shared by the engine; when it does not fit, the sparse path is used.

The shared base weights are only read: no apply/revert and no lock, so concurrent forwards (and
training jobs copying the base) are safe. Results equal "apply the delta, then forward" within
fp32 rounding.
"""

from __future__ import annotations

import itertools
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseshot import kernels
from sparseshot.base import BaseModel
from sparseshot.classifier import DEFAULT_TEMPLATE, Classifier
from sparseshot.delta import DeltaError, SparseDelta
from sparseshot.sparse_grad import PlainAttention

__all__ = ["DenseWeights", "LinearDelta", "PreparedDelta", "ServingEngine", "ServingError", "prepare"]

VISION_PREFIX = "visual."
LINEAR_SUFFIXES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Cost of one nonzero of a CSR correction, in multiply-adds of a dense product, measured on CPU
# (`benchmarks/kernel.py`): torch.sparse.mm reaches ~1/10 of a dense GEMM's throughput per stored
# entry, the compiled kernel ~1/4 (it breaks even with the dense product near 25 % density).
SPARSE_COST = 10.0
KERNEL_SPARSE_COST = 4.0
LOWRANK_COST = 1.5  # per multiply-add of the two thin products (small GEMMs run below peak)
DENSE_CACHE_BYTES = 512 * 1024 * 1024  # holds every linear layer of one ViT-B vision tower (340 MB)
# Forwards in a row that one model has alone (its rows are the whole batch) before its layers run
# on dense adapted weights: then the model costs exactly the base's product, no correction at all.
SOLO_STREAK = 3

_keys = itertools.count()


class ServingError(RuntimeError):
    """The base model's vision tower has a layout the serving engine does not implement."""


# --------------------------------------------------------------------------------------------------
# Prepared deltas


@dataclass
class LinearDelta:
    """Δ of one linear weight W (out, in): CSR nonzeros plus low-rank blocks on row ranges."""

    name: str
    shape: tuple[int, int]
    csr: Tensor | None  # (out, in) fp32 sparse CSR of adapted − base, None when empty
    nnz: int
    lowrank: list[tuple[int, Tensor, Tensor, float]]  # (row_start, B (rows, r), A (r, in), scale)
    dense: bool = False  # the cost model prefers a dense adapted weight for this layer
    # The CSR part in the compiled kernel's layout (same storage), None when the kernel cannot take it.
    kernel: kernels.CSR | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        csr = self.csr
        if csr is not None and kernels.takes(csr.crow_indices(), csr.col_indices(), csr.values()):
            self.kernel = kernels.CSR(csr.crow_indices(), csr.col_indices(), csr.values(), self.shape)

    @property
    def nbytes(self) -> int:
        total = 0
        if self.csr is not None:
            parts = (self.csr.crow_indices(), self.csr.col_indices(), self.csr.values())
            total += sum(t.numel() * t.element_size() for t in parts)
        for _, b, a, _ in self.lowrank:
            total += (b.numel() + a.numel()) * 4
        return total

    def cost(self) -> float:
        """Estimated work per input row, in dense multiply-adds (the cost model)."""
        lr = sum(a.shape[0] * (a.shape[1] + b.shape[0]) for _, b, a, _ in self.lowrank)
        return self.nnz * (KERNEL_SPARSE_COST if self.on_kernel else SPARSE_COST) + lr * LOWRANK_COST

    @property
    def on_kernel(self) -> bool:
        """The compiled kernel takes this CSR (`kernels.takes`)."""
        return self.kernel is not None

    def correct(self, x: Tensor, y: Tensor, *, csr: bool = True) -> None:
        """y += x Δᵀ in place (the CSR part only when `csr`); x (n, in), y (n, out), views of one
        model's rows."""
        x32 = x.float()
        if csr and self.csr is not None:
            y += torch.sparse.mm(self.csr, x32.t().contiguous()).t().to(y.dtype)  # (n, out)
        for row_start, b, a, scale in self.lowrank:
            rows = slice(row_start, row_start + b.shape[0])
            y[:, rows] += (scale * (x32 @ a.t()) @ b.t()).to(y.dtype)  # (n, rows)

    def adapted(self, base: Tensor) -> Tensor:
        """The dense adapted weight (out, in) in the base's dtype (for the dense fallback)."""
        w = base.detach().float().clone()
        if self.csr is not None:
            w += self.csr.to_dense()
        for row_start, b, a, scale in self.lowrank:
            w[row_start : row_start + b.shape[0]] += scale * (b @ a)
        return w.to(base.dtype)


@dataclass
class PreparedDelta:
    """The serving form of one model: classes, class embeddings and the vision part of its delta."""

    classes: list[str]
    class_embeddings: Tensor  # (C, D) fp32, L2-normalised, on the base's device
    linears: dict[str, LinearDelta] = field(default_factory=dict)
    overrides: dict[str, Tensor] = field(default_factory=dict)  # name -> whole adapted tensor
    key: int = field(default_factory=lambda: next(_keys))  # identity for the dense-weight cache

    @property
    def nbytes(self) -> int:
        """Memory held beyond the shared base (what the serving LRU budgets)."""
        emb = self.class_embeddings.numel() * self.class_embeddings.element_size()
        over = sum(t.numel() * t.element_size() for t in self.overrides.values())
        return emb + over + sum(lin.nbytes for lin in self.linears.values())

    @property
    def touches_weights(self) -> bool:
        return bool(self.linears or self.overrides)


def _is_linear(name: str) -> bool:
    return name.startswith(VISION_PREFIX + "transformer.resblocks.") and name.endswith(LINEAR_SUFFIXES)


def _csr_of(diff: Tensor) -> tuple[Tensor | None, int]:
    """(CSR of the nonzeros of diff (out, in) fp32, nnz); None when diff is all zero."""
    nnz = int(torch.count_nonzero(diff))
    if nnz == 0:
        return None, 0
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        csr = diff.to_sparse_csr()
        if diff.numel() < 2**31:  # int32 indices: 8 bytes per nonzero instead of 12, same speed
            crow, col = csr.crow_indices().int(), csr.col_indices().int()
            csr = torch.sparse_csr_tensor(crow, col, csr.values(), diff.shape)
        return csr, nnz


def _sparse_csr(delta: SparseDelta, name: str, w: Tensor) -> tuple[Tensor | None, int] | None:
    """CSR of Δ straight from one sparse entry (no dense copy); None when the entries of `name` are
    not a single sparse entry with distinct indices (then the dense difference is taken)."""
    entries = [e for e in delta.entries if e.name == name]
    if len(entries) != 1 or entries[0].encoding != "sparse" or entries[0].indices is None:
        return None
    e = entries[0]
    assert e.indices is not None
    idx, order = e.indices.long().sort()  # (k,) flat indices, row-major
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        return None  # repeated indices: `apply` semantics need the sequential writes
    flat = w.detach().reshape(-1).cpu()
    # index_select, not flat[idx]: advanced indexing took ~12 ms for 12k entries of a 2.4M-entry
    # matrix on CPU, index_select 0.03 ms (a cold model's preparation is 48 such matrices).
    orig = flat.index_select(0, idx)
    vals = e.values.index_select(0, order)
    new = vals.to(w.dtype) if e.mode == "assign" else (orig.float() + vals.float()).to(w.dtype)
    diff = new.float() - orig.float()  # (k,) Δ values, as `apply` would change the weight
    out, cols = w.shape
    rows = torch.div(idx, cols, rounding_mode="floor")
    crow = torch.zeros(out + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=out).cumsum(0)
    kind = torch.int32 if w.numel() < 2**31 else torch.int64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(crow.to(kind), (idx - rows * cols).to(kind), diff, (out, cols))
    return (csr.to(w.device), int(idx.numel())) if idx.numel() else (None, 0)


def _linear_delta(delta: SparseDelta, name: str, w: Tensor, with_entries: bool) -> LinearDelta:
    """Δ of weight `name` (base value w): entries as CSR (adapted − base, fp32), low-rank as factors."""
    csr, nnz = None, 0
    fast = _sparse_csr(delta, name, w) if with_entries else None
    if fast is not None:
        csr, nnz = fast
    elif with_entries:
        diff = delta.adapted_tensor(name, w, lowrank=False).float() - w.float()  # (out, in)
        csr, nnz = _csr_of(diff.cpu())
        csr = None if csr is None else csr.to(w.device)
    blocks = [(lr.row_start, lr.B.to(w.device), lr.A.to(w.device), lr.scale)
              for lr in delta.lowrank if lr.name == name]
    return LinearDelta(name, (w.shape[0], w.shape[1]), csr, nnz, blocks)


def _class_embeddings(base: BaseModel, delta: SparseDelta | None, classes: list[str]) -> Tensor:
    """(C, D) from the delta's extras, or the base text tower when the delta does not change it."""
    emb = delta.class_embeddings if delta is not None else None
    if emb is None:
        if delta is not None and any(not n.startswith(VISION_PREFIX) for n in delta.names):
            raise DeltaError("the delta changes the text tower but carries no class embeddings")
        template = (delta.meta.get("template") if delta is not None else None) or DEFAULT_TEMPLATE
        emb = Classifier.encode_texts(base, classes, template)
    if emb.dim() != 2 or emb.shape[0] != len(classes):
        raise DeltaError(f"class embeddings of shape {tuple(emb.shape)} do not fit {len(classes)} classes")
    return F.normalize(emb.detach().float(), dim=-1).to(base.device)


def prepare(
    base: BaseModel, delta: SparseDelta | None, *, classes: Sequence[str] | None = None,
    dense_threshold: float | None = None,
) -> PreparedDelta:
    """The serving form of `delta` over `base` (checked against its fingerprint): done once at load.

    dense_threshold: force the per-layer choice (dense when nnz/numel exceeds it); default: the
    cost model (`LinearDelta.cost` against a dense product).
    """
    meta = delta.meta if delta is not None else {}
    names = list(classes) if classes is not None else list(meta.get("classes") or [])
    if not names:
        raise DeltaError("no class names: the delta's meta has no 'classes'")
    if delta is not None:
        delta.check(base.model, fingerprint=base.fingerprint)
    prepared = PreparedDelta(names, _class_embeddings(base, delta, names))
    if delta is None:
        return prepared
    state = dict(base.model.state_dict())
    entry_names = {e.name for e in delta.entries}
    for name in delta.names:
        if not name.startswith(VISION_PREFIX):
            continue  # the text tower's part is in the class embeddings
        w = state[name]
        if _is_linear(name):
            lin = _linear_delta(delta, name, w, name in entry_names)
            threshold = dense_threshold
            lin.dense = (lin.nnz > threshold * w.numel()) if threshold is not None else lin.cost() > w.numel()
            prepared.linears[name] = lin
        else:
            prepared.overrides[name] = delta.adapted_tensor(name, w)
    return prepared


# --------------------------------------------------------------------------------------------------
# Dense weights of dense-enough layers


class DenseWeights:
    """LRU of adapted dense weights, keyed by (prepared delta, layer), under a byte budget.

    An entry used by the current or the previous forward is never evicted to make room: when a
    model's layers do not all fit, it keeps those it has and runs the others sparse, instead of
    evicting its own earlier layers on every forward (the thrash of a cyclic scan through an LRU)."""

    def __init__(self, budget_bytes: int = DENSE_CACHE_BYTES) -> None:
        self.budget_bytes = int(budget_bytes)
        self._items: OrderedDict[tuple[int, str], tuple[Tensor, int]] = OrderedDict()  # -> (W, forward)
        self._bytes = 0
        self._forward = 0  # forwards started (the clock of "recently used")
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def tick(self) -> int:
        """Start a forward: its number, passed to `get`."""
        with self._lock:
            self._forward += 1
            return self._forward

    def get(self, key: tuple[int, str], nbytes: int, build: Callable[[], Tensor],
            forward: int) -> Tensor | None:
        """The cached tensor, or build() it when `nbytes` can be made room for; else None."""
        if nbytes > self.budget_bytes:
            return None
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items[key] = (hit[0], forward)
                self._items.move_to_end(key)
                return hit[0]
            if not self._make_room(nbytes, forward):
                return None
        tensor = build()  # outside the lock: a build takes milliseconds
        with self._lock:
            if key not in self._items and self._make_room(nbytes, forward):
                self._items[key] = (tensor, forward)
                self._bytes += nbytes
        return tensor

    def _make_room(self, nbytes: int, forward: int) -> bool:
        """Evict least recently used entries not used by this or the previous forward (lock held)."""
        while self._bytes + nbytes > self.budget_bytes:
            oldest = next(iter(self._items), None)
            if oldest is None or self._items[oldest][1] >= forward - 1:
                return False
            old, _ = self._items.pop(oldest)
            self._bytes -= old.numel() * old.element_size()
        return True


# --------------------------------------------------------------------------------------------------
# The batched forward

Segment = tuple[PreparedDelta, int, int]  # (model, first row, row after the last)


@dataclass
class _Pass:
    """One forward: the segments of models that change weights, the dense cache's clock, and whether
    the batch is one hot model alone (then its dense adapted weights replace the base product)."""

    segs: list[Segment]
    forward: int
    solo: bool


class ServingEngine:
    """Mixed-model forward over one shared base's vision tower (open_clip VisionTransformer)."""

    def __init__(self, base: BaseModel, *, dense_cache_bytes: int = DENSE_CACHE_BYTES) -> None:
        self.base = base
        self.visual: Any = base.model.visual  # open_clip VisionTransformer (checked below)
        _check_supported(self.visual)
        self.dense = DenseWeights(dense_cache_bytes)
        scale = getattr(base.model, "logit_scale", None)
        self.logit_scale = float(scale.exp()) if isinstance(scale, Tensor) else 100.0
        self.dtype = next(base.model.parameters()).dtype
        self._streak: tuple[int | None, int] = (None, 0)  # (model key, forwards in a row alone)
        self._streak_lock = threading.Lock()

    # ---- public API ------------------------------------------------------------------------------

    @torch.inference_mode()
    def image_features(self, pixels: Tensor, groups: Sequence[tuple[PreparedDelta | None, int]]) -> Tensor:
        """(B, D) L2-normalised image features; pixels (B, 3, S, S), rows grouped: groups gives
        (model or None for the bare base, number of rows) in row order."""
        if sum(n for _, n in groups) != pixels.shape[0]:
            raise ValueError("groups do not cover the batch rows")
        segs, at = [], 0
        for prepared, n in groups:
            if prepared is not None and prepared.touches_weights and n:
                segs.append((prepared, at, at + n))
            at += n
        x = pixels.to(self.base.device, self.dtype)
        return F.normalize(self._forward(x, self._pass(segs, at)).float(), dim=-1)

    def _pass(self, segs: list[Segment], rows: int) -> _Pass:
        """Count how many forwards in a row one model has had the batch to itself."""
        alone = segs[0][0] if len(segs) == 1 and segs[0][1:] == (0, rows) else None
        with self._streak_lock:
            key = alone.key if alone is not None else None
            last, streak = self._streak
            streak = streak + 1 if key is not None and key == last else int(key is not None)
            self._streak = (key, streak)
        return _Pass(segs, self.dense.tick(), solo=streak >= SOLO_STREAK)

    def probabilities(self, pixels: Tensor, groups: Sequence[tuple[PreparedDelta, int]]) -> list[Tensor]:
        """Per group, (n, C) softmax over logit_scale · cos(image, class) with that model's classes."""
        feats = self.image_features(pixels, groups)
        out, at = [], 0
        for prepared, n in groups:
            logits = self.logit_scale * feats[at : at + n] @ prepared.class_embeddings.T  # (n, C)
            out.append(logits.softmax(dim=-1).cpu())
            at += n
        return out

    # ---- the vision tower -------------------------------------------------------------------------

    def _forward(self, pixels: Tensor, ps: _Pass) -> Tensor:
        v = self.visual
        x = self._embeds(pixels, ps)  # (B, L, width)
        for i, block in enumerate(v.transformer.resblocks):
            x = self._block(x, block, f"visual.transformer.resblocks.{i}", ps)
        if v.final_ln_after_pool:
            pooled, _ = v._global_pool(x)
            pooled = self._norm(pooled, v.ln_post, "visual.ln_post", ps)
        else:
            pooled, _ = v._global_pool(self._norm(x, v.ln_post, "visual.ln_post", ps))
        if v.proj is None:
            return pooled
        out = pooled @ v.proj  # (B, D)
        for p, a, z in ps.segs:
            proj = p.overrides.get("visual.proj")
            if proj is not None:
                out[a:z] = pooled[a:z] @ proj
        return out

    def _embeds(self, pixels: Tensor, ps: _Pass) -> Tensor:
        v = self.visual
        conv = v.conv1
        x = conv(pixels)  # (B, width, g, g)
        for p, a, z in ps.segs:
            w = p.overrides.get("visual.conv1.weight")
            if w is not None:
                x[a:z] = F.conv2d(pixels[a:z], w, conv.bias, conv.stride, conv.padding)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, g², width)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        t = torch.cat([cls, x], dim=1)  # (B, L, width)
        for p, a, z in ps.segs:
            c = p.overrides.get("visual.class_embedding")
            if c is not None:
                t[a:z, 0] = c.to(t.dtype)
        x = t + v.positional_embedding.to(t.dtype)
        for p, a, z in ps.segs:
            pos = p.overrides.get("visual.positional_embedding")
            if pos is not None:
                x[a:z] = t[a:z] + pos.to(t.dtype)
        return self._norm(v.patch_dropout(x), v.ln_pre, "visual.ln_pre", ps)

    def _block(self, x: Tensor, block: Any, name: str, ps: _Pass) -> Tensor:
        h = self._attention(self._norm(x, block.ln_1, f"{name}.ln_1", ps), block.attn, f"{name}.attn", ps)
        x = x + self._scale(h, block.ls_1, f"{name}.ls_1", ps)
        mlp = block.mlp
        h = self._linear(self._norm(x, block.ln_2, f"{name}.ln_2", ps), mlp.c_fc, f"{name}.mlp.c_fc", ps)
        h = self._linear(mlp.gelu(h), mlp.c_proj, f"{name}.mlp.c_proj", ps)
        return x + self._scale(h, block.ls_2, f"{name}.ls_2", ps)

    def _attention(self, x: Tensor, attn: Any, name: str, ps: _Pass) -> Tensor:
        n, length, e = x.shape
        qkv = self._affine(x, attn.in_proj_weight, attn.in_proj_bias, f"{name}.in_proj_weight",
                           f"{name}.in_proj_bias", ps)  # (B, L, 3E)
        h, hd = attn.num_heads, attn.head_dim
        q, k, v = (t.reshape(n, length, h, hd).transpose(1, 2) for t in qkv.split(e, dim=-1))  # (B, H, L, hd)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, e)  # (B, L, E)
        return self._linear(o, attn.out_proj, f"{name}.out_proj", ps)

    # ---- per-model corrections ----------------------------------------------------------------------

    def _linear(self, x: Tensor, lin: Any, name: str, ps: _Pass) -> Tensor:
        return self._affine(x, lin.weight, lin.bias, f"{name}.weight", f"{name}.bias", ps)

    def _affine(self, x: Tensor, w: Tensor, b: Tensor | None, wname: str, bname: str,
                ps: _Pass) -> Tensor:
        """x (B, ..., in) -> (B, ..., out): the base product for all rows, then each model's
        correction on its rows (the CSR parts of all models in one kernel call). A hot model alone
        in the batch, or a layer the cost model marks dense, runs on its dense adapted weight."""
        if ps.solo:  # one hot model is the whole batch: its dense weight replaces the base product
            y = self._dense_linear(x, w, b, wname, bname, ps.segs[0][0], ps)
            if y is not None:
                return y
        y = F.linear(x, w, b)
        y2, x2 = y.view(-1, w.shape[0]), x.reshape(-1, w.shape[1])  # (B·L, out), (B·L, in)
        per = y2.shape[0] // y.shape[0]  # token rows per image (L)
        on_kernel = kernels.rows_fit(y2, x2)
        parts: list[tuple[int, int, kernels.CSR]] = []  # (first row, end row, Δ) for one kernel call
        for p, a, z in ps.segs:
            delta, bias = p.linears.get(wname), p.overrides.get(bname)
            if delta is None and bias is None:
                continue
            dense_y = None
            if delta is not None and delta.dense:
                dense_y = self._dense_linear(x[a:z], w, b, wname, bname, p, ps)
            if dense_y is not None:
                y[a:z] = dense_y
                continue
            ys = y2[a * per : z * per]  # (rows·L, out), a view: updated in place
            if bias is not None:
                ys += (bias - b) if b is not None else bias
            if delta is None:
                continue
            kernel = delta.kernel if on_kernel else None
            if kernel is not None:
                parts.append((a * per, z * per, kernel))
            if kernel is None or delta.lowrank:
                delta.correct(x2[a * per : z * per], ys, csr=kernel is None)
        if parts:
            kernels.csr_add_rows(y2, x2, parts)
        return y

    def _dense_linear(self, x: Tensor, w: Tensor, b: Tensor | None, wname: str, bname: str,
                      p: PreparedDelta, ps: _Pass) -> Tensor | None:
        """x through model p's dense adapted weight (and its bias where it changed one); None when p
        has no Δ for this layer or the weight does not fit the cache (then the correction path runs)."""
        delta = p.linears.get(wname)
        if delta is None:
            return None
        dense = self.dense.get((p.key, delta.name), w.numel() * w.element_size(), lambda: delta.adapted(w),
                               ps.forward)
        if dense is None:
            return None
        bias = p.overrides.get(bname)
        return F.linear(x, dense, bias if bias is not None else b)

    def _norm(self, x: Tensor, ln: Any, name: str, ps: _Pass) -> Tensor:
        y = ln(x)
        if isinstance(ln, nn.Identity):
            return y
        for p, a, z in ps.segs:
            w, b = p.overrides.get(f"{name}.weight"), p.overrides.get(f"{name}.bias")
            if w is not None or b is not None:
                w = ln.weight if w is None else w
                b = ln.bias if b is None else b
                y[a:z] = F.layer_norm(x[a:z], ln.normalized_shape, w, b, ln.eps).to(y.dtype)
        return y

    def _scale(self, x: Tensor, ls: Any, name: str, ps: _Pass) -> Tensor:
        """LayerScale (x · gamma) or identity, with per-model gammas."""
        if isinstance(ls, nn.Identity):
            return x
        y = x * ls.gamma
        for p, a, z in ps.segs:
            g = p.overrides.get(f"{name}.gamma")
            if g is not None:
                y[a:z] = x[a:z] * g
        return y


def _check_supported(visual: Any) -> None:
    """ServingError unless `visual` is the plain open_clip ViT this engine re-implements."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        raise ServingError("the serving engine needs an open_clip VisionTransformer, no attention pooling")
    if visual.training:
        raise ServingError("the base model must be in eval mode")
    for i, block in enumerate(visual.transformer.resblocks):
        mlp = block.mlp
        layers = list(dict(mlp.named_children()))
        ok = (type(block) is ResidualAttentionBlock and isinstance(block.attn, PlainAttention)
              and not hasattr(block, "ln_1_kv") and layers == ["c_fc", "gelu", "c_proj"]
              and all(getattr(block.attn, h) is None for h in ("lora_q", "lora_k", "lora_v")))
        if not ok:
            raise ServingError(f"vision block {i} has a layout the serving engine does not implement")
