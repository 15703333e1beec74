"""A small compiled CPU kernel for the serving corrections: y += x Δᵀ with Δ in CSR, many models at once.

torch.sparse.mm on CPU ran at a few percent of a dense product's throughput per stored entry for
the shapes serving meets (tens to hundreds of token rows per model). This kernel takes every
model's correction of one linear layer in one call. The work is cut into units of TJ token rows of
one model; per unit it

1. copies the TJ rows of x transposed into a small tile xt (in, TJ) (zero-padded past the last
   row), so each stored entry reads TJ contiguous floats (one vector load);
2. walks Δ in blocks of RB output rows: a linear, branch-free loop over the block's entries adds
   value · xt[col] into an accumulator acc[local row] (RB, TJ) that stays in L1 (the local row of
   each entry, `lrow`, is prepared once with the CSR);
3. adds the accumulator into y's RB columns of those TJ rows (contiguous writes).

It is plain C (no torch headers: it compiles in about a second), built on first use with the
system's C compiler into a per-user cache folder and called through ctypes, which releases the
GIL, so two threads take halves of the units at once. Without a compiler, `available()` is False
and callers use torch.sparse.mm.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

TJ = 16  # token rows per unit: one AVX-512 vector (two AVX2 ones) per stored entry
RB = 64  # output rows per accumulator block: acc (RB, TJ) fp32 = 4 KiB, in L1; lrow fits a byte

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#define TJ 16
#define RB 64
typedef struct {
    int64_t n, out, in, ldx, ldy;
    const int32_t *crow, *col;
    const float *val, *x;
    float *y;
    const uint8_t *lrow;
} seg_t;

/* y[t:t+TJ, :] += x[t:t+TJ, :] @ D^T for one segment (model) s. */
static void unit(const seg_t *s, int64_t t, float *restrict xt) {
    const int64_t m = s->n - t < TJ ? s->n - t : TJ, in = s->in;
    for (int64_t j = 0; j < TJ; j++) {
        const float *xr = s->x + (t + j) * s->ldx;
        if (j < m) for (int64_t c = 0; c < in; c++) xt[c * TJ + j] = xr[c];
        else for (int64_t c = 0; c < in; c++) xt[c * TJ + j] = 0.0f;
    }
    float acc[RB][TJ];
    const int32_t *restrict col = s->col;
    const float *restrict val = s->val;
    const uint8_t *restrict lrow = s->lrow;
    for (int64_t r0 = 0; r0 < s->out; r0 += RB) {
        const int64_t rn = s->out - r0 < RB ? s->out - r0 : RB;
        const int32_t k0 = s->crow[r0], k1 = s->crow[r0 + rn];
        if (k0 == k1) continue;
        memset(acc, 0, sizeof(float) * TJ * rn);
        for (int32_t k = k0; k < k1; k++) {
            const float v = val[k];
            const float *restrict xr = xt + (int64_t)col[k] * TJ;
            float *restrict a = acc[lrow[k]];
            for (int j = 0; j < TJ; j++) a[j] += v * xr[j];
        }
        for (int64_t j = 0; j < m; j++) {
            float *restrict yr = s->y + (t + j) * s->ldy + r0;
            for (int64_t rr = 0; rr < rn; rr++) yr[rr] += acc[rr][j];
        }
    }
}

void csr_add_units(const seg_t *segs, const int64_t *unit_seg, const int64_t *unit_row,
                   int64_t u0, int64_t u1, float *xt) {
    for (int64_t u = u0; u < u1; u++) unit(&segs[unit_seg[u]], unit_row[u], xt);
}
"""
_PARALLEL_WORK = 1 << 17  # (entries + in + out) × TJ summed over units, above which two threads split them

_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()
_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="csr-kernel")


class _Seg(ctypes.Structure):
    _fields_ = [(f, ctypes.c_int64) for f in ("n", "out", "in_", "ldx", "ldy")] + [
        (f, ctypes.c_void_p) for f in ("crow", "col", "val", "x", "y", "lrow")]


@dataclass
class Correction:
    """One model's part of a layer: y (n, out) += x (n, in) @ Δᵀ; both row-major views (unit
    column stride), Δ (out, in) as int32 crow/col, fp32 val and uint8 lrow (`local_rows`)."""

    y: Tensor
    x: Tensor
    crow: Tensor
    col: Tensor
    val: Tensor
    lrow: Tensor


def _cache_dir() -> Path:
    root = os.environ.get("SPARSESHOT_KERNEL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sparseshot")
    return Path(root)


