"""safetensors checkpoints, memory-mapped, read without torch (bfloat16 included).

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw bytes. We read it ourselves because NumPy has no bfloat16 and the
safetensors package's NumPy loader refuses it; every offset is checked so a truncated file fails
with a clear error instead of returning garbage.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WeightsError

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass(frozen=True, slots=True)
class BF16Array:
    """bfloat16 bits kept as uint16 (mmap); a backend widens them when it takes the weight."""

    bits: np.ndarray  # uint16, any shape

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    def dequantize(self) -> np.ndarray:
        """bf16 is the top half of a float32: shift the bits back into place."""
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray | BF16Array]:
    """One .safetensors file -> {name: array}, memory-mapped (float16 as is, bfloat16 as BF16Array)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise WeightsError(f"{path} is truncated or corrupt (header of {n} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise WeightsError(f"missing weights file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{path} is corrupt (unreadable header)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is corrupt (header is not an object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    mm = (
        np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_len,))
        if data_len
        else None
    )
    tensors: dict[str, np.ndarray | BF16Array] = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WeightsError(
                f"{path}: tensor {name!r} has a malformed or unsupported entry {info}"
            ) from None
        if (
            not (0 <= start <= end <= data_len)
            or end - start != int(np.prod(shape)) * dtype.itemsize
        ):
            raise WeightsError(
                f"{path} is truncated or corrupt: tensor {name!r} lies outside the file"
            )
        arr = mm[start:end].view(dtype).reshape(shape) if end > start else np.zeros(shape, dtype)
        tensors[name] = BF16Array(arr) if info["dtype"] == "BF16" else arr
    return tensors


def read_safetensors_dir(model_dir: str | Path) -> dict[str, np.ndarray | BF16Array]:
    """model.safetensors, or the shards a model.safetensors.index.json names."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightsError(f"{index} is corrupt (no weight_map)") from None
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(model_dir / shard))
        missing = set(weight_map) - set(tensors)
        if missing:
            raise WeightsError(f"{index} names tensors its shards lack: {sorted(missing)[:3]}")
        return tensors
    single = model_dir / "model.safetensors"
    if single.exists():
        return read_safetensors(single)
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        tensors = {}
        for f in files:
            tensors.update(read_safetensors(f))
        return tensors
    raise WeightsError(f"no .safetensors weights in {model_dir}")
