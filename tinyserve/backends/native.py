"""The compiled kernels (ext/ -> tinyserve._ext.kernels), when built: what the cpu backend runs on.

One module: the row ops, paged attention, the matmuls over GGUF blocks and bf16 bits, and the
decoder stack. None when not built or when TINYSERVE_PURE_PYTHON=1 asks for the NumPy path (read
once, at import)."""

from __future__ import annotations

from ..settings import settings

try:
    if settings().pure_python:
        raise ImportError("TINYSERVE_PURE_PYTHON=1")
    from .._ext import kernels

    IMPORT_ERROR: str | None = None
except ImportError as e:
    kernels, IMPORT_ERROR = None, str(e)


def is_quant(w) -> bool:
    """GGUF blocks (loading.gguf_file.QuantTensor)."""
    return hasattr(w, "qtype") and hasattr(w, "data")


def is_bf16(w) -> bool:
    return type(w).__name__ == "BF16Array"


def quant_supports(qtype) -> bool:
    """Whether kernels.matmul_q reads this ggml type."""
    supported = getattr(kernels, "SUPPORTED_QTYPES", None)
    return supported is None or int(qtype) in {int(t) for t in supported}


def matmul_operand(w) -> tuple:
    """(blocks, qtype code) kernels.matmul_q reads for quantized w: the packed groups of rows
    when the cpu backend packed it (cpu.PackedQuant, code qtype | kernels.PACKED), else its
    row-major blocks."""
    packed = getattr(w, "packed", None)
    if packed is not None:
        return packed, int(w.qtype) | kernels.PACKED
    return w.data, int(w.qtype)
