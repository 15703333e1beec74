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
which releases the GIL, so two threads take halves of the units at once. The second thread is one
of torch's own OpenMP pool where the runtime is found (`_openmp`): right after torch's product
that thread is still spinning for work, and a thread of ours had to share the second core with
it. Elsewhere a thread made for the call (pthreads) takes the second half. The units, their work
estimates and the split are computed in C too: one call per layer, whose Python side only passes
integers (`csr_add_rows`). Without a compiler, `available()` is False and callers use
torch.sparse.mm.
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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

TW = 64  # token rows per unit at most (four 16-float vectors per stored entry); the C source's TW

_SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
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
static void csr_add_units(const seg_t *segs, const int64_t *unit, int64_t u0, int64_t u1, float *xt) {
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

/* The units of a call: (segment, first token row, first output row, end output row), rows of
   each segment in TW-row units; with `split`, each unit's output rows cut in two at a block edge
   (so that two threads have work when there are few units). Returns the count. */
static int64_t plan(const seg_t *segs, int64_t nseg, int split, int64_t *unit) {
    int64_t n = 0;
    for (int64_t i = 0; i < nseg; i++) {
        const int64_t out = segs[i].out;
        const int64_t cut = split && out > RB ? (out / 2 + RB - 1) / RB * RB : out;
        for (int64_t t = 0; t < segs[i].n; t += TW) {
            int64_t *u = unit + 4 * n;
            u[0] = i; u[1] = t; u[2] = 0; u[3] = cut; n++;
            if (cut < out) { u[4] = i; u[5] = t; u[6] = cut; u[7] = out; n++; }
        }
    }
    return n;
}

/* Estimated multiply-adds of a unit: its entries plus the transposes, per 16-lane vector. */
static int64_t unit_work(const seg_t *segs, const int64_t *u) {
    const seg_t *s = &segs[u[0]];
    const int64_t m = s->n - u[1] < TW ? s->n - u[1] : TW;
    return (m + 15) / 16 * 16 * ((int64_t)s->crow[u[3]] - s->crow[u[2]] + s->in + (u[3] - u[2]));
}

/* Two halves: units 0..mid on the caller, mid..n on a second thread, each with its own scratch
   (xt, xt + width). The second thread is a member of an OpenMP team of the runtime torch runs
   on, passed in as function pointers (GOMP_parallel, omp_get_thread_num, omp_get_num_threads):
   right after torch's product its pool thread is still spinning for work and starts at once,
   where a thread of another pool would compete with it for the second core. Without the runtime,
   a thread made for the call. */
typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_t)(void);
typedef struct {
    const seg_t *segs; const int64_t *unit; int64_t n, mid; float *xt; int64_t width;
    omp_int_t thread_num, num_threads;
} halves_t;

static void team_half(void *p) {
    const halves_t *h = p;
    const int t = h->thread_num(), nt = h->num_threads();
    if (nt < 2) csr_add_units(h->segs, h->unit, 0, h->n, h->xt);  /* a team of one does both */
    else if (t == 0) csr_add_units(h->segs, h->unit, 0, h->mid, h->xt);
    else if (t == 1) csr_add_units(h->segs, h->unit, h->mid, h->n, h->xt + h->width);
}

static void *second_half(void *p) {
    const halves_t *h = p;
    csr_add_units(h->segs, h->unit, h->mid, h->n, h->xt + h->width);
    return NULL;
}

static void run_halves(halves_t *h, void *gomp_parallel) {
    pthread_t th;
    if (gomp_parallel != NULL) {
        ((gomp_parallel_t)gomp_parallel)(team_half, h, 2, 0);
    } else if (pthread_create(&th, NULL, second_half, h) == 0) {
        csr_add_units(h->segs, h->unit, 0, h->mid, h->xt);
        pthread_join(th, NULL);
    } else {
        csr_add_units(h->segs, h->unit, 0, h->n, h->xt);
    }
}

/* Every segment's y += x Δᵀ. xt: scratch of 2 × width floats (width = max in × TW). With two
   threads and at least `parallel_work` estimated multiply-adds, the units are split at half the
   work. Returns 0, or -1 when the unit list could not be allocated (nothing is changed). */
