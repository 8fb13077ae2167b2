"""The compiled kernels (ext/ -> tinyserve._ext), when built: what the cpu backend runs on.

`kernels` holds the row ops, paged attention and the decoder stack; `quant` the matmuls over
GGUF blocks and bf16 bits. Either is None when not built or when TINYSERVE_PURE_PYTHON=1 asks for
the NumPy path (read once, at import)."""

from __future__ import annotations

from ..settings import settings

try:
    if settings().pure_python:
        raise ImportError("TINYSERVE_PURE_PYTHON=1")
    from .._ext import kernels

    IMPORT_ERROR: str | None = None
except ImportError as e:
    kernels, IMPORT_ERROR = None, str(e)

try:  # the quantized matmul (ext/quant.pyx); without it quantized weights are dequantized at load
    if kernels is None:
        raise ImportError("no native kernels")
    from .._ext import quant
except ImportError:
    quant = None

ISAS = ("scalar", "avx2", "vnni")  # quant.get_isa() names, in the kernels' numbering


def is_quant(w) -> bool:
    """GGUF blocks (loading.gguf_file.QuantTensor)."""
    return hasattr(w, "qtype") and hasattr(w, "data")


def is_bf16(w) -> bool:
    return type(w).__name__ == "BF16Array"


def quant_supports(qtype) -> bool:
    """Whether quant.matmul_q reads this ggml type."""
    supported = getattr(quant, "SUPPORTED_QTYPES", None)
    return supported is None or int(qtype) in {int(t) for t in supported}


def isa_index() -> int:
    """The quantized kernels' instruction set in use, as the decoder stack numbers it."""
    return ISAS.index(quant.get_isa())
