"""NaN / Inf in weights, found at load where it is cheap to look.

Looking at every value of every tensor would read the whole checkpoint before the first token.
What is read instead: quantized tensors' block scales (one or two f16 per block of 32 or 256
values: a NaN scale makes its whole block NaN) and dense tensors up to SMALL_DENSE values (norms,
biases, rope factors; a big dense matrix stays unread in its mmap). The rest is caught by the
engine's guard on logits, which finishes such a request with finish_reason "error".

Block layouts: ggml/src/ggml-common.h.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import WeightsError
from .ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType
SMALL_DENSE = 1 << 20  # dense tensors up to this many values are checked whole

# where each block keeps its f16 scales (d, and the min dmin / m where there is one): byte offsets
F16_SCALE_OFFSETS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}  # fmt: skip
_F16_EXPONENT_HI = 0x7C  # an f16's exponent bits, all in its high byte: all set is Inf or NaN


def check_finite(tensor: Any, what: str) -> None:
    """Raise WeightsError naming `what` if the cheap look finds a NaN or Inf in tensor."""
    qtype = getattr(tensor, "qtype", None)
    if qtype is not None:
        blocks = tensor.data.reshape(-1, GGML_QUANT_SIZES[qtype][1])  # (n_blocks, type_size)
        bad = _bad_f16_scales(blocks, F16_SCALE_OFFSETS.get(qtype, ()))
        if bad is not None:
            raise WeightsError(f"{what}: block {bad} has a NaN or infinite scale")
        return
    bits = getattr(tensor, "bits", None)  # safetensors' BF16Array
    size = int(np.prod(tensor.shape))
    if size > SMALL_DENSE:
        return
    values = tensor.dequantize() if bits is not None else np.asarray(tensor)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise WeightsError(f"{what} holds NaN or infinite values")


def _bad_f16_scales(blocks: np.ndarray, offsets: tuple[int, ...]) -> int | None:
    """(n, type_size) uint8 -> the first block whose f16 at one of offsets is not finite, or None."""
    for off in offsets:
        hi = blocks[:, off + 1]  # (n,) little-endian: the high byte comes second
        bad = hi & _F16_EXPONENT_HI == _F16_EXPONENT_HI  # (n,)
        if bad.any():
            return int(bad.argmax())
    return None
