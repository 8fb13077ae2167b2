"""The Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3.

A pre-norm decoder: RMSNorm -> grouped-query attention with rotary positions -> residual,
RMSNorm -> SwiGLU feed-forward -> residual. References: Touvron et al. 2023 (Llama), Ainslie et al.
2023 (GQA), Jiang et al. 2023 (Mistral's sliding window), Qwen2/Qwen3 technical reports (q/k/v bias,
q/k RMSNorm). Variants differ only in which optional weights exist, so one file serves them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig
from ..step import StepMeta
from . import Linear, WeightReader, linear
from .family import Family
from .rope import rope_inv_freq
from .spec import GQA, Decoder, DecoderLayer, GatedMLP, Rope


@dataclass(slots=True)
class LayerWeights:
    attn_norm: Any  # (D,)
    q: Linear  # (H*Dh, D)
    k: Linear  # (KVH*Dh, D)
    v: Linear  # (KVH*Dh, D)
    o: Linear  # (D, H*Dh)
    q_norm: Any  # (Dh,) or None (Qwen3)
    k_norm: Any  # (Dh,) or None
    ffn_norm: Any  # (D,)
    gate: Linear  # (F, D)
    up: Linear  # (F, D)
    down: Linear  # (D, F)


class LlamaModel:
    """Llama-family decoder over a backend's ops. forward: StepMeta -> logits (R, V)."""

    def __init__(self, cfg: ModelConfig, tensors: dict, ops):
        self.cfg, self.ops = cfg, ops
        D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        take = WeightReader(tensors, ops)

        def norm(name: str, size: int):
            t = take.optional(name, (size,))
            return None if t is None else ops.vector(t)

        self.embed = ops.weight(take("model.embed_tokens.weight", (V, D)))
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}"
            self.layers.append(
                LayerWeights(
                    attn_norm=ops.vector(take(f"{p}.input_layernorm.weight", (D,))),
                    q=take.linear(f"{p}.self_attn.q_proj", cfg.q_size, D),
                    k=take.linear(f"{p}.self_attn.k_proj", cfg.kv_size, D),
                    v=take.linear(f"{p}.self_attn.v_proj", cfg.kv_size, D),
                    o=take.linear(f"{p}.self_attn.o_proj", D, cfg.q_size),
                    q_norm=norm(f"{p}.self_attn.q_norm.weight", cfg.head_dim),
                    k_norm=norm(f"{p}.self_attn.k_norm.weight", cfg.head_dim),
                    ffn_norm=ops.vector(take(f"{p}.post_attention_layernorm.weight", (D,))),
                    gate=take.linear(f"{p}.mlp.gate_proj", F, D),
                    up=take.linear(f"{p}.mlp.up_proj", F, D),
                    down=take.linear(f"{p}.mlp.down_proj", D, F),
                )
            )
        self.norm = ops.vector(take("model.norm.weight", (D,)))
        # SmolLM2 and small Qwens tie the output head to the embedding
        self.lm_head = take.lm_head(cfg, self.embed)
        freq_factors = tensors.get("rope_freqs")
        self.inv_freq = ops.vector(rope_inv_freq(cfg, freq_factors=freq_factors))  # (Dh/2,)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def kv_layout(self) -> list[dict[str, tuple[int, ...]]]:
        """Per layer, what the paged cache stores per token."""
        shape = (self.cfg.n_kv_heads, self.cfg.head_dim)
        return [{"k": shape, "v": shape} for _ in range(self.cfg.n_layers)]

    def attention(self, x, w: LayerWeights, step: StepMeta, kv: dict, positions):
        """(N, D) -> (N, D): grouped-query attention over the paged cache."""
        cfg, ops = self.cfg, self.ops
        N = x.shape[0]
        q = linear(self.ops, x, w.q).reshape(N, cfg.n_heads, cfg.head_dim)  # (N, H, Dh)
        k = linear(self.ops, x, w.k).reshape(N, cfg.n_kv_heads, cfg.head_dim)  # (N, KVH, Dh)
        v = linear(self.ops, x, w.v).reshape(N, cfg.n_kv_heads, cfg.head_dim)  # (N, KVH, Dh)
        if w.q_norm is not None:  # Qwen3 normalizes each head before rotating it
            q = ops.rms_norm(q, w.q_norm, cfg.norm_eps)
            k = ops.rms_norm(k, w.k_norm, cfg.norm_eps)
        q = ops.rope(q, positions, self.inv_freq)
        k = ops.rope(k, positions, self.inv_freq)
        ops.write_kv(kv["k"], k, step.slots)
        ops.write_kv(kv["v"], v, step.slots)
        a = ops.paged_attention(
            q, kv["k"], kv["v"], step, self.scale, cfg.sliding_window
        )  # (N, H, Dh)
        return linear(self.ops, a.reshape(N, cfg.q_size), w.o)  # (N, D)

    def feed_forward(self, x, w: LayerWeights):
        """(N, D) -> (N, D): SwiGLU."""
        return linear(
            self.ops,
            self.ops.silu_mul(linear(self.ops, x, w.gate), linear(self.ops, x, w.up)),
            w.down,
        )

    def lowering_spec(self) -> Decoder:
        """This decoder as a backend's fast path may run it (tinyserve/models/spec.py)."""
        cfg, rope = self.cfg, Rope(self.inv_freq)
        layers = tuple(
            DecoderLayer(
                attn_norm=w.attn_norm,
                attn=GQA(
                    (w.q, w.k, w.v), w.o, w.q_norm, w.k_norm, rope, cfg.sliding_window, self.scale
                ),
                post_attn_norm=None,
                ffn_norm=w.ffn_norm,
                ffn=self.ffn_spec(w),
                post_ffn_norm=None,
            )
            for w in self.layers
        )
        return Decoder.of(self, layers)

    def ffn_spec(self, w: LayerWeights):
        return GatedMLP((w.gate, w.up), w.down, "silu")

    def forward(self, step: StepMeta, kv: list[dict]):
        """A step of N tokens -> logits (R, V) for its logits_rows."""
        ops, eps = self.ops, self.cfg.norm_eps
        positions = ops.from_numpy(step.positions)
        x = ops.embedding(ops.from_numpy(step.token_ids), self.embed)  # (N, D)
        for w, layer_kv in zip(self.layers, kv):
            x = x + self.attention(ops.rms_norm(x, w.attn_norm, eps), w, step, layer_kv, positions)
            x = x + self.feed_forward(ops.rms_norm(x, w.ffn_norm, eps), w)
        x = x[ops.from_numpy(step.logits_rows)]  # (R, D): only the rows we sample from
        return ops.matmul(ops.rms_norm(x, self.norm, eps), self.lm_head)  # (R, V)


# -- the family: what checkpoints say about it -----------------------------------------------


def _config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {"qk_norm": hf.get("model_type") == "qwen3"}
    if hf.get("model_type") in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        kw["sliding_window"] = None  # Qwen configs carry a window they do not use
    return kw


def _config_from_gguf(get, n_layers: int, tensor_names: set[str]) -> dict[str, Any]:
    return {"qk_norm": "blk.0.attn_q_norm.weight" in tensor_names}  # Qwen3's per-head q/k norm


FAMILY = Family(
    name="llama",
    model=LlamaModel,
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    gguf_archs={"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"},
    config_from_hf=_config_from_hf,
    config_from_gguf=_config_from_gguf,
    # llama.cpp's rope for these is interleaved ("normal"); NeoX-rope archs (qwen2, qwen3) keep
    # q/k as in the HF checkpoint
    gguf_permuted_qk=frozenset({"llama", "mistral"}),
)
