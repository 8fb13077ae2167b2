"""How close a backend must come to the NumPy reference, by compute dtype."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checkpoints import ARCHITECTURES


@dataclass(frozen=True, slots=True)
class Tolerance:
    """Per compute dtype: op outputs (rtol, atol) and model logits (atol in units of their std)."""

    rtol: float
    atol: float
    logits: float


TOLERANCES = {
    "float32": Tolerance(rtol=1e-4, atol=1e-5, logits=1e-4),
    "float16": Tolerance(rtol=5e-3, atol=5e-3, logits=1.5e-2),
    "bfloat16": Tolerance(rtol=3e-2, atol=3e-2, logits=1e-1),
}


def tolerance(backend) -> Tolerance:
    dtype = getattr(backend, "dtype", None) or "float32"
    if dtype not in TOLERANCES:
        raise ValueError(
            f"no conformance tolerance for dtype {dtype!r}; known: {', '.join(TOLERANCES)}"
        )
    return TOLERANCES[dtype]


# A backend may round activations to 8 bits for its dot products with GGUF blocks (llama.cpp's
# q8 x q4 kernels do); on quantized checkpoints logits may then move by this much (x their std).
# Not 0.1: MLA's chain of low-rank products (DeepSeek) and a mixture's experts (Mixtral in Q4_K)
# round activations more often than one dense layer does; op by op and fused alike.
QUANTIZED_ACTIVATION_TOLERANCE = 0.2
# Likewise a backend may round activations to bf16 for its dot products with bf16 weights
# (llama.cpp's bf16 vec_dot, and the cpu backend's AVX-512 BF16 kernels): 8 significant bits,
# a relative error of up to 2^-8 per activation, move the tiny checkpoints' logits by a few
# hundredths of their std.
BF16_ACTIVATION_TOLERANCE = 0.06


def _logits_atol(backend, reference: np.ndarray, arch: str = "llama") -> float:
    tol = tolerance(backend).logits
    if ARCHITECTURES[arch][1].startswith("Q"):
        tol = max(tol, QUANTIZED_ACTIVATION_TOLERANCE)
    elif ARCHITECTURES[arch][1] == "bfloat16":
        tol = max(tol, BF16_ACTIVATION_TOLERANCE)
    return tol * max(1.0, float(reference.std()))


def _dtype(backend) -> str:
    return getattr(backend, "dtype", None) or "float32"
