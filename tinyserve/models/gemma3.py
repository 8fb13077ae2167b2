"""Gemma 3 (text): Gemma Team 2025, "Gemma 3 Technical Report".

A pre-norm decoder like Llama with Gemma's changes: embeddings scaled by sqrt(D); RMSNorm gains
stored as w and applied as (1 + w); four norms per layer (before and after attention, before and
after the feed-forward); q/k RMSNorm per head; softmax scale 1/sqrt(query_pre_attn_scalar);
local sliding-window layers interleaved with global ones (five to one in the released models),
each kind with its own rope base (rope scaling on the global ones only); a GELU-tanh gated MLP;
optional final logit soft-capping. Reference: transformers' modeling_gemma3.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import FULL, SLIDING, ModelConfig
from ..errors import ConfigError, UnsupportedArchitecture
from ..step import StepMeta
from . import Linear, WeightReader, as_numpy, linear
from .family import GGUF_BLOCK, Family, rope_scaling_from_hf, round_near
from .rope import default_inv_freq, rope_inv_freq
from .spec import GQA, Decoder, DecoderLayer, GatedMLP, Rope


@dataclass(slots=True)
class LayerWeights:
    input_norm: Any  # (D,) as 1 + w
    q: Linear  # (H*Dh, D)
    k: Linear  # (KVH*Dh, D)
    v: Linear  # (KVH*Dh, D)
    o: Linear  # (D, H*Dh)
    q_norm: Any  # (Dh,) as 1 + w
    k_norm: Any  # (Dh,) as 1 + w
    post_attn_norm: Any  # (D,)
    pre_ffn_norm: Any  # (D,)
    post_ffn_norm: Any  # (D,)
    gate: Linear  # (F, D)
    up: Linear  # (F, D)
    down: Linear  # (D, F)
    sliding: bool  # local layer: attends to the last sliding_window tokens only


class Gemma3Model:
    """Gemma 3 text decoder over a backend's ops. forward: StepMeta -> logits (R, V)."""

    def __init__(self, cfg: ModelConfig, tensors: dict, ops):
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"Gemma 3 with activation {cfg.hidden_act!r} is not supported")
        self.cfg, self.ops = cfg, ops
        D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        take = WeightReader(tensors, ops)

        def norm(name: str, size: int):
            # Gemma stores the gain as an offset from 1; add it once here, in float32 as HF does
            return ops.vector(as_numpy(take(name, (size,))).astype(np.float32) + np.float32(1.0))

        self.embed = ops.weight(take("model.embed_tokens.weight", (V, D)))
        # HF multiplies by sqrt(D) cast to the weights' dtype (float32 here)
        self.embed_scale = float(np.float32(math.sqrt(D)))
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}"
            self.layers.append(
                LayerWeights(
                    input_norm=norm(f"{p}.input_layernorm.weight", D),
                    q=take.linear(f"{p}.self_attn.q_proj", cfg.q_size, D),
                    k=take.linear(f"{p}.self_attn.k_proj", cfg.kv_size, D),
                    v=take.linear(f"{p}.self_attn.v_proj", cfg.kv_size, D),
                    o=take.linear(f"{p}.self_attn.o_proj", D, cfg.q_size),
                    q_norm=norm(f"{p}.self_attn.q_norm.weight", cfg.head_dim),
                    k_norm=norm(f"{p}.self_attn.k_norm.weight", cfg.head_dim),
                    post_attn_norm=norm(f"{p}.post_attention_layernorm.weight", D),
                    pre_ffn_norm=norm(f"{p}.pre_feedforward_layernorm.weight", D),
                    post_ffn_norm=norm(f"{p}.post_feedforward_layernorm.weight", D),
                    gate=take.linear(f"{p}.mlp.gate_proj", F, D),
                    up=take.linear(f"{p}.mlp.up_proj", F, D),
                    down=take.linear(f"{p}.mlp.down_proj", D, F),
                    sliding=cfg.is_sliding(i),
                )
            )
        self.norm = norm("model.norm.weight", D)
        self.lm_head = take.lm_head(cfg, self.embed)
        # global layers: rope_theta with the configured scaling; local layers: their own base, unscaled
        self.inv_freq_global = ops.vector(rope_inv_freq(cfg))  # (Dh/2,)
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        self.inv_freq_local = ops.vector(default_inv_freq(local_theta, cfg.head_dim))  # (Dh/2,)
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5

    def kv_layout(self) -> list[dict[str, tuple[int, ...]]]:
        """Per layer, what the paged cache stores per token."""
        shape = (self.cfg.n_kv_heads, self.cfg.head_dim)
        return [{"k": shape, "v": shape} for _ in range(self.cfg.n_layers)]

    def attention(self, x, w: LayerWeights, step: StepMeta, kv: dict, positions):
        """(N, D) -> (N, D): GQA with per-head q/k norms, local or global by layer."""
        cfg, ops = self.cfg, self.ops
        N = x.shape[0]
        q = linear(self.ops, x, w.q).reshape(N, cfg.n_heads, cfg.head_dim)  # (N, H, Dh)
        k = linear(self.ops, x, w.k).reshape(N, cfg.n_kv_heads, cfg.head_dim)  # (N, KVH, Dh)
        v = linear(self.ops, x, w.v).reshape(N, cfg.n_kv_heads, cfg.head_dim)  # (N, KVH, Dh)
        q = ops.rms_norm(q, w.q_norm, cfg.norm_eps)
        k = ops.rms_norm(k, w.k_norm, cfg.norm_eps)
        inv_freq = self.inv_freq_local if w.sliding else self.inv_freq_global
        q = ops.rope(q, positions, inv_freq)
        k = ops.rope(k, positions, inv_freq)
        ops.write_kv(kv["k"], k, step.slots)
        ops.write_kv(kv["v"], v, step.slots)
        window = cfg.sliding_window if w.sliding else None
        a = ops.paged_attention(q, kv["k"], kv["v"], step, self.scale, window)  # (N, H, Dh)
        return linear(self.ops, a.reshape(N, cfg.q_size), w.o)  # (N, D)

    def feed_forward(self, x, w: LayerWeights):
        """(N, D) -> (N, D): GELU-tanh gated MLP (GeGLU)."""
        h = self.ops.gelu_tanh_mul(linear(self.ops, x, w.gate), linear(self.ops, x, w.up))  # (N, F)
        return linear(self.ops, h, w.down)

    def lowering_spec(self) -> Decoder:
        """This decoder as a backend's fast path may run it (tinyserve/models/spec.py)."""
        cfg = self.cfg
        local, full = Rope(self.inv_freq_local), Rope(self.inv_freq_global)
        layers = tuple(
            DecoderLayer(
                attn_norm=w.input_norm,
                attn=GQA(
                    (w.q, w.k, w.v),
                    w.o,
                    w.q_norm,
                    w.k_norm,
                    local if w.sliding else full,
                    cfg.sliding_window if w.sliding else None,
                    self.scale,
                ),
                post_attn_norm=w.post_attn_norm,
                ffn_norm=w.pre_ffn_norm,
                ffn=GatedMLP((w.gate, w.up), w.down, "gelu_tanh"),
                post_ffn_norm=w.post_ffn_norm,
            )
            for w in self.layers
        )
        return Decoder.of(self, layers, self.embed_scale, cfg.final_logit_softcapping)

    def forward(self, step: StepMeta, kv: list[dict]):
        """A step of N tokens -> logits (R, V) for its logits_rows."""
        ops, eps = self.ops, self.cfg.norm_eps
        positions = ops.from_numpy(step.positions)
        x = ops.embedding(ops.from_numpy(step.token_ids), self.embed) * self.embed_scale  # (N, D)
        for w, layer_kv in zip(self.layers, kv):
            h = self.attention(ops.rms_norm(x, w.input_norm, eps), w, step, layer_kv, positions)
            x = x + ops.rms_norm(
                h, w.post_attn_norm, eps
            )  # Gemma also norms each sublayer's output
            h = self.feed_forward(ops.rms_norm(x, w.pre_ffn_norm, eps), w)
            x = x + ops.rms_norm(h, w.post_ffn_norm, eps)
        x = x[ops.from_numpy(step.logits_rows)]  # (R, D): only the rows we sample from
        logits = ops.matmul(ops.rms_norm(x, self.norm, eps), self.lm_head)  # (R, V)
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else ops.softcap(logits, cap)  # cap * tanh(logits / cap)


