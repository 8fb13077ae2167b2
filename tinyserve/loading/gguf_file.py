"""GGUF weights: metadata as plain Python values, tensors under Hugging Face names.

Dense tensors (F32/F16/BF16) come back as float32 NumPy arrays (F32 memory-mapped as is);
quantized ones as `QuantTensor`, which keeps ggml's blocks exactly as they lie on disk so a
native kernel can read them directly; its NumPy dequantizers live in ggml_quants.py.

The header is parsed by gguf_header.py (one vectorized read per numeric array) rather than with
gguf.GGUFReader, which builds NumPy views per array element: 2.3 s vs 0.2 s for SmolLM2's
49k-token vocab. The tests check this parser against GGUFReader.

References: GGUF spec (ggml/docs/gguf.md); llama.cpp convert_hf_to_gguf.py (names, q/k permute).
"""

from __future__ import annotations

import itertools
import math
import mmap
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, ModelNotFound, WeightsError
from ..models.family import Family
from ..models.registry import gguf_family
from .finite import check_finite
from .ggml_quants import (  # noqa: F401 - QK_K, Q re-exported: they lived here
    DENSE_TYPES,
    QK_K,
    SUPPORTED_TYPES,
    Q,
    check_supported,
    dense_to_float32,
    dequantize_blocks,
)
from .ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType
from .gguf_header import BadFile, HeaderReader, TruncatedFile
from .model_config import config_from_gguf, named

