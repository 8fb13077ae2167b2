"""The cpu backend's memory handling: KV pools that become resident only where written, handing
freed heap back to the OS after steps that freed a lot, and file pages already copied out (a
packed weight's blocks) dropped from resident memory."""

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


def _mapping(arr: np.ndarray) -> mmap.mmap | None:
    """The mmap object at the root of arr's views, if any."""
    b = arr
    while isinstance(b, np.ndarray):
        raw = getattr(b, "_mmap", None)
        if isinstance(raw, mmap.mmap):
            return raw
        b = b.base
    return b if isinstance(b, mmap.mmap) else None


def release_file_pages(arr: np.ndarray) -> None:
    """Unmap from this process the whole pages of arr when it is a read-only view of a file
    mapping (np.memmap mode "r"): a later read faults them back in from the page cache, so bytes
    copied elsewhere (the cpu backend's packed weights) stop counting twice in resident memory.
    Anything else (heap arrays, writable maps: dropping would lose their data) is left alone."""
    raw = _mapping(arr)
    if raw is None or arr.flags.writeable or not hasattr(mmap, "MADV_DONTNEED") or arr.size == 0:
        return
    base = np.frombuffer(raw, np.uint8).ctypes.data  # the mapping's first byte
    start = arr.ctypes.data - base
    end = start + arr.nbytes
    if not 0 <= start <= end <= len(raw):
        return  # not a contiguous view of this mapping
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the range only
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        raw.madvise(mmap.MADV_DONTNEED, first, last - first)
