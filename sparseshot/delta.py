"""Sparse weight deltas: what an adaptation changed in a base model, stored compactly and applied exactly.

A `SparseDelta` holds, per parameter name, the entries an adaptation changed:

- ``sparse`` encoding: flat indices (int32 when the tensor has fewer than 2**31 entries, else int64)
  plus one value per index;
- ``dense`` encoding: one value per entry of the tensor, used when it is smaller than the sparse one
  (more than about half the entries changed);
- ``lowrank`` entries (LoRA): ``W[row_start:row_start + rows] += scale * B @ A``.

Values are stored in one of two modes:

- ``assign`` (the default, fp32 values of fp32/fp16/bf16 parameters): the adapted values themselves are
  stored and `apply` writes them, ``W.flatten()[idx] = v``, so the adapted model is reproduced bit for bit;
- ``add`` (requested with ``value_dtype=torch.float16`` or ``torch.bfloat16`` on fp32 parameters): the
  differences are stored in half precision and added, ``W.flatten()[idx] += d``. The file is smaller but
  the adapted weights are only approximated (rounding of the differences to half precision).

In both modes `revert` restores the base bit for bit: `apply` keeps the original values of every entry
it touches and `revert` writes them back (no subtraction).

The file is a single safetensors file. Its metadata carries a JSON index of the entries, the user meta
(base model identity and weight fingerprint, classes, template, method, hyperparameters, library
version, creation time) and a sha256 over index, meta and tensor bytes, checked on load.

Where things live: the entries and their checks in sparseshot.delta_entries, the file format and its
digest in sparseshot.delta_format, the base-weight fingerprint in sparseshot.fingerprint; this module
holds `SparseDelta` and applies and reverts it.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseshot import __version__
from sparseshot.delta_entries import (
    DeltaEntry,
    DeltaError,
    LowRankEntry,
    entry_between,
    lowrank_entry,
    sparse_entry,
)
from sparseshot.delta_format import FORMAT_NAME, FORMAT_VERSION, DeltaContents, decode, encode
from sparseshot.fingerprint import ModelOrState, state_of, weights_fingerprint
from sparseshot.io import atomic_write

__all__ = ["CLASS_EMBEDDINGS", "FORMAT_NAME", "FORMAT_VERSION", "DeltaError", "ModelOrState", "SparseDelta",
           "is_applied", "weights_fingerprint"]

CLASS_EMBEDDINGS = "class_embeddings"

# Which SparseDelta is applied to which model, with the originals needed to revert it: per write,
# (target, where, original values), where is None (all of a flat view), flat indices or a row slice.
_Original = tuple[torch.Tensor, torch.Tensor | slice | None, torch.Tensor]
_Originals = list[_Original]
_APPLIED: weakref.WeakKeyDictionary[nn.Module, tuple[SparseDelta, _Originals]] = weakref.WeakKeyDictionary()
_APPLIED_LOCK = threading.Lock()


class SparseDelta:
    """Changed weights of an adapted model relative to its base, plus extras and metadata."""

    def __init__(self, meta: Mapping[str, Any] | None = None) -> None:
        self.entries: list[DeltaEntry] = []
        self.lowrank: list[LowRankEntry] = []
        self.extras: dict[str, torch.Tensor] = {}
        self.meta: dict[str, Any] = dict(meta or {})
        self.meta.setdefault("library_version", __version__)
        self.meta.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self._nbytes: int | None = None  # size of the serialised file, once known

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def empty(cls, meta: Mapping[str, Any] | None = None) -> SparseDelta:
        return cls(meta)

    @classmethod
    def from_models(
        cls,
        base: ModelOrState,
        adapted: ModelOrState,
        *,
        names: Iterable[str] | None = None,
        value_dtype: torch.dtype = torch.float32,
        meta: Mapping[str, Any] | None = None,
    ) -> SparseDelta:
        """Delta taking `base` to `adapted`.

        names: parameters to compare (default: every floating-point tensor that differs). Named tensors
        that did not change are kept as empty entries so that `density` counts them.
        value_dtype: float32 (exact, default) or float16/bfloat16 (smaller, approximate; see module doc).
        meta: stored as is; base_fingerprint defaults to the fingerprint of `base`.
        """
        if value_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"value_dtype must be torch.float32, float16 or bfloat16, got {value_dtype}")
        base_state = state_of(base)
        adapted_state = state_of(adapted)
        meta = dict(meta or {})
        if not meta.get("base_fingerprint"):
            meta["base_fingerprint"] = weights_fingerprint(base_state)
        delta = cls(meta)
        explicit = names is not None
        wanted = list(names) if names is not None else sorted(adapted_state)
        for name in wanted:
            if name not in base_state or name not in adapted_state:
                where = "base" if name not in base_state else "adapted model"
                raise DeltaError(f"parameter {name!r} is missing from the {where}")
            b, a = base_state[name], adapted_state[name]
            if not explicit and (not b.is_floating_point() or b.shape != a.shape):
                continue
            entry = entry_between(name, b, a, value_dtype)
            if explicit or entry.nnz:
                delta.entries.append(entry)
        return delta

    def add_lowrank(
        self, name: str, row_start: int, B: torch.Tensor, A: torch.Tensor, scale: float,
        *, param_numel: int | None = None,
    ) -> None:
        """Record ``W[row_start:row_start + rows] += scale * B @ A``; B (rows, r), A (r, cols).

        Stored in fp32; `apply` adds the product in fp32 (approximate like any float update) and
        `revert` restores the original rows exactly. param_numel (entries of W) only feeds `density`.
        """
        self.lowrank.append(lowrank_entry(name, row_start, B, A, scale, param_numel=param_numel))
        self._nbytes = None

    def add_sparse(self, name: str, base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Record ``W.flatten()[indices] = values`` ("assign" mode) for parameter `name` of base value
        `base`, without comparing whole tensors; indices ascending and distinct, values in W's dtype
        or fp32. Benchmarks and tools that know what they changed use it."""
        entry = sparse_entry(name, base, indices, values)
        self.entries.append(entry)
        self._nbytes = None

    # ---- properties -----------------------------------------------------------------------------

    @property
    def class_embeddings(self) -> torch.Tensor | None:
        return self.extras.get(CLASS_EMBEDDINGS)

    @property
    def names(self) -> list[str]:
        """Parameter names the delta touches, in first-seen order."""
        seen: dict[str, None] = {}
        for e in self.entries:
            seen.setdefault(e.name, None)
        for lr in self.lowrank:
            seen.setdefault(lr.name, None)
        return list(seen)

    def _lowrank_coverage(self) -> dict[str, tuple[int, int]]:
        """Per low-rank parameter: (entries its blocks touch, entries of the parameter when known)."""
        rows: dict[str, set[int]] = {}
        cols: dict[str, int] = {}
        size: dict[str, int] = {}
        for lr in self.lowrank:
            rows.setdefault(lr.name, set()).update(range(lr.row_start, lr.row_start + lr.B.shape[0]))
            cols[lr.name] = lr.A.shape[1]
            if lr.param_numel is not None:
                size[lr.name] = lr.param_numel
        return {n: (len(r) * cols[n], size.get(n, len(r) * cols[n])) for n, r in rows.items()}

    @property
    def nnz(self) -> int:
        """Number of base-weight entries the delta changes (low-rank: the rows × cols its blocks cover)."""
        total = sum(e.nnz for e in self.entries)
        total += sum(touched for touched, _ in self._lowrank_coverage().values())
        return total

    @property
    def density(self) -> float:
        """nnz / total entries of the parameters the delta names.

        For low-rank parameters added without `param_numel`, the denominator is the block area.
        """
        sizes: dict[str, int] = {e.name: e.numel for e in self.entries}
        for name, (_, numel) in self._lowrank_coverage().items():
            sizes.setdefault(name, numel)
        total = sum(sizes.values())
        return self.nnz / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Size in bytes of the serialised file (what storage and transfer cost)."""
        if self._nbytes is None:
            self._nbytes = len(self.to_bytes())
        return self._nbytes

    def __repr__(self) -> str:
        return (f"SparseDelta(tensors={len(self.entries)}, lowrank={len(self.lowrank)}, nnz={self.nnz}, "
                f"extras={sorted(self.extras)}, method={self.meta.get('method')!r})")

    # ---- file format ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        data = encode(DeltaContents(self.meta, self.entries, self.lowrank, self.extras))
        self._nbytes = len(data)
        return data

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: temp file in the same directory, fsync, then rename over `path`."""
        data = self.to_bytes()
        atomic_write(path, lambda fh: fh.write(data))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SparseDelta:
        """Read and verify a delta file; DeltaError if it is not one, is truncated or was modified."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DeltaError(f"cannot read delta file {str(path)!r}: {e}") from None
        try:
            return cls.from_bytes(data)
        except DeltaError as e:
            raise DeltaError(f"{str(path)!r}: {e}") from None

    @classmethod
    def from_bytes(cls, data: bytes) -> SparseDelta:
        """A delta from a file's bytes, verified (see sparseshot.delta_format); DeltaError otherwise."""
        contents = decode(data)
        delta = cls(contents.meta)
        delta.entries, delta.lowrank, delta.extras = contents.entries, contents.lowrank, contents.extras
        delta._nbytes = len(data)
        return delta

    def adapted_tensor(self, name: str, base: torch.Tensor, *, lowrank: bool = True) -> torch.Tensor:
        """A new tensor: `base` (the base model's parameter `name`) with this delta's entries for
        `name` written as `apply` writes them (then its low-rank blocks when `lowrank`).

        `base` itself is never written, so this is safe on a shared model (serving preparation).
        """
        out = base.detach().clone().contiguous()
        with torch.no_grad():
            for e in self.entries:
                if e.name == name:
                    _apply_entry(out, e)
            for lr in self.lowrank if lowrank else ():
                if lr.name == name:
                    _apply_lowrank(out, lr)
        return out

    # ---- checking and applying ------------------------------------------------------------------

    def check(self, model: ModelOrState, *, fingerprint: str | None = None) -> None:
        """Raise DeltaError unless the delta fits `model`: base fingerprint (when the delta records one),
        parameter names and shapes. `fingerprint` may pass the model's known fingerprint to skip hashing."""
        state = state_of(model, keep_vars=True)
        self._check_shapes(state)
        expected = self.meta.get("base_fingerprint")
        if expected:
            actual = fingerprint if fingerprint is not None else weights_fingerprint(state)
            if actual != expected:
                raise DeltaError(
                    f"base model mismatch: the delta was made for base {self.meta.get('base_model')!r} "
                    f"with weight fingerprint {expected[:16]}…, the model's fingerprint is {actual[:16]}…"
                )

    def _check_shapes(self, state: Mapping[str, torch.Tensor]) -> None:
        for e in self.entries:
            t = state.get(e.name)
            if t is None:
                raise DeltaError(f"base model mismatch: the model has no parameter {e.name!r}")
            if tuple(t.shape) != e.shape:
                raise DeltaError(f"base model mismatch: {e.name!r} has shape {tuple(t.shape)} in the model, "
                                 f"{e.shape} in the delta")
        for lr in self.lowrank:
            t = state.get(lr.name)
            if t is None:
                raise DeltaError(f"base model mismatch: the model has no parameter {lr.name!r}")
            rows, cols = lr.B.shape[0], lr.A.shape[1]
            if t.dim() != 2 or t.shape[1] != cols or lr.row_start + rows > t.shape[0]:
                raise DeltaError(
                    f"base model mismatch: low-rank block rows {lr.row_start}:{lr.row_start + rows} × {cols} "
                    f"cols does not fit {lr.name!r} of shape {tuple(t.shape)}"
                )
        for name in self.names:
            t = state[name]
            if not t.is_contiguous():
                raise DeltaError(f"parameter {name!r} is not contiguous; cannot apply a delta in place")

    def apply(self, model: nn.Module, *, check: bool = True, fingerprint: str | None = None) -> None:
        """Write the delta into `model` in place, all or nothing.

        check=True verifies the base fingerprint too (hashes the weights unless `fingerprint` is given);
        names and shapes are always verified before any weight is touched. A model can hold one applied
        delta at a time; `revert` undoes it exactly.
        """
        with _APPLIED_LOCK:
            if model in _APPLIED:
                raise DeltaError("a delta is already applied to this model; revert it first")
            state = state_of(model, keep_vars=True)
            if check:
                self.check(state, fingerprint=fingerprint)
            else:
                self._check_shapes(state)
            originals: _Originals = []
            try:
                with torch.no_grad():
                    for e in self.entries:
                        originals.append(_apply_entry(state[e.name], e))
                    for lr in self.lowrank:
                        originals.append(_apply_lowrank(state[lr.name], lr))
            except BaseException:
                _restore(originals)
                raise
            _APPLIED[model] = (self, originals)

    def revert(self, model: nn.Module) -> None:
        """Restore the weights `apply` changed, bit for bit."""
        with _APPLIED_LOCK:
            applied = _APPLIED.get(model)
            if applied is None or applied[0] is not self:
                raise DeltaError("this delta is not applied to this model")
            _restore(applied[1])
            del _APPLIED[model]


