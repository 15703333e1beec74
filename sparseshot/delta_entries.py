"""The entries of a `SparseDelta`: what changed in one parameter, how it is encoded, and its checks.

- `DeltaEntry`: changed entries of one parameter, ``sparse`` (flat indices plus values) or ``dense``
  (one value per entry), values in ``assign`` or ``add`` mode (see sparseshot.delta);
- `LowRankEntry`: one LoRA block, ``W[row_start:row_start + rows] += scale * B @ A``.

Entries are built by comparing base and adapted tensors (`entry_between`), from known indices
(`sparse_entry`) or from LoRA factors (`lowrank_entry`); `validate_entry` checks one read from a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["DeltaEntry", "DeltaError", "LowRankEntry", "entry_between", "lowrank_entry", "sparse_entry",
           "validate_entry"]

_INT32_LIMIT = 2**31
# Bit-pattern views used to compare tensors exactly (NaN and -0.0 included).
_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class DeltaError(ValueError):
    """A delta file is unreadable, or a delta does not fit the model it is applied to."""


@dataclass
class DeltaEntry:
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
class LowRankEntry:
    """``W[row_start:row_start + B.shape[0]] += scale * B @ A`` for one parameter."""

    name: str
    row_start: int
    B: torch.Tensor  # (rows, r), CPU
    A: torch.Tensor  # (r, cols), CPU
    scale: float
    param_numel: int | None = None  # entries of the whole parameter, for `density`


def _index_dtype(n: int) -> torch.dtype:
    """Flat indices of a tensor of n entries: int32 while they fit, else int64."""
    return torch.int32 if n < _INT32_LIMIT else torch.int64


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


def entry_between(
    name: str, base: torch.Tensor, adapted: torch.Tensor, value_dtype: torch.dtype
) -> DeltaEntry:
    """The entry taking `base` to `adapted`: the entries whose bits differ, in the smaller encoding."""
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
    idx_dtype = _index_dtype(n)
    val_size = torch.empty((), dtype=value_dtype).element_size()
    idx_size = torch.empty((), dtype=idx_dtype).element_size()
    shape = tuple(base.shape)
    if n * val_size <= k * (val_size + idx_size):  # dense is no larger than indices + values
        src = a_flat if mode == "assign" else a_flat.float() - b_flat.float()  # (n,)
        # A copy: on CPU in fp32, `to` would return the live parameter itself, and training that
        # goes on after the delta was taken (the budget branches) would change the stored values.
        values = src.detach().to("cpu", value_dtype, copy=True)
        return DeltaEntry(name, shape, base.dtype, "dense", mode, values, None, k)
    # index_select, not a_flat[idx]: the same values, ~400x faster on CPU for large matrices.
    a_k = a_flat.index_select(0, idx)  # (k,)
    vals = a_k if mode == "assign" else a_k.float() - b_flat.index_select(0, idx).float()  # (k,)
    return DeltaEntry(name, shape, base.dtype, "sparse", mode, vals.to(value_dtype).cpu().contiguous(),
                      idx.to(idx_dtype).cpu(), k)


def sparse_entry(name: str, base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> DeltaEntry:
    """``W.flatten()[indices] = values`` ("assign" mode), checked; values stored in W's dtype or fp32."""
    kind = _index_dtype(base.numel())
    value_dtype = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
    vals = values.detach().to(value_dtype).cpu().contiguous()
    entry = DeltaEntry(name, tuple(base.shape), base.dtype, "sparse", "assign", vals,
                       indices.to(kind).cpu().contiguous(), int(indices.numel()))
    validate_entry(entry)
    return entry


def lowrank_entry(
    name: str, row_start: int, B: torch.Tensor, A: torch.Tensor, scale: float,
    *, param_numel: int | None = None,
) -> LowRankEntry:
    """A checked low-rank block, B (rows, r) and A (r, cols) stored in fp32 on the CPU."""
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise DeltaError(f"{name}: low-rank factors must be B (rows, r) and A (r, cols), "
                         f"got {tuple(B.shape)} and {tuple(A.shape)}")
    if row_start < 0:
        raise DeltaError(f"{name}: row_start must be >= 0, got {row_start}")
    B32 = B.detach().float().cpu().contiguous()
    A32 = A.detach().float().cpu().contiguous()
    numel = None if param_numel is None else int(param_numel)
    return LowRankEntry(name, int(row_start), B32, A32, float(scale), numel)


def validate_entry(e: DeltaEntry) -> None:
    """DeltaError unless the entry's encoding, indices, values and mode are consistent with its shape."""
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
