"""Rotary position embedding frequencies, with the rope_scaling variants checkpoints declare.

RoFormer (Su et al. 2021); Llama 3.1's frequency-dependent scaling follows transformers'
`_compute_llama3_parameters`; YaRN (Peng et al. 2023) its `_compute_yarn_parameters`; LongRoPE
(Ding et al. 2024, Phi-3) its `_compute_longrope_parameters`. The rope op rotates halves (NeoX
layout); checkpoints that rotate interleaved pairs (DeepSeek) get their rows reordered at load.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError


def rope_inv_freq(cfg: ModelConfig, rotary_dim: int | None = None, freq_factors=None) -> np.ndarray:
    """-> (R/2,) float32 inverse frequencies theta^(-2i/R), scaled as the config says.

    LongRoPE configs get their short factors here; see longrope_inv_freq for the long ones."""
    dim = rotary_dim or cfg.head_dim
    inv_freq = default_inv_freq(cfg.rope_theta, dim)  # (R/2,)
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
    if kind == "yarn":
        return _yarn(cfg, dim, rs)
    if kind == "longrope":
        return longrope_inv_freq(cfg, long=False, rotary_dim=dim)
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


def default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """-> (dim/2,) float32 theta^(-2i/dim), computed in float32 as transformers does."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """How much YaRN / LongRoPE scale cos and sin (so q.k of the rotated dims by its square)."""
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type")
    if rs.get("attention_factor") is not None and kind in ("yarn", "longrope"):
        return float(rs["attention_factor"])
    if kind == "yarn":
        factor = _yarn_factor(cfg, rs)
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        return yarn_mscale(factor)
    if kind == "longrope":
        factor = rs.get("factor") or cfg.max_position_embeddings / _original_len(rs)
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(_original_len(rs)))
    return 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 for scale > 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_mscale(cfg: ModelConfig) -> float:
    """DeepSeek multiplies its softmax scale by mscale(factor, mscale_all_dim)^2 under YaRN."""
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type") != "yarn" or not rs.get("mscale_all_dim"):
        return 1.0
    return yarn_mscale(_yarn_factor(cfg, rs), rs["mscale_all_dim"]) ** 2


def longrope_inv_freq(cfg: ModelConfig, long: bool, rotary_dim: int | None = None, factors=None):
    """-> (R/2,) LongRoPE: theta^(-2i/R) divided by the long or short per-frequency factors."""
    dim = rotary_dim or cfg.rotary_dim
    rs = cfg.rope_scaling or {}
    if factors is None:
        key = "long_factor" if long else "short_factor"
        if key not in rs:
            raise ConfigError(f"longrope rope_scaling lacks {key}")
        factors = rs[key]
    ext = np.asarray(factors, dtype=np.float32).reshape(-1)  # (R/2,)
    if ext.shape[0] != dim // 2:
        raise ConfigError(
            f"longrope factors have {ext.shape[0]} entries, rotary dim {dim} needs {dim // 2}"
        )
    base = cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    return (1.0 / (ext * base)).astype(np.float32)


def longrope_original_len(cfg: ModelConfig) -> int:
    """The pre-training context: LongRoPE switches to the long factors past it."""
    return _original_len(cfg.rope_scaling or {})


def interleaved_to_halves(dim: int) -> np.ndarray:
    """(dim,) p: rows x[p] turn pairs (x0, x1), (x2, x3), ... into halves (x0, x2, ... | x1, x3, ...).

    Rotating pair i of x by angle_i equals rotating halves of x[p], and q.k is unchanged when q and k
    are reordered alike, so interleaved checkpoints run on the half-rotating op."""
    return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def _original_len(rs: dict) -> int:
    if not rs.get("original_max_position_embeddings"):
        raise ConfigError(
            f"{rs.get('rope_type')} rope_scaling lacks original_max_position_embeddings"
        )
    return int(rs["original_max_position_embeddings"])


def _yarn_factor(cfg: ModelConfig, rs: dict) -> float:
    if rs.get("factor") is None:
        return cfg.max_position_embeddings / _original_len(rs)
    return float(rs["factor"])


def _yarn(cfg: ModelConfig, dim: int, rs: dict) -> np.ndarray:
    """YaRN: high frequencies kept, low ones interpolated by `factor`, a linear ramp between."""
    base, factor, old_len = cfg.rope_theta, _yarn_factor(cfg, rs), _original_len(rs)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(n_rotations: float) -> float:  # dim index that turns n times in old_len
        return dim * math.log(old_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)  # (R/2,)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolate = (1 - ramp).astype(np.float32)  # 1 where a frequency is kept as is
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq.astype(np.float32)