int csr_add(const seg_t *segs, int64_t nseg, float *xt, int64_t width, int threads,
            int64_t parallel_work, void *gomp_parallel, void *thread_num, void *num_threads) {
    int64_t cap = 0;
    for (int64_t i = 0; i < nseg; i++) cap += 2 * ((segs[i].n + TW - 1) / TW);
    if (cap == 0) return 0;
    int64_t *unit = malloc((size_t)cap * 4 * sizeof(int64_t));
    if (unit == NULL) return -1;
    int64_t n = plan(segs, nseg, 0, unit);
    if (threads >= 2 && n < 4) n = plan(segs, nseg, 1, unit);
    int64_t total = 0;
    for (int64_t u = 0; u < n; u++) total += unit_work(segs, unit + 4 * u);
    if (threads < 2 || n < 2 || total < parallel_work) {
        csr_add_units(segs, unit, 0, n, xt);
    } else {
        int64_t mid = 1, acc = unit_work(segs, unit);
        while (mid < n - 1 && 2 * (acc + unit_work(segs, unit + 4 * mid)) <= total)
            acc += unit_work(segs, unit + 4 * mid++);
        halves_t h = {segs, unit, n, mid, xt, width, (omp_int_t)thread_num, (omp_int_t)num_threads};
        run_halves(&h, thread_num != NULL && num_threads != NULL ? gomp_parallel : NULL);
    }
    free(unit);
    return 0;
}
"""
_PARALLEL_WORK = 1 << 17  # estimated multiply-adds (the C `unit_work`) from which two threads split a call
_SEG_FIELDS = 10  # the C seg_t: n, out, in, ldx, ldy, then the crow, col, val, x, y pointers

_lib: ctypes.CDLL | None = None
_omp: tuple[int, int, int] | None = None  # torch's OpenMP runtime (`_openmp`), when found
_tried = False
_lock = threading.Lock()
_local = threading.local()  # per calling thread: the tile scratch (`_scratch`)
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-std=gnu99", "-pthread"]


@dataclass
class Correction:
    """One model's part of a layer: y (n, out) += x (n, in) @ Δᵀ; both row-major views (unit
    column stride), Δ (out, in) as int32 crow/col and fp32 val."""

    y: Tensor
    x: Tensor
    crow: Tensor
    col: Tensor
    val: Tensor


class CSR:
    """Δ (out, in) held in the kernel's layout, its pointers read once: what a prepared model keeps
    per layer so that a forward passes plain integers (`csr_add_rows`)."""

    def __init__(self, crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int]) -> None:
        if not takes(crow, col, val):
            raise ValueError("the kernel takes CPU int32 crow/col and fp32 values")
        self.crow, self.col, self.val = crow.contiguous(), col.contiguous(), val.contiguous()
        self.out, self.inputs = int(shape[0]), int(shape[1])
        if self.crow.numel() != self.out + 1 or self.col.numel() != self.val.numel():
            raise ValueError(f"crow of {self.crow.numel()} for {self.out} rows, or {self.col.numel()} "
                             f"columns for {self.val.numel()} values")
        self.ptrs = (self.crow.data_ptr(), self.col.data_ptr(), self.val.data_ptr())


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
    lib.csr_add.argtypes = [ptr, i64, ptr, i64, ctypes.c_int, i64, ptr, ptr, ptr]
    lib.csr_add.restype = ctypes.c_int
    return lib


def _openmp() -> tuple[int, int, int] | None:
    """Addresses of GOMP_parallel, omp_get_thread_num and omp_get_num_threads in the OpenMP runtime
    this process has loaded (torch's), or None (no such runtime, or not Linux)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        return None
    for path in sorted(p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp"))):
        try:
            rt = ctypes.CDLL(path)  # already mapped: the same handle, nothing new is loaded
            fns = (rt.GOMP_parallel, rt.omp_get_thread_num, rt.omp_get_num_threads)
        except (OSError, AttributeError):
            continue
        addrs = [ctypes.cast(fn, ctypes.c_void_p).value for fn in fns]
        if all(addrs):
            return addrs[0], addrs[1], addrs[2]  # type: ignore[return-value]
    return None


def available() -> bool:
    """True when the compiled kernel could be built (once per process)."""
    global _lib, _omp, _tried
    if _tried:  # the serving hot path asks per layer: no lock once decided
        return _lib is not None
    with _lock:
        if not _tried:
            try:
                _lib = _build()
                _omp = _openmp() if _lib is not None else None
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


def _seg(n: int, csr: CSR, x_ptr: int, ldx: int, y_ptr: int, ldy: int) -> list[int]:
    return [n, csr.out, csr.inputs, ldx, ldy, *csr.ptrs, x_ptr, y_ptr]


def _run(segs: list[int], width: int) -> None:
    """One C call over the flattened seg_t fields of every segment; `width`: max in × TW."""
    assert _lib is not None
    n = len(segs) // _SEG_FIELDS
    if n == 0:
        return
    arr = (ctypes.c_int64 * len(segs))(*segs)
    gomp, tnum, nthr = _omp if _omp is not None else (None, None, None)
    rc = _lib.csr_add(arr, n, _scratch(2 * width).data_ptr(), width, torch.get_num_threads(),
                      _PARALLEL_WORK, gomp, tnum, nthr)
    if rc != 0:
        raise MemoryError("the serving kernel could not allocate its unit list")


def csr_add(corrections: Sequence[Correction]) -> None:
    """Apply every correction in place (one layer, several models); each must pass `fits`."""
    assert _lib is not None and all(fits(c) for c in corrections)
    segs: list[int] = []
    for c in corrections:
        csr = CSR(c.crow, c.col, c.val, (c.y.shape[1], c.x.shape[1]))
        segs += _seg(c.y.shape[0], csr, c.x.data_ptr(), c.x.stride(0), c.y.data_ptr(), c.y.stride(0))
    _run(segs, max((c.x.shape[1] for c in corrections), default=0) * TW)
    del corrections  # the tensors behind the pointers stay alive until the call returns


def rows_fit(y: Tensor, x: Tensor) -> bool:
    """y (N, out) and x (N, in) are CPU fp32 rows with unit column stride (`csr_add_rows` takes them)."""
    return (y.device.type == "cpu" and x.device.type == "cpu" and y.dtype == torch.float32
            and x.dtype == torch.float32 and y.dim() == 2 and x.dim() == 2 and y.shape[0] == x.shape[0]
            and y.stride(1) == 1 and x.stride(1) == 1)


def csr_add_rows(y: Tensor, x: Tensor, parts: Sequence[tuple[int, int, CSR]]) -> None:
    """y[r0:r1] += x[r0:r1] @ Δᵀ for every (r0, r1, Δ) of `parts`, in place, one call: the serving
    forward's form of `csr_add` (rows of one batch, pointers computed here instead of one view
    per model). y, x must pass `rows_fit`; the row ranges lie in [0, N) and do not overlap."""
    assert _lib is not None and rows_fit(y, x)
    ldx, ldy = x.stride(0), y.stride(0)
    xp, yp, size = x.data_ptr(), y.data_ptr(), y.element_size()
    segs: list[int] = []
    width = 0
    for r0, r1, csr in parts:
        if not (0 <= r0 <= r1 <= y.shape[0]) or (csr.out, csr.inputs) != (y.shape[1], x.shape[1]):
            raise ValueError(f"rows {r0}:{r1} or Δ {csr.out}×{csr.inputs} do not fit y {tuple(y.shape)}")
        segs += _seg(r1 - r0, csr, xp + r0 * ldx * size, ldx, yp + r0 * ldy * size, ldy)
        width = max(width, csr.inputs * TW)
    _run(segs, width)


def _scratch(width: int) -> Tensor:
    """This thread's tile buffer of at least `width` floats (two tiles of up to 3072 × 64: 1.5 MiB),
    kept between calls instead of a new allocation per call."""
    buf: Tensor | None = getattr(_local, "xt", None)
    if buf is None or buf.numel() < width:
        buf = _local.xt = torch.empty(width)
    return buf
