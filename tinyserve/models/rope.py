"""Rotary position embedding frequencies, with the rope_scaling variants checkpoints declare.

RoFormer (Su et al. 2021); Llama 3.1's frequency-dependent scaling follows transformers'
`_compute_llama3_parameters`.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError


def rope_inv_freq(cfg: ModelConfig, rotary_dim: int | None = None, freq_factors=None) -> np.ndarray:
    """-> (R/2,) float32 inverse frequencies theta^(-2i/R), scaled as the config says."""
    dim = rotary_dim or cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))  # (R/2,)
    if freq_factors is not None:  # llama.cpp GGUFs store llama3 scaling as per-frequency divisors
        return (inv_freq / np.asarray(freq_factors, dtype=np.float32)).astype(np.float32)
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq.astype(np.float32)
    kind = rs["rope_type"]
    if kind == "linear":
        return (inv_freq / float(rs["factor"])).astype(np.float32)
    if kind == "llama3":
        return _llama3(inv_freq, rs).astype(np.float32)
    raise ConfigError(f"rope_scaling type {kind!r} is not supported")


def _llama3(inv_freq: np.ndarray, rs: dict) -> np.ndarray:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor = float(rs["factor"])
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_len = float(rs["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)