# -- the quantized tensor -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuantTensor:
    """A 2-D tensor kept as ggml blocks: `data` (rows, bytes_per_row) holds row r's blocks."""

    qtype: GGMLQuantizationType
    shape: tuple[int, int]  # logical (rows, cols), e.g. (out_features, in_features)
    data: np.ndarray  # (rows, cols // block_size * type_size) uint8, as on disk

    def __post_init__(self):
        check_supported(self.qtype)
        rows, cols = self.shape
        if cols % self.block_size:
            raise WeightsError(
                f"{self.qtype.name} row of {cols} values is not a multiple of the block size "
                f"{self.block_size}"
            )
        want = (rows, cols // self.block_size * self.type_size)
        if self.data.dtype != np.uint8 or self.data.shape != want:
            raise WeightsError(
                f"{self.qtype.name} data must be uint8 of shape {want} for logical shape "
                f"{self.shape}, got {self.data.dtype} {self.data.shape}"
            )

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def dequantize(self) -> np.ndarray:
        """() -> (rows, cols) float32."""
        return self._dequantize(self.data)

    def dequantize_rows(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n,) row ids -> (n, cols) float32, touching only those rows (embedding lookup)."""
        ids = np.asarray(ids, dtype=np.intp).reshape(-1)  # (n,)
        return self._dequantize(self.data[ids])

    def take_rows(self, rows: Sequence[int] | np.ndarray) -> QuantTensor:
        """(n,) row ids -> QuantTensor (n, cols): raw block rows selected/permuted, no dequantize."""
        rows = np.asarray(rows, dtype=np.intp).reshape(-1)  # (n,)
        return QuantTensor(self.qtype, (len(rows), self.shape[1]), self.data[rows])

    def _dequantize(self, data: np.ndarray) -> np.ndarray:
        """(n, bytes_per_row) uint8 -> (n, cols) float32."""
        blocks = np.ascontiguousarray(data).reshape(-1, self.type_size)  # (n * blocks_per_row, ts)
        return dequantize_blocks(blocks, self.qtype).reshape(data.shape[0], self.shape[1])


Tensor = np.ndarray | QuantTensor


# -- GGUF names -> Hugging Face names (each family declares its map) ------------------------

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_QK_RE = re.compile(r"model\.layers\.\d+\.self_attn\.[qk]_proj\.(weight|bias)")


def gguf_to_hf_name(name: str, arch: str, metadata: Mapping[str, Any] | None = None) -> str:
    """GGUF tensor name -> Hugging Face name; names without a mapping are returned unchanged."""
    found = gguf_family({**(metadata or {}), "general.architecture": arch})
    return _hf_name(name, found[0] if found else None)


def _hf_name(name: str, family: Family | None) -> str:
    """name as the family's GGUF name map renames it; unchanged if it has no entry."""
    if family is None:
        return name
    if name in family.gguf_global_names:
        return family.gguf_global_names[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in family.gguf_block_names:
        hf = f"model.layers.{m.group(1)}.{family.gguf_block_names[m.group(2)]}.{m.group(3)}"
        # DeepSeek's router bias: HF names it e_score_correction_bias, one attribute
        return hf.replace("e_score_correction.bias", "e_score_correction_bias")
    return name


# -- the q/k rope permutation -------------------------------------------------------------


def _rope_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """(n_rows,) p with permute_for_gguf(w)[i] = w[p[i]]: per head, interleave the two halves."""
    if n_head <= 0 or n_rows % (2 * n_head):
        raise WeightsError(f"cannot split {n_rows} q/k rows into {n_head} heads of even size")
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)  # (n_rows,)


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """(R, ...) -> (R, ...): llama.cpp's q/k row permutation (HF half-split rope -> interleaved)."""
    return w[_rope_row_order(w.shape[0], n_head)]


def unpermute_from_gguf(w: Tensor, n_head: int) -> Tensor:
    """(R, ...) -> (R, ...): inverse of permute_for_gguf; QuantTensor rows move as raw blocks."""
    rows = w.shape[0]
    inverse = np.argsort(_rope_row_order(rows, n_head))  # (R,)
    return w.take_rows(inverse) if isinstance(w, QuantTensor) else w[inverse]


# -- the file -----------------------------------------------------------------------------


@dataclass
class GGUFModelFile:
    """One GGUF file: metadata (plain values) and tensors under Hugging Face names."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Tensor]
    gguf_names: dict[str, str] = field(default_factory=dict)  # HF name -> name in the file

    @property
    def arch(self) -> str:
        return self.metadata.get("general.architecture", "")

    def config(self) -> ModelConfig:
        """ModelConfig from this file's metadata (raises UnsupportedArchitecture / ConfigError)."""
        try:
            return config_from_gguf(self.metadata, set(self.gguf_names.values()))
        except ConfigError as e:
            raise named(e, str(self.path)) from None


def read_gguf(path: str | Path) -> GGUFModelFile:
    """Memory-map a GGUF file: metadata and tensors (HF names, q/k un-permuted, mmap'd blocks)."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"no such GGUF file: {path}")
    if path.is_dir():
        raise WeightsError(f"{path} is a directory, not a GGUF file")
    try:
        if path.stat().st_size < 24:
            raise TruncatedFile("the file is shorter than a GGUF header")
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        header = HeaderReader(mm)
        metadata = header.read_metadata()
        infos = header.read_tensor_infos()
        alignment = metadata.get("general.alignment", 32)
        data_start = header.data_start(alignment)
    except OSError as e:
        raise WeightsError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    except TruncatedFile as e:
        raise WeightsError(f"{path} is truncated or corrupt: {e}") from None
    except BadFile as e:
        raise WeightsError(f"{path}: {e}") from None
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise WeightsError(f"{path} is corrupt: {_one_line(e)}") from None

    if not isinstance(metadata.get("general.architecture", ""), str):
        raise WeightsError(f"{path}: metadata general.architecture is not a string")
    _drop_pages(mm, 0, data_start)  # the header is parsed into Python values: never read again
    layout = _layout(path, infos, data_start, alignment, mm.shape[0])
    found = gguf_family(metadata)  # None: unsupported, names left as they are; config() says so
    family = found[0] if found else None
    tensors: dict[str, Tensor] = {}
    gguf_names: dict[str, str] = {}
    for name, shape, qtype, start, nbytes in layout:
        hf_name = _hf_name(name, family)
        if hf_name in tensors:  # two GGUF names for one weight: which one counts is a guess
            raise WeightsError(
                f"{path}: tensors {gguf_names[hf_name]} and {name} are both {hf_name}"
            )
        tensor = _tensor(mm, shape, qtype, start, nbytes)
        check_finite(tensor, f"{path}: tensor {name}")
        # the scales sit in every block, so the check faulted in every page of the tensor: drop
        # them until the model reads it (a backend often copies it instead: packing, upload), or
        # the whole file would stay resident through the rest of the load
        _drop_pages(mm, start, start + nbytes)
        tensors[hf_name] = tensor
        gguf_names[hf_name] = name
    if family is not None:
        _undo_quirks(path, mm, family, metadata, tensors, gguf_names)
    return GGUFModelFile(path=path, metadata=metadata, tensors=tensors, gguf_names=gguf_names)


def _undo_quirks(path: Path, mm, family: Family, metadata, tensors, gguf_names) -> None:
    """Undo how llama.cpp stores the family's tensors (its declared quirks), in place."""
    arch = metadata.get("general.architecture", "")
    before = dict(tensors)  # the mapped originals (q/k are replaced by un-permuted copies below)
    if arch in family.gguf_permuted_qk:
        _unpermute_qk(path, arch, metadata, tensors)
        for name in tensors:  # un-permuting copied q/k: the file's pages of them are not read again
            if _QK_RE.fullmatch(name) and name in gguf_names:
                _drop_pages(mm, *_span(mm, before[name]))
    if family.gguf_norms_plus_one:
        for hf_name, name in gguf_names.items():
            if name.endswith("norm.weight"):
                tensors[hf_name] = np.asarray(tensors[hf_name], dtype=np.float32) - np.float32(1.0)
    if family.gguf_fix_tensors is not None:
        family.gguf_fix_tensors(path, tensors, gguf_names)


Layout = list[tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]]