# -- the family: what checkpoints say about it -----------------------------------------------


def _config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if "text_config" in hf:
        raise UnsupportedArchitecture(
            "Gemma 3 multimodal checkpoints (Gemma3ForConditionalGeneration) are not supported; "
            "use a text-only (gemma3_text) checkpoint or GGUF"
        )
    if hf.get("attn_logit_softcapping") is not None or hf.get("use_bidirectional_attention"):
        raise ConfigError(
            "Gemma 3 attention logit soft-capping / bidirectional attention is not supported"
        )
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types")
    if not types:  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = int(hf.get("sliding_window_pattern") or 6)
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    rp = hf.get("rope_parameters") or {}
    if isinstance(rp.get(FULL), dict):  # transformers >= 5: one rope dict per layer type
        theta = rp[FULL].get("rope_theta", 1e6)
        local_theta = (rp.get(SLIDING) or {}).get("rope_theta", 1e4)
        scaling = rope_scaling_from_hf(rp[FULL])
    else:  # 4.x: rope_theta / rope_scaling for global layers, rope_local_base_freq for local ones
        theta = hf.get("rope_theta") or 1e6
        local_theta = hf.get("rope_local_base_freq") or 1e4
        scaling = rope_scaling_from_hf(hf.get("rope_scaling"))
    cap = hf.get("final_logit_softcapping")
    return {
        "head_dim": int(hf.get("head_dim") or 256),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "hidden_act": hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        "layer_types": tuple(types),
        "rope_theta": float(theta),
        "rope_local_theta": float(local_theta),
        "rope_scaling": scaling,
        "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar") or 256),
        "final_logit_softcapping": None if cap is None else float(cap),
    }


