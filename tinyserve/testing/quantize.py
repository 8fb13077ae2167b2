"""Q4_K blocks for the kit's checkpoints: gguf-py quantizes the 32-wide types but not the k-quants.

block_q4_K (ggml-common.h), 144 bytes per 256 values: d f16 | dmin f16 | scales[12] | qs[128].
Eight sub-blocks of 32 values, each with a 6-bit scale and a 6-bit min: y = d*sc*q - dmin*m,
q in 0..15. A plain min/max fit per sub-block (llama.cpp's make_qkx2 searches for a better one);
the kit needs valid blocks with realistic error, not the best ones. Checked against gguf-py's and
tinyserve's own dequantizers by tests/test_conformance.py.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """(rows, cols) float32, cols a multiple of 256 -> (rows, cols // 256 * 144) uint8 blocks."""
    rows, cols = w.shape
    assert cols % QK_K == 0, f"Q4_K rows must be whole super-blocks of {QK_K}, got {cols}"
    x = np.asarray(w, np.float32).reshape(-1, 8, 32)  # (n, sub-block, value)
    lo = np.minimum(x.min(axis=2), 0.0)  # (n, 8) the min is subtracted, so it is never positive
    scale = (x.max(axis=2) - lo) / 15  # (n, 8)
    # the super-block's f16 d / dmin quantize the sub-blocks' scales and mins to 6 bits
    d = (scale.max(axis=1) / 63).astype(np.float16)  # (n,)
    dmin = (-lo.min(axis=1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63)
    mn = np.clip(np.round(np.divide(-lo, dminf, out=np.zeros_like(lo), where=dminf > 0)), 0, 63)
    step, offset = (df * sc)[:, :, None], (dminf * mn)[:, :, None]  # (n, 8, 1)
    q = np.clip(np.round(np.divide(x + offset, step, out=np.zeros_like(x), where=step > 0)), 0, 15)
    q = q.astype(np.uint8)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    # pack the 6-bit scales and mins as get_scale_min_k4 unpacks them
    packed = np.empty((x.shape[0], 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    # 4 chunks of 32 bytes: sub-block 2c in the low nibbles of chunk c, 2c + 1 in the high ones
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate(
        [d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed, qs], axis=1
    )  # (n, 144)
    return blocks.reshape(rows, cols // QK_K * 144)
