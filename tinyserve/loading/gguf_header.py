"""The GGUF header (spec: ggml/docs/gguf.md): metadata key/values and tensor records, read in
order from a memory-mapped file; gguf_file.py turns them into tensors.

Long string arrays (the vocab's tokens and merges) stay one bytes object until read
(GGUFStrings): loading makes no Python string per token, only the tokenizer, which reads them
once, does; the array is freed whole with the metadata.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .ggml_types import GGUFValueType


class TruncatedFile(Exception):
    """A read ran past the end of the file."""


class BadFile(Exception):
    """Not a GGUF file this reader understands (magic, version, byte order)."""


# String arrays longer than this (the vocab: tokens, merges) stay raw bytes until read, numeric
# ones (scores, token types) NumPy arrays
_LAZY_STRINGS = 1024
# Arrays of arrays deeper than this are refused: each level is a Python call, and a hostile file
# of nested array headers would otherwise end in a RecursionError
_MAX_NESTING = 4
# The fewest bytes one item can take: a declared count is checked against the bytes left with
# these before anything is allocated (a 2^40-string array must not reach np.empty)
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_MIN_STRING_BYTES = 8  # the length of an empty string
_MIN_ARRAY_BYTES = 4 + 8  # item type and count of an empty array

_SCALARS = {  # GGUF value type -> little-endian NumPy dtype
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8", GGUFValueType.BOOL: "?",
}  # fmt: skip


class HeaderReader:
    """Sequential reader of a GGUF header (spec: ggml/docs/gguf.md), little-endian, v2/v3."""

    def __init__(self, mm: np.ndarray):
        self.buf = memoryview(mm)
        self.pos = 0
        magic = bytes(self._take(4))
        if magic != b"GGUF":
            raise BadFile(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        version = self._u32()
        if version not in (2, 3):
            hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
            raise BadFile(f"unsupported GGUF version {version}{hint}")
        self.n_tensors, self.n_kv = self._u64(), self._u64()
        self._check_count(self.n_tensors, 0, "tensor count")  # checked again after the metadata
        self._check_count(self.n_kv, _MIN_KV_BYTES, "metadata key/value count")

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise TruncatedFile(f"needs {n} bytes at offset {self.pos}, file has {len(self.buf)}")
        out, self.pos = self.buf[self.pos : end], end
        return out

    def _check_count(self, count: int, min_item_bytes: int, what: str) -> None:
        """Raise TruncatedFile if count items of at least min_item_bytes each cannot fit in what is left."""
        left = len(self.buf) - self.pos
        if count * min_item_bytes > left:
            raise TruncatedFile(
                f"{what} {count} at offset {self.pos} needs at least {count * min_item_bytes} "
                f"bytes, {left} remain"
            )

    def _u32(self) -> int:
        return struct.unpack("<I", self._take(4))[0]

    def _u64(self) -> int:
        return struct.unpack("<Q", self._take(8))[0]

    def _str(self) -> str:
        return bytes(self._take(self._u64())).decode("utf-8", errors="replace")

    def _value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self._str()
        if vtype == GGUFValueType.ARRAY:
            at = self.pos
            item_type, count = self._u32(), self._u64()
            if depth >= _MAX_NESTING:
                raise BadFile(f"metadata arrays nested deeper than {_MAX_NESTING} at offset {at}")
            if item_type in _SCALARS:
                min_item = np.dtype(_SCALARS[GGUFValueType(item_type)]).itemsize
            elif item_type == GGUFValueType.STRING:
                min_item = _MIN_STRING_BYTES
            elif item_type == GGUFValueType.ARRAY:
                min_item = _MIN_ARRAY_BYTES
            else:
                raise BadFile(f"unknown metadata array item type {item_type} at offset {at}")
            self._check_count(count, min_item, "metadata array length")
            if item_type in _SCALARS:  # one vectorized read for numeric arrays
                dtype = np.dtype(_SCALARS[GGUFValueType(item_type)])
                values = np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype)
                # a vocab's scores / token types stay one array (a list: 32 bytes an item)
                return values.copy() if count > _LAZY_STRINGS else values.tolist()
            if item_type == GGUFValueType.STRING and count > _LAZY_STRINGS:
                try:
                    strings, self.pos = GGUFStrings.parse(self.buf, self.pos, count)
                except IndexError as e:
                    raise TruncatedFile(str(e)) from None
                return strings
            return [self._value(item_type, depth + 1) for _ in range(count)]
        if vtype in _SCALARS:
            dtype = np.dtype(_SCALARS[GGUFValueType(vtype)])
            value = np.frombuffer(self._take(dtype.itemsize), dtype=dtype)[0]
            if vtype == GGUFValueType.FLOAT32:
                return float(str(value))  # shortest repr of the f32: 1e-05, not 9.99e-06
            return value.item()
        raise BadFile(f"unknown metadata value type {vtype} at offset {self.pos}")

    def read_metadata(self) -> dict[str, Any]:
        meta = {}
        for _ in range(self.n_kv):
            at, key = self.pos, self._str()
            if key in meta:  # llama.cpp refuses these too: which value would count is a guess
                raise BadFile(f"metadata key {key!r} appears twice (offset {at})")
            meta[key] = self._value(self._u32())
        return meta

    def read_tensor_infos(self) -> list[tuple[str, tuple[int, ...], int, int]]:
        """-> [(name, NumPy shape, ggml type id, offset from the data start)]."""
        self._check_count(self.n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor count")
        infos, seen = [], set()
        for _ in range(self.n_tensors):
            at, name = self.pos, self._str()
            if len(name) > 256 or not name.isprintable():  # ggml caps names at 64 bytes
                raise BadFile(f"corrupt tensor name at offset {at}")
            if name in seen:
                raise BadFile(f"tensor {name} appears twice in the tensor list")
            seen.add(name)
            n_dims = self._u32()
            if n_dims > 8:
                raise BadFile(f"tensor {name} claims {n_dims} dimensions")
            dims = struct.unpack(f"<{n_dims}Q", self._take(8 * n_dims))
            qtype, offset = self._u32(), self._u64()
            infos.append(
                (name, tuple(reversed(dims)), qtype, offset)
            )  # ggml ne[] is innermost-first
        return infos

    def data_start(self, alignment: Any) -> int:
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise BadFile(f"general.alignment {alignment!r} is not a power of two")
        return -(-self.pos // alignment) * alignment


class GGUFStrings(Sequence):
    """len / index / iterate like a list of str: UTF-8 decoded (invalid bytes replaced) on access."""

    __slots__ = ("_ends", "_raw", "_starts")

    def __init__(self, raw: bytes, starts: np.ndarray, ends: np.ndarray):
        self._raw, self._starts, self._ends = raw, starts, ends

    @classmethod
    def parse(cls, buf: memoryview, pos: int, count: int) -> tuple[GGUFStrings, int]:
        """count (u64 length, bytes) items from buf[pos:] -> (the array, the offset after it).
        Raises IndexError if they run past the buffer."""
        if pos + count * _MIN_STRING_BYTES > len(buf):  # before allocating count offsets
            raise IndexError(f"{count} strings cannot fit in the {len(buf) - pos} bytes left")
        starts = np.empty(count, dtype=np.int64)
        ends = np.empty(count, dtype=np.int64)
        at, size, unpack = pos, len(buf), struct.Struct("<Q").unpack_from
        for i in range(count):
            if at + 8 > size:
                raise IndexError(f"string {i} of {count} starts past the end ({at})")
            (n,) = unpack(buf, at)
            if n > size - at - 8:  # before the offset is stored: 2^64 - 1 overflows an int64
                raise IndexError(f"string {i} of {count} at {at} runs past the end ({size})")
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
