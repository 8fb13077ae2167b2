"""ggml's block quantizations, dequantized with NumPy: the reference the native kernels match.

Each dequantizer follows ggml's `dequantize_row_*` in ggml-quants.c (block layouts in
ggml-common.h), vectorized over blocks. Tests check them against gguf-py's gguf.quants.

References: ggml/src/ggml-quants.c, ggml/src/ggml-common.h.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import WeightsError
from .ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType
QK_K = 256  # values per K-quant super-block


# -- dequantizers: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 ------------


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """(n, type_size) uint8 -> (n, 1) float32: the f16 stored at byte `offset` of each block."""
    raw = np.ascontiguousarray(blocks[:, offset : offset + 2])
    return raw.view(np.float16).astype(np.float32)  # (n, 1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) uint8 -> (n, 2k): low nibbles of all bytes, then high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits(packed: np.ndarray, n_bits: int) -> np.ndarray:
    """(n, b) uint8 -> (n, n_bits) uint8: bit j of the little-endian integer, for j < n_bits."""
    return np.unpackbits(packed, axis=1, count=n_bits, bitorder="little")


def _dequant_q4_0(b: np.ndarray) -> np.ndarray:
    # block_q4_0: d f16 | qs[16] ; y = (q - 8) * d
    q = _nibbles(b[:, 2:18]).astype(np.int8) - 8  # (n, 32)
    return q.astype(np.float32) * _f16(b, 0)


def _dequant_q4_1(b: np.ndarray) -> np.ndarray:
    # block_q4_1: d f16 | m f16 | qs[16] ; y = q * d + m
    q = _nibbles(b[:, 4:20]).astype(np.float32)  # (n, 32)
    return q * _f16(b, 0) + _f16(b, 2)


def _dequant_q5_0(b: np.ndarray) -> np.ndarray:
    # block_q5_0: d f16 | qh u32 (5th bit of value j) | qs[16] ; y = (q - 16) * d
    q = _nibbles(b[:, 6:22]) | (_bits(b[:, 2:6], 32) << 4)  # (n, 32)
    return (q.astype(np.int8) - 16).astype(np.float32) * _f16(b, 0)


def _dequant_q5_1(b: np.ndarray) -> np.ndarray:
    # block_q5_1: d f16 | m f16 | qh u32 | qs[16] ; y = q * d + m
    q = _nibbles(b[:, 8:24]) | (_bits(b[:, 4:8], 32) << 4)  # (n, 32)
    return q.astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _dequant_q8_0(b: np.ndarray) -> np.ndarray:
    # block_q8_0: d f16 | qs[32] int8 ; y = q * d
    q = np.ascontiguousarray(b[:, 2:34]).view(np.int8)  # (n, 32)
    return q.astype(np.float32) * _f16(b, 0)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) uint8 -> (n, 8), (n, 8): the 6-bit scales and mins of Q4_K/Q5_K (get_scale_min_k4)."""
    lo, mid, hi = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)  # (n, 8)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)  # (n, 8)
    return sc.astype(np.float32), mn.astype(np.float32)


def _dequant_q4_k(b: np.ndarray) -> np.ndarray:
    # block_q4_K: d f16 | dmin f16 | scales[12] | qs[128]; 8 sub-blocks of 32, y = d*sc*q - dmin*m
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d, m = _f16(b, 0) * sc, _f16(b, 2) * mn  # (n, 8)
    qs = b[:, 16:144].reshape(n, 4, 32)  # 4 chunks of 32 bytes: low nibbles, then high nibbles
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)  # (n, 8 sub-blocks, 32)
    return (d[:, :, None] * q - m[:, :, None]).reshape(n, QK_K)


def _dequant_q5_k(b: np.ndarray) -> np.ndarray:
    # block_q5_K: d | dmin | scales[12] | qh[32] | qs[128]; bit s of qh[l] is the 5th bit of
    # value l of sub-block s
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d, m = _f16(b, 0) * sc, _f16(b, 2) * mn  # (n, 8)
    qs = b[:, 48:176].reshape(n, 4, 32)
    ql = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)  # (n, 8, 32)
    qh = np.unpackbits(b[:, 16:48, None], axis=2, bitorder="little")  # (n, 32 l, 8 s)
    q = (ql | (qh.transpose(0, 2, 1) << 4)).astype(np.float32)  # (n, 8, 32)
    return (d[:, :, None] * q - m[:, :, None]).reshape(n, QK_K)


