"""Model families: config.family -> the class that implements it, imported on first use."""

from __future__ import annotations

import importlib

import numpy as np

from ..config import ModelConfig
from ..errors import WeightsError

_FAMILIES = {
    "llama": "tinyserve.models.llama:LlamaModel",
    "gemma3": "tinyserve.models.gemma3:Gemma3Model",
    "mixtral": "tinyserve.models.mixtral:MixtralModel",
    "phi3": "tinyserve.models.phi3:Phi3Model",
    "deepseek_v3": "tinyserve.models.deepseek_v3:DeepseekV3Model",
}


def build_model(cfg: ModelConfig, tensors: dict, ops):
    """The model for cfg with its weights handed to the backend's ops."""
    module, _, name = _FAMILIES[cfg.family].partition(":")
    return getattr(importlib.import_module(module), name)(cfg, tensors, ops)


class WeightReader:
    """Takes named tensors from a checkpoint, checking each against the shape the config implies."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

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
