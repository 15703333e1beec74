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
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from sparseshot.io import atomic_write

FORMAT_NAME = "sparseshot-delta"
FORMAT_VERSION = 1
CLASS_EMBEDDINGS = "class_embeddings"

_INT32_LIMIT = 2**31
# Bit-pattern views used to compare tensors exactly (NaN and -0.0 included).
_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_HALF_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_DTYPE_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}

ModelOrState = nn.Module | Mapping[str, torch.Tensor]


class DeltaError(ValueError):
    """A delta file is unreadable, or a delta does not fit the model it is applied to."""


# --------------------------------------------------------------------------------------------------
# Fingerprint of base weights


def _state_of(model_or_state: ModelOrState, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return dict(model_or_state.state_dict(keep_vars=keep_vars))
    return dict(model_or_state)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw bytes of a tensor (any dtype, any device), as a flat uint8 view of a contiguous CPU copy."""
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    flat = flat.contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def weights_fingerprint(model_or_state_dict: ModelOrState) -> str:
    """Hex sha256 over (name, dtype, shape, bytes) of every state-dict tensor, in name order.

    Independent of the device the weights live on; ~1 s for ViT-B-16's 600 MB on one core.
    """
    state = _state_of(model_or_state_dict)
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        header = f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0"
        digest.update(header.encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Entries


@dataclass
class _Entry:
    """Changed entries of one parameter (sparse or dense encoding)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the parameter in the base model
    encoding: str  # "sparse" | "dense"
    mode: str  # "assign" | "add"
    values: torch.Tensor  # sparse: (k,); dense: (n,) — CPU
    indices: torch.Tensor | None  # sparse: (k,) int32/int64 ascending flat indices; dense: None
    nnz: int  # entries that differ from the base
    # Copies of (indices, values) on an accelerator, so that repeated applies skip the transfer.
    _device_copies: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def on(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(indices, values) on `device`."""
        if device.type == "cpu":
            return self.indices, self.values
        key = str(device)
        if key not in self._device_copies:
            idx = None if self.indices is None else self.indices.to(device)
            self._device_copies[key] = (idx, self.values.to(device))
        return self._device_copies[key]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class _LowRank:
    """``W[row_start:row_start + B.shape[0]] += scale * B @ A`` for one parameter."""

    name: str
    row_start: int
    B: torch.Tensor  # (rows, r), CPU
    A: torch.Tensor  # (r, cols), CPU
    scale: float
    param_numel: int | None = None  # entries of the whole parameter, for `density`


def _value_mode(param_dtype: torch.dtype, value_dtype: torch.dtype) -> str:
    """'assign' when value_dtype holds every value of param_dtype exactly, else 'add'."""
    if value_dtype == param_dtype:
        return "assign"
    if value_dtype == torch.float32 and param_dtype in (torch.float16, torch.bfloat16):
        return "assign"
    return "add"


def _changed_mask(base: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
    """(n,) bool: entries whose bit patterns differ."""
    b = base.detach().reshape(-1).contiguous()
    a = adapted.detach().reshape(-1).contiguous()
    view = _BIT_VIEWS.get(b.element_size())
    if view is None or b.dtype == torch.bool:
        return b != a
    return b.view(view) != a.view(view)


def _make_entry(name: str, base: torch.Tensor, adapted: torch.Tensor, value_dtype: torch.dtype) -> _Entry:
    if base.shape != adapted.shape:
        raise DeltaError(f"{name}: base shape {tuple(base.shape)} != adapted shape {tuple(adapted.shape)}")
    if not base.is_floating_point():
        raise DeltaError(f"{name}: only floating-point tensors can be stored in a delta (got {base.dtype})")
    adapted = adapted.detach().to(base.device, base.dtype)
    mask = _changed_mask(base, adapted)  # (n,) on the weights' device
    idx = mask.nonzero().reshape(-1)  # (k,) ascending
    n, k = mask.numel(), int(idx.numel())
    mode = _value_mode(base.dtype, value_dtype)
    a_flat, b_flat = adapted.reshape(-1), base.detach().reshape(-1)
    idx_dtype = torch.int32 if n < _INT32_LIMIT else torch.int64
    val_size = torch.empty((), dtype=value_dtype).element_size()
    idx_size = torch.empty((), dtype=idx_dtype).element_size()
    shape = tuple(base.shape)
    if n * val_size <= k * (val_size + idx_size):  # dense is no larger than indices + values
        src = a_flat if mode == "assign" else a_flat.float() - b_flat.float()  # (n,)
        # A copy: on CPU in fp32, `to` would return the live parameter itself, and training that
        # goes on after the delta was taken (the budget branches) would change the stored values.
        values = src.detach().to("cpu", value_dtype, copy=True)
        return _Entry(name, shape, base.dtype, "dense", mode, values, None, k)
    vals = a_flat[idx] if mode == "assign" else a_flat[idx].float() - b_flat[idx].float()  # (k,)
    return _Entry(name, shape, base.dtype, "sparse", mode, vals.to(value_dtype).cpu().contiguous(),
                  idx.to(idx_dtype).cpu(), k)


# --------------------------------------------------------------------------------------------------
# Serialisation helpers


def _canonical_digest(header: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the metadata fields (except the digest itself) and all tensors, in name order."""
    digest = hashlib.sha256()
    for key in sorted(header):
        if key != "sha256":
            digest.update(f"{key}\0{header[key]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def _unshare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors whose storage another tensor already uses (safetensors refuses shared memory)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def _read_safetensors_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise DeltaError("file is too short to be a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise DeltaError(f"header claims {n} bytes but only {len(data) - 8} follow (truncated?)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeltaError(f"header is not valid JSON (corrupted?): {e}") from None
    if not isinstance(header, dict):
        raise DeltaError("header is not a JSON object (corrupted?)")
    return header


def _canonical_file(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written canonically (sorted keys, no spaces).

    safetensors writes the `__metadata__` map in hash order, which changes from process to process;
    re-encoding the header makes `to_bytes` a pure function of the delta (same delta, same bytes,
    same content address). The tensor data is untouched: its offsets are relative to the end of the
    header, whose length is padded to a multiple of 8 with spaces as safetensors does."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


# Which SparseDelta is applied to which model, with the originals needed to revert it.
_Originals = list[tuple[torch.Tensor, Any, torch.Tensor]]  # (target, where, original values)
_APPLIED: weakref.WeakKeyDictionary[nn.Module, tuple[SparseDelta, _Originals]] = weakref.WeakKeyDictionary()
_APPLIED_LOCK = threading.Lock()


def _library_version() -> str:
    from sparseshot import __version__

    return __version__


# --------------------------------------------------------------------------------------------------


class SparseDelta:
    """Changed weights of an adapted model relative to its base, plus extras and metadata."""

    def __init__(self, meta: Mapping[str, Any] | None = None) -> None:
        self.entries: list[_Entry] = []
        self.lowrank: list[_LowRank] = []
        self.extras: dict[str, torch.Tensor] = {}
        self.meta: dict[str, Any] = dict(meta or {})
        self.meta.setdefault("library_version", _library_version())
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
        base_state = _state_of(base)
        adapted_state = _state_of(adapted)
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
            entry = _make_entry(name, b, a, value_dtype)
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
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise DeltaError(f"{name}: low-rank factors must be B (rows, r) and A (r, cols), "
                             f"got {tuple(B.shape)} and {tuple(A.shape)}")
        if row_start < 0:
            raise DeltaError(f"{name}: row_start must be >= 0, got {row_start}")
        B32 = B.detach().float().cpu().contiguous()
        A32 = A.detach().float().cpu().contiguous()
        numel = None if param_numel is None else int(param_numel)
        self.lowrank.append(_LowRank(name, int(row_start), B32, A32, float(scale), numel))
        self._nbytes = None

    def add_sparse(self, name: str, base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Record ``W.flatten()[indices] = values`` ("assign" mode) for parameter `name` of base value
        `base`, without comparing whole tensors; indices ascending and distinct, values in W's dtype
        or fp32. Benchmarks and tools that know what they changed use it."""
        n = base.numel()
        kind = torch.int32 if n < _INT32_LIMIT else torch.int64
        value_dtype = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
        vals = values.detach().to(value_dtype).cpu().contiguous()
        entry = _Entry(name, tuple(base.shape), base.dtype, "sparse", "assign", vals,
                       indices.to(kind).cpu().contiguous(), int(indices.numel()))
        _validate_entry(entry)
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

    def _to_tensors_and_header(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors: dict[str, torch.Tensor] = {}
        index: list[dict[str, Any]] = []
        for i, e in enumerate(self.entries):
            key = f"t{i}"
            tensors[f"{key}.values"] = e.values.contiguous()
            if e.indices is not None:
                tensors[f"{key}.indices"] = e.indices.contiguous()
            index.append({"kind": "tensor", "key": key, "name": e.name, "shape": list(e.shape),
                          "dtype": _DTYPE_NAMES[e.dtype], "encoding": e.encoding, "mode": e.mode,
                          "nnz": e.nnz})
        for i, lr in enumerate(self.lowrank):
            key = f"l{i}"
            tensors[f"{key}.B"] = lr.B
            tensors[f"{key}.A"] = lr.A
            index.append({"kind": "lowrank", "key": key, "name": lr.name, "row_start": lr.row_start,
                          "scale": lr.scale, "param_numel": lr.param_numel})
        for name, t in self.extras.items():
            tensors[f"extra.{name}"] = t.detach().cpu().contiguous()
        try:
            meta_json = json.dumps(self.meta, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise DeltaError(f"delta meta is not JSON-serialisable: {e}") from None
        tensors = _unshare(tensors)
        header = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "index": json.dumps(index),
            "extras": json.dumps(sorted(self.extras)),
            "meta": meta_json,
        }
        header["sha256"] = _canonical_digest(header, tensors)
        return tensors, header

    def to_bytes(self) -> bytes:
        tensors, header = self._to_tensors_and_header()
        data = _canonical_file(safetensors.torch.save(tensors, metadata=header))
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
        header = _read_safetensors_header(data)
        meta_fields = header.get("__metadata__")
        if not isinstance(meta_fields, dict) or meta_fields.get("format") != FORMAT_NAME:
            raise DeltaError("not a sparseshot delta (no sparseshot-delta metadata in the file)")
        version = meta_fields.get("format_version")
        if version != str(FORMAT_VERSION):
            raise DeltaError(f"unsupported delta format version {version!r} (this library reads "
                             f"{FORMAT_VERSION})")
        try:
            tensors = safetensors.torch.load(data)
        except Exception as e:  # safetensors raises its own error type for malformed files
            raise DeltaError(f"corrupted or truncated delta file: {e}") from None
        if _canonical_digest(meta_fields, tensors) != meta_fields.get("sha256"):
            raise DeltaError("checksum mismatch: the delta file was modified or corrupted")
        try:
            delta = cls._from_parts(meta_fields, tensors)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DeltaError):
                raise
            raise DeltaError(f"inconsistent delta file: {e!r}") from None
        delta._nbytes = len(data)
        return delta

    @classmethod
    def _from_parts(cls, fields: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> SparseDelta:
        delta = cls(json.loads(fields["meta"]))
        for item in json.loads(fields["index"]):
            key = item["key"]
            if item["kind"] == "lowrank":
                delta.add_lowrank(
                    item["name"], int(item["row_start"]), tensors[f"{key}.B"], tensors[f"{key}.A"],
                    float(item["scale"]), param_numel=item.get("param_numel"),
                )
                continue
            entry = _Entry(
                name=item["name"], shape=tuple(int(s) for s in item["shape"]),
                dtype=_DTYPE_BY_NAME[item["dtype"]], encoding=item["encoding"], mode=item["mode"],
                values=tensors[f"{key}.values"], indices=tensors.get(f"{key}.indices"), nnz=int(item["nnz"]),
            )
            _validate_entry(entry)
            delta.entries.append(entry)
        for name in json.loads(fields["extras"]):
            delta.extras[name] = tensors[f"extra.{name}"]
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
        state = _state_of(model, keep_vars=True)
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
            state = _state_of(model, keep_vars=True)
            if check:
                self.check(state, fingerprint=fingerprint)
            else:
                self._check_shapes(state)
            originals: list[tuple[torch.Tensor, Any, torch.Tensor]] = []
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


def _validate_entry(e: _Entry) -> None:
    n = e.numel
    if e.encoding == "dense":
        if e.indices is not None or e.values.shape != (n,):
            raise DeltaError(f"{e.name}: dense entry has {tuple(e.values.shape)} values, expected ({n},)")
    elif e.encoding == "sparse":
        idx = e.indices
        if idx is None or idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
            raise DeltaError(f"{e.name}: sparse entry without valid int32/int64 indices")
        if e.values.shape != idx.shape:
            raise DeltaError(f"{e.name}: {idx.numel()} indices but {e.values.numel()} values")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise DeltaError(f"{e.name}: index out of range for shape {e.shape}")
    else:
        raise DeltaError(f"{e.name}: unknown encoding {e.encoding!r}")
    if e.mode not in ("assign", "add"):
        raise DeltaError(f"{e.name}: unknown value mode {e.mode!r}")


def _apply_entry(param: torch.Tensor, e: _Entry) -> tuple[torch.Tensor, Any, torch.Tensor]:
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


def _apply_lowrank(param: torch.Tensor, lr: _LowRank) -> tuple[torch.Tensor, Any, torch.Tensor]:
    rows = slice(lr.row_start, lr.row_start + lr.B.shape[0])
    block = param[rows]  # (rows, cols) view
    original = block.clone()
    update = lr.scale * (lr.B.to(param.device) @ lr.A.to(param.device))  # (rows, cols) fp32
    block.copy_((original.float() + update).to(param.dtype))
    return param, rows, original


def _restore(originals: list[tuple[torch.Tensor, Any, torch.Tensor]]) -> None:
    """Write the kept originals back, newest first (entries of one tensor may overlap)."""
    with torch.no_grad():
        for target, where, original in reversed(originals):
            if where is None:
                target.copy_(original)
            elif isinstance(where, torch.Tensor):
                target.index_put_((where,), original)
            else:
                target[where] = original