def _dequant_q6_k(b: np.ndarray) -> np.ndarray:
    # block_q6_K: ql[128] | qh[64] | scales[16] int8 | d f16; two halves of 128 values, each
    # from ql[64] (low nibbles: values 0-63, high: 64-127) and qh[32] (2 bits per quarter)
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)  # (n, half, qtr, 32)
    q = (low | ((qh & 3) << 4)).astype(np.int8) - 32  # (n, 2, 4, 32)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)  # (n, 16)
    d = _f16(b, 208) * sc  # (n, 16): one scale per 16 values
    return (d[:, :, None] * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def _dequant_q2_k(b: np.ndarray) -> np.ndarray:
    # block_q2_K: scales[16] (lo nibble scale, hi nibble min) | qs[64] | d f16 | dmin f16;
    # value 128h + 32j + l is bits 2j..2j+1 of qs[32h + l]
    n = b.shape[0]
    sc = b[:, 0:16]
    dl = _f16(b, 80) * (sc & 0x0F).astype(np.float32)  # (n, 16)
    ml = _f16(b, 82) * (sc >> 4).astype(np.float32)  # (n, 16)
    qs = b[:, 16:80].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    q = (qs & 3).reshape(n, 16, 16).astype(np.float32)  # (n, 16 groups, 16)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, QK_K)


def _dequant_q3_k(b: np.ndarray) -> np.ndarray:
    # block_q3_K: hmask[32] | qs[64] | scales[12] (16 x 6-bit) | d f16; value 128h + 32j + l has
    # low bits 2j..2j+1 of qs[32h + l] and subtracts 4 unless bit 4h+j of hmask[l] is set
    n = b.shape[0]
    s = b[:, 96:108]
    low4 = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)  # (n, 16)
    high2 = (s[:, 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3  # (n, 4 i%4, 4 i//4)
    scales = low4 | (high2.transpose(0, 2, 1).reshape(n, 16) << 4)
    dl = _f16(b, 108) * (scales.astype(np.int8) - 32).astype(np.float32)  # (n, 16)
    qs = b[:, 32:96].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    hm = np.unpackbits(b[:, 0:32, None], axis=2, bitorder="little")  # (n, 32 l, 8 bit)
    hm = hm.transpose(0, 2, 1).reshape(n, 2, 4, 32)  # (n, h, j, l)
    q = (qs & 3).astype(np.int8) - ((hm ^ 1) << 2).astype(np.int8)  # (n, 2, 4, 32)
    return (dl[:, :, None] * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


_DEQUANT: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q4_0: _dequant_q4_0,
    Q.Q4_1: _dequant_q4_1,
    Q.Q5_0: _dequant_q5_0,
    Q.Q5_1: _dequant_q5_1,
    Q.Q8_0: _dequant_q8_0,
    Q.Q2_K: _dequant_q2_k,
    Q.Q3_K: _dequant_q3_k,
    Q.Q4_K: _dequant_q4_k,
    Q.Q5_K: _dequant_q5_k,
    Q.Q6_K: _dequant_q6_k,
}
DENSE_TYPES = (Q.F32, Q.F16, Q.BF16)
SUPPORTED_TYPES = DENSE_TYPES + tuple(_DEQUANT)
_BLOCKS_PER_CHUNK = 1 << 16  # bounds the temporaries of one dequantize call


def check_supported(qtype: GGMLQuantizationType) -> None:
    """Raise WeightsError, naming the supported types, for a quantization with no dequantizer."""
    if qtype not in _DEQUANT:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise WeightsError(f"quantization type {qtype.name} is not supported (supported: {names})")


def dequantize_blocks(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """(n_blocks, type_size) uint8 -> (n_blocks, block_size) float32."""
    check_supported(qtype)
    fn = _DEQUANT[qtype]
    block_size = GGML_QUANT_SIZES[qtype][0]
    out = np.empty((blocks.shape[0], block_size), np.float32)
    for start in range(0, blocks.shape[0], _BLOCKS_PER_CHUNK):
        stop = start + _BLOCKS_PER_CHUNK
        out[start:stop] = fn(blocks[start:stop])
    return out


def dense_to_float32(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """(nbytes,) uint8 of an F32/F16/BF16 tensor -> (n,) float32 (F32: a view, no copy)."""
    raw = raw.reshape(-1)
    if qtype == Q.F32:
        return raw.view(np.float32)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32)
    if qtype == Q.BF16:
        # bf16 is the top half of an f32: shift the 16 bits into place
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise WeightsError(f"{qtype.name} is not a dense float type")