def is_applied(model: nn.Module) -> bool:
    """True while some delta is applied to `model`."""
    return model in _APPLIED


def _apply_entry(param: torch.Tensor, e: DeltaEntry) -> _Original:
    """Write one entry; returns (flat view, where, original values) for `_restore`."""
    flat = param.view(-1)  # (n,) shares storage (contiguity checked)
    idx, vals = e.on(flat.device)
    if e.encoding == "dense":
        original = flat.clone()  # (n,)
        new = vals if e.mode == "assign" else original.float() + vals.float()
        flat.copy_(new.to(flat.dtype))
        return flat, None, original
    assert idx is not None  # (k,) int32/int64: both index directly, no conversion needed
    original = flat.index_select(0, idx)  # (k,)
    new = vals if e.mode == "assign" else original.float() + vals.float()
    flat.index_put_((idx,), new.to(flat.dtype))
    return flat, idx, original


def _apply_lowrank(param: torch.Tensor, lr: LowRankEntry) -> _Original:
    rows = slice(lr.row_start, lr.row_start + lr.B.shape[0])
    block = param[rows]  # (rows, cols) view
    original = block.clone()
    update = lr.scale * (lr.B.to(param.device) @ lr.A.to(param.device))  # (rows, cols) fp32
    block.copy_((original.float() + update).to(param.dtype))
    return param, rows, original


def _restore(originals: _Originals) -> None:
    """Write the kept originals back, newest first (entries of one tensor may overlap)."""
    with torch.no_grad():
        for target, where, original in reversed(originals):
            if where is None:
                target.copy_(original)
            elif isinstance(where, torch.Tensor):
                target.index_put_((where,), original)
            else:
                target[where] = original
