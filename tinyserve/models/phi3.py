"""Phi-3 / Phi-4-mini: Abdin et al. 2024, "Phi-3 Technical Report"; Microsoft 2025, "Phi-4-Mini".

The Llama decoder with fused projections (one qkv matrix, one gate_up matrix), optionally partial
rotary (Phi-4-mini rotates 3/4 of each head), and LongRoPE (Ding et al. 2024): per-frequency
rescaling factors, the short set while a sequence fits the pre-training context and the long set
once it is longer, with cos/sin scaled by sqrt(1 + ln(factor) / ln(original context)).
Like transformers, the switch is made per forward from the sequence's length: keys already cached
keep the rotation they were written with. So under LongRoPE a cached prefix block is only valid for
sequences on the same side of the switch: the model says so with `prefix_cacheable = False`.
Reference: transformers' modeling_phi3.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..step import StepMeta
from . import Linear, WeightReader, linear
from .family import GGUF_BLOCK, GGUF_GLOBAL, Family, rope_scaling_from_hf
from .rope import longrope_inv_freq, longrope_original_len, rope_attention_factor, rope_inv_freq
from .spec import GQA, Decoder, DecoderLayer, GatedMLP, Rope


@dataclass(slots=True)
class LayerWeights:
    attn_norm: Any  # (D,)
    qkv: Linear  # (H*Dh + 2*KVH*Dh, D): q, k, v stacked by rows
    o: Linear  # (D, H*Dh)
    ffn_norm: Any  # (D,)
    gate_up: Linear  # (2F, D): gate rows, then up rows
    down: Linear  # (D, F)


class Phi3Model:
    """Phi-3 decoder over a backend's ops. forward: StepMeta -> logits (R, V)."""

    def __init__(self, cfg: ModelConfig, tensors: dict, ops):
        self.cfg, self.ops = cfg, ops
        D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        take = WeightReader(tensors, ops)

        self.embed = ops.weight(take("model.embed_tokens.weight", (V, D)))
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}"
            self.layers.append(
                LayerWeights(
                    attn_norm=ops.vector(take(f"{p}.input_layernorm.weight", (D,))),
                    qkv=take.linear(f"{p}.self_attn.qkv_proj", cfg.q_size + 2 * cfg.kv_size, D),
                    o=take.linear(f"{p}.self_attn.o_proj", D, cfg.q_size),
                    ffn_norm=ops.vector(take(f"{p}.post_attention_layernorm.weight", (D,))),
                    gate_up=take.linear(f"{p}.mlp.gate_up_proj", 2 * F, D),
                    down=take.linear(f"{p}.mlp.down_proj", D, F),
                )
            )
        self.norm = ops.vector(take("model.norm.weight", (D,)))
        self.lm_head = take.lm_head(cfg, self.embed)

        R = cfg.rotary_dim
        self.longrope = bool(cfg.rope_scaling) and cfg.rope_scaling["rope_type"] == "longrope"
        if self.longrope:  # GGUF files carry the factors as tensors, HF configs as lists
            short, long = tensors.get("rope_factors_short"), tensors.get("rope_factors_long")
            self.inv_freq = ops.vector(
                longrope_inv_freq(cfg, long=False, rotary_dim=R, factors=short)
            )
            self.inv_freq_long = ops.vector(
                longrope_inv_freq(cfg, long=True, rotary_dim=R, factors=long)
            )
            self.original_len = longrope_original_len(cfg)
        else:
            self.inv_freq = ops.vector(rope_inv_freq(cfg, rotary_dim=R))  # (R/2,)
        self.rope_scale = rope_attention_factor(cfg)  # multiplies the rotated dims of q and k
        # a block's keys depend on its sequence's length (short or long factors), not only its tokens
        self.prefix_cacheable = not self.longrope
        self.scale = cfg.head_dim**-0.5

    def kv_layout(self) -> list[dict[str, tuple[int, ...]]]:
        """Per layer, what the paged cache stores per token."""
        shape = (self.cfg.n_kv_heads, self.cfg.head_dim)
        return [{"k": shape, "v": shape} for _ in range(self.cfg.n_layers)]

    def _long_rows(self, step: StepMeta) -> np.ndarray | None:
        """(n,) flat indices of tokens whose sequence has outgrown the pre-training context."""
        if not self.longrope:
            return None
        return np.flatnonzero(step.seq_len_of_tokens() > self.original_len)

    def _rope(self, x, positions, long_rows):
        """(N, h, Dh) -> (N, h, Dh): the first R dims rotated, short or long LongRoPE per token."""
        ops = self.ops
        y = ops.rope(x, positions, self.inv_freq)
        if long_rows is not None and len(long_rows):
            rows = ops.from_numpy(long_rows)
            y[rows] = ops.rope(x[rows], positions[rows], self.inv_freq_long)
        if self.rope_scale != 1.0:  # LongRoPE scales cos and sin: only the rotated dims grow
            y[..., : self.cfg.rotary_dim] *= self.rope_scale
        return y

    def attention(self, x, w: LayerWeights, step: StepMeta, kv: dict, positions, long_rows):
        """(N, D) -> (N, D): GQA from one fused qkv projection."""
        cfg, ops = self.cfg, self.ops
        N = x.shape[0]
        qkv = linear(self.ops, x, w.qkv)  # (N, (H + 2 KVH) Dh)
        q = qkv[:, : cfg.q_size].reshape(N, cfg.n_heads, cfg.head_dim)  # (N, H, Dh)
        k = qkv[:, cfg.q_size : cfg.q_size + cfg.kv_size].reshape(N, cfg.n_kv_heads, cfg.head_dim)
        v = qkv[:, cfg.q_size + cfg.kv_size :].reshape(N, cfg.n_kv_heads, cfg.head_dim)
        q = self._rope(q, positions, long_rows)
        k = self._rope(k, positions, long_rows)
        ops.write_kv(kv["k"], k, step.slots)
        ops.write_kv(kv["v"], v, step.slots)
        a = ops.paged_attention(
            q, kv["k"], kv["v"], step, self.scale, cfg.sliding_window
        )  # (N, H, Dh)
        return linear(self.ops, a.reshape(N, cfg.q_size), w.o)  # (N, D)

    def feed_forward(self, x, w: LayerWeights):
        """(N, D) -> (N, D): SwiGLU from one fused gate_up projection."""
        F = self.cfg.intermediate_size
        gate_up = linear(self.ops, x, w.gate_up)  # (N, 2F)
        return linear(self.ops, self.ops.silu_mul(gate_up[:, :F], gate_up[:, F:]), w.down)

    def lowering_spec(self) -> Decoder:
        """This decoder as a backend's fast path may run it (tinyserve/models/spec.py)."""
        cfg = self.cfg
        if self.longrope:
            rope = Rope(self.inv_freq, self.rope_scale, self.inv_freq_long, self.original_len)
        else:
            rope = Rope(self.inv_freq, self.rope_scale)
        layers = tuple(
            DecoderLayer(
                attn_norm=w.attn_norm,
                attn=GQA((w.qkv,), w.o, None, None, rope, cfg.sliding_window, self.scale),
                post_attn_norm=None,
                ffn_norm=w.ffn_norm,
                ffn=GatedMLP((w.gate_up,), w.down, "silu"),
                post_ffn_norm=None,
            )
            for w in self.layers
        )
        return Decoder.of(self, layers)

    def forward(self, step: StepMeta, kv: list[dict]):
        """A step of N tokens -> logits (R, V) for its logits_rows."""
        ops, eps = self.ops, self.cfg.norm_eps
        positions = ops.from_numpy(step.positions)
        long_rows = self._long_rows(step)
        x = ops.embedding(ops.from_numpy(step.token_ids), self.embed)  # (N, D)
        for w, layer_kv in zip(self.layers, kv):
            x = x + self.attention(
                ops.rms_norm(x, w.attn_norm, eps), w, step, layer_kv, positions, long_rows
            )
            x = x + self.feed_forward(ops.rms_norm(x, w.ffn_norm, eps), w)
        x = x[ops.from_numpy(step.logits_rows)]  # (R, D): only the rows we sample from
        return ops.matmul(ops.rms_norm(x, self.norm, eps), self.lm_head)  # (R, V)