def _layout(path: Path, infos, data_start: int, alignment: int, file_size: int) -> Layout:
    """Check every tensor record before any is read: [(name, shape, type, start, nbytes)].

    A type with no dequantizer, an empty shape, rows that are not whole blocks, data that is not
    aligned to general.alignment, runs past the end of the file, or overlaps another tensor's is
    a WeightsError naming the tensor."""
    layout: Layout = []
    for name, shape, qtype_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(qtype_id)
        except ValueError:
            raise WeightsError(
                f"{path}: tensor {name} has unknown ggml type id {qtype_id}"
            ) from None
        if qtype not in SUPPORTED_TYPES:
            names = ", ".join(q.name for q in SUPPORTED_TYPES)
            raise WeightsError(
                f"{path}: tensor {name} has quantization type {qtype.name}, which is not "
                f"supported (supported: {names})"
            )
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if not shape or min(shape) <= 0:
            raise WeightsError(f"{path}: tensor {name} has an empty shape {shape}")
        cols, rows = shape[-1], math.prod(shape[:-1])  # leading dims folded into rows
        if cols % block_size:
            raise WeightsError(
                f"{path}: tensor {name} row of {cols} is not a whole number of blocks"
            )
        if offset % alignment:
            raise WeightsError(
                f"{path}: tensor {name} data offset {offset} is not a multiple of "
                f"general.alignment {alignment}"
            )
        start, nbytes = data_start + offset, rows * (cols // block_size) * type_size
        if start + nbytes > file_size:
            raise WeightsError(
                f"{path} is truncated: tensor {name} extends past the end of the file"
            )
        layout.append((name, shape, qtype, start, nbytes))
    by_start = sorted(layout, key=lambda t: t[3])
    for (prev, *_, prev_start, prev_n), (name, _, _, start, _) in itertools.pairwise(by_start):
        if start < prev_start + prev_n:  # also two tensors at one offset: sizes are never 0
            raise WeightsError(f"{path}: tensor {name} overlaps the data of tensor {prev}")
    return layout


def _tensor(mm, shape: tuple[int, ...], qtype: GGMLQuantizationType, start: int, nbytes: int):
    """One checked tensor record's bytes in the mapped file -> float32 array (dense) or QuantTensor."""
    raw = mm[start : start + nbytes].view(np.ndarray)  # no copy: a view of the mapping
    if qtype in DENSE_TYPES:
        return dense_to_float32(raw, qtype).reshape(shape)
    cols, rows = shape[-1], math.prod(shape[:-1])
    return QuantTensor(qtype, (rows, cols), raw.reshape(rows, nbytes // rows))


def _span(mm: np.ndarray, t: Tensor) -> tuple[int, int]:
    """(start, end) byte offsets in the mapping of a tensor that is a view of it, else (0, 0)."""
    data = t.data if isinstance(t, QuantTensor) else t
    if not isinstance(data, np.ndarray) or not np.shares_memory(data, mm):
        return 0, 0
    start = data.ctypes.data - mm.ctypes.data
    return start, start + data.nbytes


def _drop_pages(mm: np.ndarray, start: int, end: int) -> None:
    """Unmap the whole pages of mm[start:end] from this process (MADV_DONTNEED; the file is
    read-only, so a later read faults them back in from the page cache): bytes already copied
    out stop counting in resident memory twice."""
    raw = getattr(mm, "_mmap", None)
    if raw is None or not hasattr(raw, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the range only
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        raw.madvise(mmap.MADV_DONTNEED, first, last - first)


def _unpermute_qk(path: Path, arch: str, meta: dict[str, Any], tensors: dict[str, Tensor]):
    """llama.cpp stores q/k permuted for its rope: undo it so tensors equal the HF checkpoint."""
    for name, tensor in tensors.items():
        if _QK_RE.fullmatch(name):
            i = int(name.split(".")[2])
            key = f"{arch}.attention.head_count" + ("" if ".q_proj." in name else "_kv")
            heads = _per_layer(path, meta, key, i)
            try:
                tensors[name] = unpermute_from_gguf(tensor, heads)
            except WeightsError as e:
                raise WeightsError(f"{path}: tensor {name}: {e}") from None


def _per_layer(path: Path, meta: dict[str, Any], key: str, layer: int) -> int:
    """A head count for one layer: key's integer, or its entry for the layer (head_count_kv may
    fall back to head_count)."""
    if key not in meta and key.endswith("_kv"):
        key = key[: -len("_kv")]
    if key not in meta:
        raise ConfigError(f"{path}: GGUF metadata lacks {key}")
    value = meta[key]
    if isinstance(value, list):
        value = value[layer] if layer < len(value) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: GGUF metadata {key} is not a head count for layer {layer}")
    return value


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
