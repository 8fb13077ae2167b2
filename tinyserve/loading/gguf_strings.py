"""A GGUF string array kept as raw bytes: the vocab's ~100k strings are made when the tokenizer
is built, not while the loader creates the checkpoint's long-lived objects.

Made at load, the token and merge strings shared pymalloc arenas with the metadata keys and
tensor records read after them; once the tokenizer was built and the strings dropped, those
survivors kept ~5 MB of emptied pools resident. Made later, from this, they fill arenas of their
own that are returned whole when they go.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

import numpy as np


class GGUFStrings(Sequence):
    """len / index / iterate like a list of str: UTF-8 decoded (invalid bytes replaced) on access."""

    __slots__ = ("_ends", "_raw", "_starts")

    def __init__(self, raw: bytes, starts: np.ndarray, ends: np.ndarray):
        self._raw, self._starts, self._ends = raw, starts, ends

    @classmethod
    def parse(cls, buf: memoryview, pos: int, count: int) -> tuple[GGUFStrings, int]:
        """count (u64 length, bytes) items from buf[pos:] -> (the array, the offset after it).
        Raises IndexError if they run past the buffer."""
        starts = np.empty(count, dtype=np.int64)
        ends = np.empty(count, dtype=np.int64)
        at, size, unpack = pos, len(buf), struct.Struct("<Q").unpack_from
        for i in range(count):
            if at + 8 > size:
                raise IndexError(f"string {i} of {count} starts past the end ({at})")
            (n,) = unpack(buf, at)
            starts[i], at = at + 8, at + 8 + n
            ends[i] = at
        if at > size:
            raise IndexError(f"string array ends at {at}, past the end ({size})")
        raw = bytes(buf[pos:at])  # one object: freed whole with the array
        return cls(raw, starts - pos, ends - pos), at

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        a, b = int(self._starts[i]), int(self._ends[i])
        return self._raw[a:b].decode("utf-8", errors="replace")

    def __iter__(self) -> Iterator[str]:
        raw = self._raw
        for a, b in zip(self._starts.tolist(), self._ends.tolist()):
            yield raw[a:b].decode("utf-8", errors="replace")

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, Sequence)
            and len(self) == len(other)
            and all(x == y for x, y in zip(self, other))
        )

    def __repr__(self) -> str:
        return f"GGUFStrings({len(self)} strings)"
