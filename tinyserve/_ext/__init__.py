"""Compiled Cython kernels (built from ext/ by setup.py); absent on a pure-Python install."""

import os

from tinyserve.settings import settings


def find_sgemm() -> tuple[int, int]:
    """(address, ilp64) of a cblas_sgemm in a BLAS library this process already loaded (NumPy's
    OpenBLAS), or (0, 0). The quantized matmul hands large batches to it (ext/quant.h)."""
    for lib in _loaded_blas():
        for name, ilp64 in (("scipy_cblas_sgemm64_", 1), ("cblas_sgemm64_", 1), ("cblas_sgemm", 0)):
            fn = getattr(lib, name, None)
            if fn is not None:
                return _address(fn), ilp64
    return 0, 0


def find_blas_local_threads() -> int:
    """Address of `int openblas_set_num_threads_local(int)` (OpenBLAS 0.3.27+: sets BLAS's thread
    count, returning the previous one; meant per thread, process-wide in 0.3.31) in the library
    find_sgemm found, or 0. With it the quantized matmul runs single-threaded sgemms on its own
    pool threads (ext/quant.h, ext/pool.h)."""
    for lib in _loaded_blas():
        if not any(
            hasattr(lib, n) for n in ("scipy_cblas_sgemm64_", "cblas_sgemm64_", "cblas_sgemm")
        ):
            continue
        for name in (
            "openblas_set_num_threads_local",
            "scipy_openblas_set_num_threads_local64_",
            "scipy_openblas_set_num_threads_local",
        ):
            fn = getattr(lib, name, None)
            if fn is not None:
                return _address(fn)
        return 0
    return 0


def _loaded_blas():
    """ctypes handles of the BLAS libraries this process has mapped (NumPy's first)."""
    import ctypes

    import numpy  # noqa: F401  (loads NumPy's BLAS)

    try:
        with open("/proc/self/maps") as f:
            paths = dict.fromkeys(
                line.split()[-1] for line in f if "blas" in line.rsplit("/", 1)[-1].lower()
            )
    except OSError:
        return
    for path in paths:
        try:
            yield ctypes.CDLL(path)
        except OSError:
            continue


def _address(fn) -> int:
    import ctypes

    return ctypes.cast(fn, ctypes.c_void_p).value or 0


def blas_min_rows() -> int:
    """In exact-prefill mode, the activation rows from which quantized matmuls dequantize and go
    through sgemm (0 = never). TINYSERVE_BLAS_MIN_N, read once by tinyserve.settings."""
    return settings().blas_min_n


def default_threads() -> int:
    """Kernel threads: TINYSERVE_NUM_THREADS (tinyserve.settings), else os.cpu_count()."""
    return settings().num_threads or os.cpu_count() or 1


def quant_isa() -> str | None:
    """The quantized-kernel implementation TINYSERVE_QUANT_ISA forces, or None for the best."""
    return settings().quant_isa