def _build() -> ctypes.CDLL | None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or os.environ.get("SPARSESHOT_NO_KERNEL"):
        return None
    tag = hashlib.sha256((_SOURCE + cc + "-mprefer-vector-width=512").encode()).hexdigest()[:16]
    path = _cache_dir() / f"csr_kernel_{tag}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(_SOURCE)
            # 512-bit vectors where the CPU has them (one per stored entry of a 16-row tile; GCC's
            # default tuning keeps 256 bits): measured 10-15 % faster on the serving shapes.
            cmd = [cc, "-O3", "-march=native", "-mprefer-vector-width=512", "-std=c99", "-shared", "-fPIC",
                   str(src), "-o", str(out)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(out, path)  # atomic: a concurrent builder sees the old or the whole file
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.csr_add_units.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    lib.csr_add_units.restype = None
    return lib


def available() -> bool:
    """True when the compiled kernel could be built (once per process)."""
    global _lib, _tried
    if _tried:  # the serving hot path asks per layer: no lock once decided
        return _lib is not None
    with _lock:
        if not _tried:
            try:
                _lib = _build()
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("serving kernel not built (%s); using torch.sparse.mm", e)
                _lib = None
            _tried = True  # after _lib: a reader outside the lock sees the decided value
        return _lib is not None


def local_rows(crow: Tensor) -> Tensor:
    """(nnz,) uint8: each stored entry's row within its block of RB output rows (made once per Δ)."""
    crow = crow.long()
    nnz = int(crow[-1])
    # Row of entry k = number of row starts crow[1:-1] at or before k: a cumulative count of marks
    # (repeat_interleave is an order of magnitude slower on CPU for this).
    marks = torch.zeros(nnz + 1, dtype=torch.int64)
    marks.index_add_(0, crow[1:-1], torch.ones(crow.numel() - 2, dtype=torch.int64))
    return (marks[:nnz].cumsum(0) % RB).to(torch.uint8)


def fits(c: Correction) -> bool:
    """The kernel's layout: CPU fp32 rows with unit column stride, int32 indices."""
    return (c.y.device.type == "cpu" and c.y.dtype == torch.float32 and c.x.dtype == torch.float32
            and c.y.stride(1) == 1 and c.x.stride(1) == 1 and c.col.dtype == torch.int32
            and c.crow.dtype == torch.int32 and c.lrow.dtype == torch.uint8)


def csr_add(corrections: Sequence[Correction]) -> None:
    """Apply every correction in place (one layer, several models); each must pass `fits`."""
    assert _lib is not None and all(fits(c) for c in corrections)
    segs = (_Seg * len(corrections))(*[
        _Seg(c.y.shape[0], c.y.shape[1], c.x.shape[1], c.x.stride(0), c.y.stride(0), c.crow.data_ptr(),
             c.col.data_ptr(), c.val.data_ptr(), c.x.data_ptr(), c.y.data_ptr(), c.lrow.data_ptr())
        for c in corrections])
    units = [(i, t) for i, c in enumerate(corrections) for t in range(0, c.y.shape[0], TJ)]
    if not units:
        return
    n = len(units)
    useg = (ctypes.c_int64 * n)(*[u[0] for u in units])
    urow = (ctypes.c_int64 * n)(*[u[1] for u in units])
    cost = [(c.val.numel() + c.x.shape[1] + c.y.shape[1]) * TJ for c in corrections]
    work = [cost[i] for i, _ in units]  # per unit
    width = max(c.x.shape[1] for c in corrections) * TJ
    _run_units(segs, useg, urow, work, width)
    del corrections  # the tensors behind the pointers stay alive until the units are done


def _run_units(segs: ctypes.Array, useg: ctypes.Array, urow: ctypes.Array, work: list[int],
               width: int) -> None:
    """Run units [0, n) in this thread, or split at half the work with the pool's thread."""
    lib, n = _lib, len(work)
    assert lib is not None
    total = sum(work)
    if total < _PARALLEL_WORK or torch.get_num_threads() < 2 or n < 2:
        xt = torch.empty(width)
        lib.csr_add_units(segs, useg, urow, 0, n, xt.data_ptr())
        return
    mid, acc = 1, work[0]
    while mid < n - 1 and 2 * (acc + work[mid]) <= total:
        acc, mid = acc + work[mid], mid + 1
    xt2 = torch.empty(width)
    future = _pool.submit(lib.csr_add_units, segs, useg, urow, mid, n, xt2.data_ptr())
    xt = torch.empty(width)
    lib.csr_add_units(segs, useg, urow, 0, mid, xt.data_ptr())
    future.result()
