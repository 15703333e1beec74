"""A small compiled CPU kernel for the serving corrections: y += x Δᵀ with Δ in CSR, many models at once.

torch.sparse.mm on CPU ran at a few percent of a dense product's throughput per stored entry for
the shapes serving meets (tens to hundreds of token rows per model). This kernel takes every
model's correction of one linear layer in one call. The work is cut into units of up to TW = 64
token rows of one model (and a range of output rows); per unit it

1. copies the unit's rows of x transposed into a tile xt (in, 16·V), V = ⌈rows/16⌉ vectors, zero
   past the last row (16×16 blocks transposed in registers), so each stored entry reads V
   contiguous vectors;
2. walks Δ row by row: a row's sum Σ val·xt[col] stays in registers, with independent chains that
   hide the multiply-add latency, and lands in an accumulator block (RB output rows, in L1);
3. adds each block into y's RB columns of the unit's rows (16×16 transposes again: contiguous writes).

Every loop over the 16 vectors of a transpose is unrolled (`GCC unroll`): with constant indices
the 16 vectors stay in registers; left to the compiler they lived on the stack, and the transposes
and write-backs ran 2.5-5x slower.

It is plain C with GCC vector extensions (no torch headers: it compiles in about a second), built
on first use with the system's C compiler into a per-user cache folder and called through ctypes,
which releases the GIL, so two threads take halves of the units at once. Without a compiler,
`available()` is False and callers use torch.sparse.mm.
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

TW = 64  # token rows per unit at most (four 16-float vectors per stored entry); the C source's TW
RB = 64  # output rows per accumulator block: acc (RB, TW) fp32 = 16 KiB, in L1; the C source's RB

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#define RB 64      /* output rows per accumulator block */
#define TW 64      /* token rows per unit at most: VMAX vectors of 16 */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef struct {
    int64_t n, out, in, ldx, ldy;
    const int32_t *crow, *col;
    const float *val, *x;
    float *y;
} seg_t;

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* In-register transpose of 16 vectors: four stages, each swapping one bit b of the row index with
   the same bit of the column index by two-source shuffles (constant masks MA, MB). */
#define MA_(b, c) (((c) & (b)) ? 16 + ((c) ^ (b)) : (c))
#define MB_(b, c) (((c) & (b)) ? 16 + (c) : ((c) ^ (b)))
#define ROW_(F, b) {F(b, 0), F(b, 1), F(b, 2), F(b, 3), F(b, 4), F(b, 5), F(b, 6), F(b, 7), \
    F(b, 8), F(b, 9), F(b, 10), F(b, 11), F(b, 12), F(b, 13), F(b, 14), F(b, 15)}
static const i16 MA[4] = {ROW_(MA_, 1), ROW_(MA_, 2), ROW_(MA_, 4), ROW_(MA_, 8)};
static const i16 MB[4] = {ROW_(MB_, 1), ROW_(MB_, 2), ROW_(MB_, 4), ROW_(MB_, 8)};

static inline void tr16(v16 r[16]) {
    _Pragma("GCC unroll 4")
    for (int s = 0; s < 4; s++) {
        const int b = 1 << s;
        _Pragma("GCC unroll 16")
        for (int i = 0; i < 16; i++) {
            if (i & b) continue;
            v16 lo = __builtin_shuffle(r[i], r[i | b], MA[s]);
            v16 hi = __builtin_shuffle(r[i], r[i | b], MB[s]);
            r[i] = lo; r[i | b] = hi;
        }
    }
}

/* xt (in, 16V): rows t..t+m of x transposed, zero past m, so one stored entry reads V vectors. */
static inline __attribute__((always_inline))
void load_xt(const seg_t *s, int64_t t, int64_t m, float *restrict xt, const int V) {
    const int64_t in = s->in, W = 16 * V, full = in & ~(int64_t)15;
    v16 r[16];
    for (int g = 0; g < V; g++)
        for (int64_t c0 = 0; c0 < full; c0 += 16) {
            _Pragma("GCC unroll 16")
            for (int j = 0; j < 16; j++)
                r[j] = 16 * g + j < m ? ld(s->x + (t + 16 * g + j) * s->ldx + c0) : (v16){0};
            tr16(r);
            _Pragma("GCC unroll 16")
            for (int c = 0; c < 16; c++) st(xt + (c0 + c) * W + 16 * g, r[c]);
        }
    for (int64_t c = full; c < in; c++)
        for (int64_t j = 0; j < W; j++) xt[c * W + j] = j < m ? s->x[(t + j) * s->ldx + c] : 0.0f;
}

/* acc[r][0:16V] = Σ_k val[k] · xt[col[k]] over the entries of rows r0..r0+rn: the row's sum stays
   in registers, U independent chains hide the FMA latency. */
static inline __attribute__((always_inline))
void block_rows(const seg_t *s, int64_t r0, int64_t rn, const float *restrict xt, float *restrict acc,
                const int V) {
    enum { UMAX = 4 };
    const int U = V == 1 ? 4 : 2, W = 16 * V;
    const int32_t *restrict col = s->col;
    const float *restrict val = s->val;
    for (int64_t r = 0; r < rn; r++) {
        v16 a[UMAX][4];
        for (int u = 0; u < U; u++) for (int i = 0; i < V; i++) a[u][i] = (v16){0};
        int32_t k = s->crow[r0 + r];
        const int32_t k1 = s->crow[r0 + r + 1];
        for (; k + U <= k1; k += U)
            _Pragma("GCC unroll 4")
            for (int u = 0; u < U; u++) {
                const float *p = xt + (int64_t)col[k + u] * W;
                for (int i = 0; i < V; i++) a[u][i] += val[k + u] * ld(p + 16 * i);
            }
        for (; k < k1; k++) {
            const float *p = xt + (int64_t)col[k] * W;
            for (int i = 0; i < V; i++) a[0][i] += val[k] * ld(p + 16 * i);
        }
        for (int i = 0; i < V; i++) {
            v16 sum = a[0][i];
            for (int u = 1; u < U; u++) sum += a[u][i];
            st(acc + r * TW + 16 * i, sum);
        }
    }
}

/* y[t+j, r0+rr] += acc[rr][j] for j < m: 16×16 tiles transposed in registers, contiguous writes. */
static inline __attribute__((always_inline))
void write_back(const seg_t *s, int64_t t, int64_t m, int64_t r0, int64_t rn, const float *restrict acc,
                const int V) {
    v16 r[16];
    int64_t rr0 = 0;
    for (; rr0 + 16 <= rn; rr0 += 16)
        for (int g = 0; g < V; g++) {
            _Pragma("GCC unroll 16")
            for (int i = 0; i < 16; i++) r[i] = ld(acc + (rr0 + i) * TW + 16 * g);
            tr16(r);
            _Pragma("GCC unroll 16")
            for (int j = 0; j < 16; j++)
                if (16 * g + j < m) {
                    float *yr = s->y + (t + 16 * g + j) * s->ldy + r0 + rr0;
                    st(yr, ld(yr) + r[j]);
                }
        }
    for (int64_t j = 0; j < m; j++) {
        float *yr = s->y + (t + j) * s->ldy + r0;
        for (int64_t rr = rr0; rr < rn; rr++) yr[rr] += acc[rr * TW + j];
    }
}

static inline __attribute__((always_inline))
void unit_v(const seg_t *s, int64_t t, int64_t m, int64_t rb, int64_t re, float *restrict xt, const int V) {
    float acc[RB * TW] __attribute__((aligned(64)));
    load_xt(s, t, m, xt, V);
    for (int64_t r0 = rb; r0 < re; r0 += RB) {
        const int64_t rn = re - r0 < RB ? re - r0 : RB;
        if (s->crow[r0] == s->crow[r0 + rn]) continue;
        block_rows(s, r0, rn, xt, acc, V);
        write_back(s, t, m, r0, rn, acc, V);
    }
}

/* Units u0..u1: unit u is rows unit[4u+1].. (at most TW) of segment unit[4u], output rows
   unit[4u+2]..unit[4u+3]. xt: scratch of (max in) × TW floats. */
void csr_add_units(const seg_t *segs, const int64_t *unit, int64_t u0, int64_t u1, float *xt) {
    for (int64_t u = u0; u < u1; u++) {
        const seg_t *s = &segs[unit[4 * u]];
        const int64_t t = unit[4 * u + 1], rb = unit[4 * u + 2], re = unit[4 * u + 3];
        const int64_t m = s->n - t < TW ? s->n - t : TW;
        switch ((m + 15) / 16) {
            case 1: unit_v(s, t, m, rb, re, xt, 1); break;
            case 2: unit_v(s, t, m, rb, re, xt, 2); break;
            case 3: unit_v(s, t, m, rb, re, xt, 3); break;
            default: unit_v(s, t, m, rb, re, xt, 4); break;
        }
    }
}
"""
_PARALLEL_WORK = 1 << 17  # estimated multiply-adds (see `_unit_work`) above which two threads split the units

