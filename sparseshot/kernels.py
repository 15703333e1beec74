"""A small compiled CPU kernel for the serving corrections: y += x Δᵀ with Δ in CSR.

torch.sparse.mm on CPU ran at a few percent of a dense product's throughput per stored entry for
the shapes serving meets (tens to hundreds of token rows), which made the corrections cost as much
as the product itself. This kernel walks Δ's rows and, per stored entry, adds value · xᵀ[col] to an
accumulator of the n token rows (a contiguous, vectorisable loop), then writes the accumulator into
y's column. It is plain C (no torch headers: it compiles in about a second), built on first use
with the system's C compiler into a per-user cache folder and called through ctypes, which releases
the GIL, so two threads can work on halves of Δ's rows at once. Without a compiler, `available()`
is False and callers use torch.sparse.mm.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
/* y[j, r] += sum_k val[k] * xt[col[k], j] over rows r in [r0, r1) of a CSR matrix (out, in).
   xt: (in, n) contiguous; y: row stride ldy. */
void csr_add_xt(int64_t r0, int64_t r1, int64_t n, const int32_t *crow, const int32_t *col,
                const float *val, const float *xt, float *y, int64_t ldy, float *acc) {
    for (int64_t r = r0; r < r1; r++) {
        int32_t k0 = crow[r], k1 = crow[r + 1];
        if (k0 == k1) continue;
        for (int64_t j = 0; j < n; j++) acc[j] = 0.0f;
        for (int32_t k = k0; k < k1; k++) {
            const float v = val[k];
            const float *restrict xr = xt + (int64_t)col[k] * n;
            for (int64_t j = 0; j < n; j++) acc[j] += v * xr[j];
        }
        for (int64_t j = 0; j < n; j++) y[j * ldy + r] += acc[j];
    }
}
"""
_PARALLEL_WORK = 1 << 18  # entries × rows above which the rows are split over two threads

_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()
_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="csr-kernel")


def _cache_dir() -> Path:
    root = os.environ.get("SPARSESHOT_KERNEL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sparseshot")
    return Path(root)


def _build() -> ctypes.CDLL | None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or os.environ.get("SPARSESHOT_NO_KERNEL"):
        return None
    tag = hashlib.sha256((_SOURCE + cc).encode()).hexdigest()[:16]
    path = _cache_dir() / f"csr_kernel_{tag}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(_SOURCE)
            cmd = [cc, "-O3", "-march=native", "-std=c99", "-shared", "-fPIC", str(src), "-o", str(out)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(out, path)  # atomic: a concurrent builder sees the old or the whole file
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.csr_add_xt.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr]
    lib.csr_add_xt.restype = None
    return lib


def available() -> bool:
    """True when the compiled kernel could be built (once per process)."""
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _build()
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("serving kernel not built (%s); using torch.sparse.mm", e)
                _lib = None
        return _lib is not None


def csr_add(y: Tensor, x: Tensor, crow: Tensor, col: Tensor, val: Tensor) -> None:
    """y (n, out) += x (n, in) @ Δᵀ in place; Δ (out, in) as int32 crow/col and fp32 val, all CPU.

    y must have unit column stride (a row-major view); x is copied transposed once."""
    assert _lib is not None and y.dtype == torch.float32 and y.stride(1) == 1
    n, out = y.shape
    xt = x.float().t().contiguous()  # (in, n)
    args = (n, crow.data_ptr(), col.data_ptr(), val.data_ptr(), xt.data_ptr(), y.data_ptr(), y.stride(0))
    lib = _lib
    if val.numel() * n < _PARALLEL_WORK or torch.get_num_threads() < 2:
        acc = torch.empty(n)
        lib.csr_add_xt(0, out, *args, acc.data_ptr())
        return
    mid = out // 2  # halves write disjoint columns of y
    acc2 = torch.empty(n)
    future = _pool.submit(lib.csr_add_xt, mid, out, *args, acc2.data_ptr())
    acc = torch.empty(n)
    lib.csr_add_xt(0, mid, *args, acc.data_ptr())
    future.result()
    del xt  # alive until both halves are done
