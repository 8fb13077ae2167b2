"""The cpu backend's memory handling: KV pools that become resident only where written, handing
freed heap back to the OS after steps that freed a lot, file pages already copied out (a packed
weight's blocks) dropped from resident memory, rows of such a matrix read from the file without
mapping its pages back in, and the small vectors a kernel reads every step copied off the file.

A fault on a mapped file maps the whole page-cache folio around the address, often far more than
a page: one read through the mapping can bring back megabytes of the matrices around it."""

from __future__ import annotations

import mmap
import os
import weakref

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


class FileRows:
    """Rows of a read-only file-mapped (R, B) uint8 array read with pread, not through the mapping.

    Embedding lookups of random tokens through the mapping would bring back most of a large
    matrix whose pages packing dropped (its packed copy is what the head reads; the module
    docstring says why). pread copies just the row's bytes from the page cache, and nothing stays
    mapped. The file is opened once, here: the mapping was made moments before, while loading, so
    it is the same file."""

    def __init__(self, fd: int, offset: int, stride: int, shape: tuple[int, int]):
        self.fd, self.offset, self.stride = fd, offset, stride
        self.n_rows, self.row_bytes = shape
        weakref.finalize(self, os.close, fd)

    @classmethod
    def of(cls, arr: np.ndarray) -> FileRows | None:
        """A reader for arr's rows when arr is a read-only view of a file mapping (np.memmap mode
        "r") with its rows' bytes contiguous, else None."""
        root, raw = arr, _mapping(arr)
        while isinstance(root, np.ndarray) and not isinstance(root, np.memmap):
            root = root.base
        name = getattr(root, "filename", None)
        if raw is None or name is None or arr.flags.writeable or arr.ndim != 2:
            return None
        if arr.strides[1] != 1 or arr.strides[0] < arr.shape[1]:
            return None
        # np.memmap maps from its offset rounded down to the allocation granularity
        start = root.offset - root.offset % mmap.ALLOCATIONGRANULARITY
        offset = start + arr.ctypes.data - np.frombuffer(raw, np.uint8).ctypes.data
        fd = os.open(name, os.O_RDONLY)
        end = offset + (arr.shape[0] - 1) * arr.strides[0] + arr.shape[1]
        if os.fstat(fd).st_size < end:
            os.close(fd)
            return None
        return cls(fd, offset, arr.strides[0], arr.shape)

    def take(self, ids) -> np.ndarray:
        """(N,) row ids -> (N, B) uint8: the rows' bytes, read from the file."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n_rows):
            bad = ids[(ids < 0) | (ids >= self.n_rows)][0]
            raise ValueError(f"row id {bad} out of range for {self.n_rows} rows")
        out = np.empty((len(ids), self.row_bytes), np.uint8)
        self._read(out, ids.tolist())
        return out

    def _read(self, out: np.ndarray, ids: list[int]) -> None:
        """Row ids[j]'s bytes into out[j], (N, B) uint8."""
        for row, i in zip(out, ids):
            if os.preadv(self.fd, [row], self.offset + i * self.stride) != self.row_bytes:
                raise OSError(f"short read of row {i}: the weights file changed under the model")


def off_file(arr):
    """arr itself, or a copy in this process's memory when arr is a view of a file mapping, read
    from the file as FileRows reads a row: making the copy maps no page either.

    What the cpu backend copies out of the file goes through here: the blocks it packs (read
    through the mapping, each piece would map its neighbours' dropped pages back) and the small
    float vectors (norm weights, biases) the native stack reads every step (read in place, each
    would map the folio around it, and GGUF files keep a layer's norms beside its matrices)."""
    if not isinstance(arr, np.ndarray) or _mapping(arr) is None:
        return arr
    rows = None
    if arr.flags.c_contiguous and arr.size:
        rows = FileRows.of(arr.reshape(1, -1).view(np.uint8))  # its bytes as one row
    if rows is None:  # not a plain run of the file's bytes: copied through the mapping
        return np.array(arr, order="C")
    out = np.empty(arr.shape, arr.dtype)
    rows._read(out.reshape(1, -1).view(np.uint8), [0])
    return out