_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()
# One thread, so the tasks it runs never overlap (each uses that thread's scratch).
_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="csr-kernel")
_local = threading.local()  # per thread: the tile scratch (`_scratch`)
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-std=gnu99"]


class _Seg(ctypes.Structure):
    _fields_ = [(f, ctypes.c_int64) for f in ("n", "out", "in_", "ldx", "ldy")] + [
        (f, ctypes.c_void_p) for f in ("crow", "col", "val", "x", "y")]


@dataclass
class Correction:
    """One model's part of a layer: y (n, out) += x (n, in) @ Δᵀ; both row-major views (unit
    column stride), Δ (out, in) as int32 crow/col and fp32 val."""

    y: Tensor
    x: Tensor
    crow: Tensor
    col: Tensor
    val: Tensor


def _cache_dir() -> Path:
    root = os.environ.get("SPARSESHOT_KERNEL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sparseshot")
    return Path(root)


def _build() -> ctypes.CDLL | None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or os.environ.get("SPARSESHOT_NO_KERNEL"):
        return None
    tag = hashlib.sha256((_SOURCE + cc + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    path = _cache_dir() / f"csr_kernel_{tag}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(_SOURCE)
            # 512-bit vectors where the CPU has them (GCC's default tuning keeps 256 bits; the
            # vector type is 16 floats either way, split in two on AVX2): 10-15 % faster here.
            cmd = [cc, *_FLAGS, "-shared", "-fPIC", str(src), "-o", str(out)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(out, path)  # atomic: a concurrent builder sees the old or the whole file
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.csr_add_units.argtypes = [ptr, ptr, i64, i64, ptr]
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


def takes(crow: Tensor, col: Tensor, val: Tensor) -> bool:
    """The kernel's layout of Δ: CPU int32 indices and fp32 values, and the kernel built."""
    return (val.device.type == "cpu" and val.dtype == torch.float32 and crow.dtype == torch.int32
            and col.dtype == torch.int32 and available())


def fits(c: Correction) -> bool:
    """`takes` Δ, and x, y are CPU fp32 rows with unit column stride."""
    return (takes(c.crow, c.col, c.val) and c.y.device.type == "cpu" and c.y.dtype == torch.float32
            and c.x.dtype == torch.float32 and c.y.stride(1) == 1 and c.x.stride(1) == 1)


def _units(corrections: Sequence[Correction], split: bool) -> list[tuple[int, int, int, int]]:
    """(segment, first token row, first output row, end output row) per unit; with `split`, each
    unit's output rows are cut in two (at a block edge) so that two threads have work."""
    units = []
    for i, c in enumerate(corrections):
        out = c.y.shape[1]
        cuts = [0, out]
        if split and out > RB:
            cuts = [0, (out // 2 + RB - 1) // RB * RB, out]
        for t in range(0, c.y.shape[0], TW):
            units += [(i, t, a, b) for a, b in zip(cuts, cuts[1:], strict=False) if a < b]
    return units


def _unit_work(c: Correction, unit: tuple[int, int, int, int], nnz: int) -> int:
    """Estimated multiply-adds of a unit: entries in its output rows plus the transposes, per vector.
    `nnz`: the correction's entry count (a unit over all output rows needs no look-up in crow)."""
    _, t, a, b = unit
    vectors = -(-min(TW, c.y.shape[0] - t) // 16)
    entries = nnz if (a, b) == (0, c.y.shape[1]) else int(c.crow[b]) - int(c.crow[a])
    return vectors * 16 * (entries + c.x.shape[1] + (b - a))


def csr_add(corrections: Sequence[Correction]) -> None:
    """Apply every correction in place (one layer, several models); each must pass `fits`."""
    assert _lib is not None and all(fits(c) for c in corrections)
    segs = (_Seg * len(corrections))(*[
        _Seg(c.y.shape[0], c.y.shape[1], c.x.shape[1], c.x.stride(0), c.y.stride(0), c.crow.data_ptr(),
             c.col.data_ptr(), c.val.data_ptr(), c.x.data_ptr(), c.y.data_ptr())
        for c in corrections])
    two = torch.get_num_threads() >= 2
    units = _units(corrections, split=False)
    if two and 0 < len(units) < 4:
        units = _units(corrections, split=True)
    if not units:
        return
    flat = (ctypes.c_int64 * (4 * len(units)))(*[v for u in units for v in u])
    nnz = [c.col.numel() for c in corrections]
    work = [_unit_work(corrections[u[0]], u, nnz[u[0]]) for u in units]
    width = max(c.x.shape[1] for c in corrections) * TW
    _run_units(segs, flat, work, width, two)
    del corrections  # the tensors behind the pointers stay alive until the units are done


def _scratch(width: int) -> Tensor:
    """This thread's tile buffer of at least `width` floats (up to 3072 × 64, 768 KiB), kept between
    calls instead of a new allocation per call and thread."""
    buf: Tensor | None = getattr(_local, "xt", None)
    if buf is None or buf.numel() < width:
        buf = _local.xt = torch.empty(width)
    return buf


def _call_units(segs: ctypes.Array, units: ctypes.Array, u0: int, u1: int, width: int) -> None:
    assert _lib is not None
    _lib.csr_add_units(segs, units, u0, u1, _scratch(width).data_ptr())


def _run_units(segs: ctypes.Array, units: ctypes.Array, work: list[int], width: int, two: bool) -> None:
    """Run units [0, n) in this thread, or split at half the work with the pool's thread."""
    n = len(work)
    total = sum(work)
    if total < _PARALLEL_WORK or not two or n < 2:
        _call_units(segs, units, 0, n, width)
        return
    mid, acc = 1, work[0]
    while mid < n - 1 and 2 * (acc + work[mid]) <= total:
        acc, mid = acc + work[mid], mid + 1
    future = _pool.submit(_call_units, segs, units, mid, n, width)
    _call_units(segs, units, 0, mid, width)
    future.result()