# -- the family: what checkpoints say about it -----------------------------------------------


def _config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    rp = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if rp.get("rope_type", rp.get("type")) in ("su", "yarn"):  # Phi-3's old names for LongRoPE
        rp["rope_type"] = "longrope"
    if "original_max_position_embeddings" in hf:
        rp.setdefault("original_max_position_embeddings", hf["original_max_position_embeddings"])
    factor = hf.get("partial_rotary_factor") or rp.get("partial_rotary_factor") or 1.0
    return {
        "hidden_act": hf.get("hidden_act", "silu"),
        "rope_scaling": rope_scaling_from_hf(rp),
        "partial_rotary_factor": float(factor),
    }


def _config_from_gguf(get, n_layers: int, tensor_names: set[str]) -> dict[str, Any]:
    head_dim = int(get("embedding_length")) // int(get("attention.head_count"))
    rot = int(get("rope.dimension_count", head_dim))
    orig = int(get("rope.scaling.original_context_length", 0))
    # convert writes no rope.scaling.type for Phi-3, and the original context for every Phi-3
    # (Phi-3-mini-4k too, whose rope is plain): the LongRoPE factors, stored as the tensors
    # rope_factors_long/short (the model reads them there), are what mark LongRoPE
    scaling = None
    if orig and {"rope_factors_long.weight", "rope_factors_short.weight"} <= tensor_names:
        scaling = {"rope_type": "longrope", "original_max_position_embeddings": orig}
        attn_factor = get("rope.scaling.attn_factor", 0.0)
        if attn_factor:  # sqrt(1 + ln(scale) / ln(orig)), as convert computed it
            scaling["attention_factor"] = float(attn_factor)
    return {"head_dim": head_dim, "partial_rotary_factor": rot / head_dim, "rope_scaling": scaling}


FAMILY = Family(
    name="phi3",
    model=Phi3Model,
    model_types=("phi3",),
    gguf_archs={"phi3": "phi3"},
    config_from_hf=_config_from_hf,
    config_from_gguf=_config_from_gguf,
    gguf_global_names={
        **GGUF_GLOBAL,
        "rope_factors_long.weight": "rope_factors_long",
        "rope_factors_short.weight": "rope_factors_short",
    },
    gguf_block_names={
        **GGUF_BLOCK,
        "attn_qkv": "self_attn.qkv_proj",
        "ffn_up": "mlp.gate_up_proj",  # llama.cpp keeps Phi-3's fused gate/up under ffn_up
    },
)