def _config_from_gguf(get, n_layers: int, tensor_names: set[str]) -> dict[str, Any]:
    # llama.cpp: every 6th layer global, local rope base 10000, q scaled by 1/sqrt(head_dim)
    pattern = get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # newer files: one flag per layer, True = sliding
        types = [SLIDING if p else FULL for p in pattern]
    else:
        types = [SLIDING if (i + 1) % int(pattern) else FULL for i in range(n_layers)]
    head_dim = int(get("attention.key_length"))
    cap = get("final_logit_softcapping", 0.0)
    # llama.cpp's Gemma 3 graph scales q by 1/sqrt(head_dim); a file may say otherwise with
    # attention.scale (= query_pre_attn_scalar^-1/2, written where the two differ)
    scale = get("attention.scale", 0.0)
    scalar = float(head_dim) if not scale else round_near(float(scale) ** -2)
    return {
        "hidden_act": "gelu_pytorch_tanh",
        "layer_types": tuple(types),
        "rope_local_theta": float(get("rope.freq_base_swa", 10000.0)),
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": float(cap) if cap else None,
    }


FAMILY = Family(
    name="gemma3",
    model=Gemma3Model,
    model_types=("gemma3", "gemma3_text"),
    gguf_archs={"gemma3": "gemma3"},
    config_from_hf=_config_from_hf,
    config_from_gguf=_config_from_gguf,
    gguf_block_names={  # four norms per layer
        **GGUF_BLOCK,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    gguf_norms_plus_one=True,  # llama.cpp stores Gemma's norm gains as 1 + w
)
