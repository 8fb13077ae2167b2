"""Model families (one file each, listed in registry.py) and the weight plumbing they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import WeightsError
from .registry import get_family


def build_model(cfg: ModelConfig, tensors: dict, ops):
    """The model for cfg with its weights handed to the backend's ops."""
    return get_family(cfg.family).model(cfg, tensors, ops)


@dataclass(slots=True)
class Linear:
    """y = x @ w.T (+ b): an nn.Linear, its weight held the way the backend wants it."""

    w: Any  # (out, in)
    b: Any = None  # (out,) or None


def linear(ops, x, lin: Linear):
    """(N, in) -> (N, out)."""
    y = ops.matmul(x, lin.w)
    return y if lin.b is None else y + lin.b


class WeightReader:
    """Takes named tensors from a checkpoint, checking each against the shape the config implies,
    and hands them to the backend's ops."""

    def __init__(self, tensors: dict, ops=None):
        self.tensors = tensors
        self.ops = ops

    def linear(self, name: str, out_f: int, in_f: int) -> Linear:
        """`name.weight` (out, in) and, if the checkpoint has one, `name.bias` (out,)."""
        b = self.optional(f"{name}.bias", (out_f,))
        w = self.ops.weight(self(f"{name}.weight", (out_f, in_f)))
        return Linear(w, None if b is None else self.ops.vector(b))

    def lm_head(self, cfg: ModelConfig, embed):
        """The output head (V, D); small models tie it to the embedding."""
        if cfg.tie_word_embeddings:
            return embed
        return self.ops.weight(self("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)))

    def __call__(self, name: str, shape: tuple[int, ...]):
        t = self.tensors.get(name)
        if t is None:
            raise WeightsError(f"checkpoint lacks tensor {name!r}")
        if tuple(t.shape) != tuple(shape):
            raise WeightsError(
                f"tensor {name!r} has shape {tuple(t.shape)} but the config implies {tuple(shape)}"
            )
        return t

    def optional(self, name: str, shape: tuple[int, ...]):
        return self(name, shape) if name in self.tensors else None

    def has(self, name: str) -> bool:
        return name in self.tensors


def as_numpy(x) -> np.ndarray:
    return x.dequantize() if hasattr(x, "dequantize") else np.asarray(x)
