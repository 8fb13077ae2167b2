"""The cpu backend's memory handling: KV pools that become resident only where written, and
handing freed heap back to the OS after steps that freed a lot."""

from __future__ import annotations

import mmap

import numpy as np

_malloc_trim = False


def trim_heap() -> None:
    """Return free heap pages to the OS (glibc malloc_trim; a no-op elsewhere): glibc keeps freed
    memory resident once its mmap threshold has risen to the largest array freed."""
    global _malloc_trim
    if _malloc_trim is False:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = None
    if _malloc_trim is not None:
        _malloc_trim(0)


def lazy_zeros(shape, dtype=np.float32) -> np.ndarray:
    """Zeros whose pages become resident only when written, in 4 KB pages: with transparent huge
    pages, a sequence's first KV block in each (layer, k|v) pool would fault in a whole 2 MB page."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes == 0 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes)  # anonymous: zero pages, faulted in on first write
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)
