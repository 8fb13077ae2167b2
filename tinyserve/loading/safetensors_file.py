"""safetensors checkpoints, memory-mapped, read without torch (bfloat16 included).

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw bytes. We read it ourselves because NumPy has no bfloat16 and the
safetensors package's NumPy loader refuses it; every offset is checked so a truncated file fails
with a clear error instead of returning garbage.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, WeightsError
from .finite import check_finite
from .json_file import json_type, read_json_object

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
            header = json.loads(f.read(n), object_pairs_hook=_refuse_duplicates)
    except FileNotFoundError:
        raise WeightsError(f"missing weights file {path}") from None
    except IsADirectoryError:
        raise WeightsError(f"{path} is a directory, not a safetensors file") from None
    except _DuplicateKey as e:
        raise WeightsError(f"{path}: tensor {e.args[0]!r} appears twice in the header") from None
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WeightsError(f"{path} is corrupt (unreadable header)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is corrupt (header is not an object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        dtype, shape, start, end = _entry(path, name, info)
        if not (0 <= start <= end <= data_len):
            raise WeightsError(
                f"{path} is truncated or corrupt: tensor {name!r} lies outside the file"
            )
        if end - start != math.prod(shape) * dtype.itemsize:
            raise WeightsError(
                f"{path}: tensor {name!r} has {end - start} bytes for shape {list(shape)} "
                f"of {info['dtype']}"
            )
        spans.append((start, end, name))
    spans.sort()
    for (_, prev_end, prev), (start, end, name) in itertools.pairwise(spans):
        if start < prev_end and end > start:  # empty tensors take no bytes: they overlap nothing
            raise WeightsError(f"{path}: tensor {name!r} overlaps the data of tensor {prev!r}")
    mm = (
        np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_len,))
        if data_len
        else None
    )
    tensors: dict[str, np.ndarray | BF16Array] = {}
    for name, info in header.items():
        dtype, shape, start, end = _entry(path, name, info)
        arr = mm[start:end].view(dtype).reshape(shape) if end > start else np.zeros(shape, dtype)
        tensor = BF16Array(arr) if info["dtype"] == "BF16" else arr
        check_finite(tensor, f"{path}: tensor {name!r}")
        tensors[name] = tensor
    return tensors


def _entry(path: Path, name: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """A header entry {dtype, shape, data_offsets} -> (dtype, shape, start, end), type-checked."""
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("dtype"), str)
        or info["dtype"] not in _DTYPES
        or not isinstance(info.get("shape"), list)
        or not all(_is_size(s) for s in info["shape"])
        or not isinstance(info.get("data_offsets"), list)
        or len(info["data_offsets"]) != 2
        or not all(_is_size(o) for o in info["data_offsets"])
    ):
        shown = json.dumps(info)[:200]
        raise WeightsError(f"{path}: tensor {name!r} has a malformed or unsupported entry {shown}")
    start, end = info["data_offsets"]
    return np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"]), start, end


def _is_size(x) -> bool:
    """A JSON integer >= 0 (not a bool, not 2.0)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class _DuplicateKey(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a key given twice is an error (json keeps the last one silently)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def read_safetensors_dir(model_dir: str | Path) -> dict[str, np.ndarray | BF16Array]:
    """model.safetensors, or the shards a model.safetensors.index.json names."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return _read_shards(model_dir, index)
    single = model_dir / "model.safetensors"
    if single.exists():
        return read_safetensors(single)
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return _merge(files)
    raise WeightsError(f"no .safetensors weights in {model_dir}")


def _read_shards(model_dir: Path, index: Path) -> dict[str, np.ndarray | BF16Array]:
    """The shards model.safetensors.index.json names: each must lie inside the model directory."""
    data = read_json_object(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConfigError(f"{index}: weight_map must be an object, got {json_type(weight_map)}")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise ConfigError(f"{index}: weight_map[{bad!r}] must be a shard file name")
    shards = [_shard_path(model_dir, index, s) for s in sorted(set(weight_map.values()))]
    tensors = _merge(shards)
    missing = set(weight_map) - set(tensors)
    if missing:
        raise WeightsError(f"{index} names tensors its shards lack: {sorted(missing)[:3]}")
    return tensors


def _shard_path(model_dir: Path, index: Path, shard: str) -> Path:
    """index's shard name -> its path; a name that leaves the model directory (../, absolute, a
    symlink out) is refused. The Hugging Face hub cache's own layout is allowed: a snapshot's
    files are symlinks into the repo's blobs/ folder beside snapshots/."""
    root = model_dir.resolve()
    target = (model_dir / shard).resolve()
    allowed = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        allowed.append(root.parent.parent / "blobs")
    inside = Path(shard).parts and not Path(shard).is_absolute() and ".." not in Path(shard).parts
    if not inside or not any(target.is_relative_to(a) for a in allowed):
        raise WeightsError(f"{index}: shard {shard!r} lies outside the model directory {root}")
    return model_dir / shard


def _merge(files: list[Path]) -> dict[str, np.ndarray | BF16Array]:
    """Tensors of several files; a name in two of them is refused (which one counts is a guess)."""
    tensors: dict[str, np.ndarray | BF16Array] = {}
    found_in: dict[str, Path] = {}
    for f in files:
        for name, t in read_safetensors(f).items():
            if name in tensors:
                raise WeightsError(f"tensor {name!r} is in both {found_in[name]} and {f}")
            tensors[name], found_in[name] = t, f
    return tensors
