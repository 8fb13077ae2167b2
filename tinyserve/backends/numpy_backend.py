"""The `numpy` backend: the reference. Dense float32 weights, ops in tinyserve/backends/numpy_ops.py."""

from __future__ import annotations

from .base import Backend
from .numpy_ops import NumpyOps


class NumpyBackend(Backend):
    """Reference executor: readable NumPy, float32 throughout; quantized weights dequantized at load."""

    name = "numpy"

    def __init__(self, device: str | None = None, dtype: str | None = None):
        if device not in (None, "cpu"):
            raise ValueError(f"the numpy backend runs on the cpu only, not {device!r}")
        if dtype not in (None, "float32"):
            raise ValueError(f"the numpy backend computes in float32 only, not {dtype!r}")
        super().__init__(device, dtype)
        self.ops = NumpyOps()

    def describe(self) -> str:
        return "NumPy reference (float32)"
