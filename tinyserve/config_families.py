"""Per-family config fields: what Gemma 3, Mixtral, Phi-3 and DeepSeek-V3 add to ModelConfig.

ModelConfig.from_hf / from_gguf read the fields every family shares, then merge in what the
family's extractor here returns (ModelConfig keyword arguments; they override the shared ones).
From config.json an extractor gets the dict; from GGUF it gets `get(key, default)` (reads
`{arch}.{key}`, ConfigError for a missing key without a default), n_layers and the file's GGUF
tensor names (some facts are told by which tensors a file has, not by its metadata). The llama family
(llama, mistral, qwen2, qwen3) has no entry: the shared fields describe it.
"""

from __future__ import annotations

from typing import Any

from .config import FULL, SLIDING, rope_scaling_from_hf
from .errors import ConfigError, UnsupportedArchitecture

# -- from config.json ------------------------------------------------------------------------


def _gemma3_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
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


def _mixtral_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    return {
        "hidden_act": hf.get("hidden_act", "silu"),
        "n_experts": int(hf["num_local_experts"]),
        "n_experts_per_tok": int(hf["num_experts_per_tok"]),
        "moe_intermediate_size": int(hf["intermediate_size"]),
    }


def _phi3_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
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


def _deepseek_v3_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    dn, dr = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
    q_lora = hf.get("q_lora_rank")
    return {
        "n_kv_heads": int(hf["num_attention_heads"]),  # MLA: every head has its own k/v
        "head_dim": dn + dr,
        "hidden_act": hf.get("hidden_act", "silu"),
        "q_lora_rank": None if q_lora is None else int(q_lora),
        "kv_lora_rank": int(hf["kv_lora_rank"]),
        "qk_nope_head_dim": dn,
        "qk_rope_head_dim": dr,
        "v_head_dim": int(hf["v_head_dim"]),
        "rope_interleave": bool(hf.get("rope_interleave", True)),
        "n_experts": int(hf.get("n_routed_experts") or 0),
        "n_experts_per_tok": int(hf.get("num_experts_per_tok") or 0),
        "moe_intermediate_size": int(hf.get("moe_intermediate_size") or 0),
        "n_shared_experts": int(hf.get("n_shared_experts") or 0),
        "first_k_dense_replace": int(hf.get("first_k_dense_replace") or 0),
        "scoring_func": hf.get("scoring_func", "sigmoid"),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
        "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
        "n_group": int(hf.get("n_group") or 1),
        "topk_group": int(hf.get("topk_group") or 1),
    }


FAMILY_FROM_HF = {
    "gemma3": _gemma3_from_hf,
    "mixtral": _mixtral_from_hf,
    "phi3": _phi3_from_hf,
    "deepseek_v3": _deepseek_v3_from_hf,
}


# -- from GGUF metadata ----------------------------------------------------------------------


def _gemma3_from_gguf(get, n_layers: int, tensor_names: set[str]) -> dict[str, Any]:
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
    scalar = float(head_dim) if not scale else _round_near(float(scale) ** -2)
    return {
        "hidden_act": "gelu_pytorch_tanh",
        "layer_types": tuple(types),
        "rope_local_theta": float(get("rope.freq_base_swa", 10000.0)),
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": float(cap) if cap else None,
    }


def _mixtral_from_gguf(get, n_layers: int, tensor_names: set[str]) -> dict[str, Any]:
    return {
        "n_experts": int(get("expert_count")),
        "n_experts_per_tok": int(get("expert_used_count")),
        "moe_intermediate_size": int(get("feed_forward_length")),
    }


def _phi3_from_gguf(get, n_layers: int, tensor_names: set[str]) -> dict[str, Any]:
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


def _deepseek_v3_from_gguf(get, n_layers: int, tensor_names: set[str]) -> dict[str, Any]:
    dr = int(get("rope.dimension_count"))
    dk = int(get("attention.key_length_mla", 0) or get("attention.key_length"))
    dv = int(get("attention.value_length_mla", 0) or get("attention.value_length"))
    q_lora = int(get("attention.q_lora_rank", 0))
    n_heads = int(get("attention.head_count"))
    kw = {
        "n_kv_heads": n_heads,
        "head_dim": dk,
        "q_lora_rank": q_lora or None,
        "kv_lora_rank": int(get("attention.kv_lora_rank")),
        "qk_nope_head_dim": dk - dr,
        "qk_rope_head_dim": dr,
        "v_head_dim": dv,
        "rope_interleave": True,
        "n_experts": int(get("expert_count", 0)),
        "n_experts_per_tok": int(get("expert_used_count", 0)),
        "moe_intermediate_size": int(get("expert_feed_forward_length", 0)),
        "n_shared_experts": int(get("expert_shared_count", 0)),
        "first_k_dense_replace": int(get("leading_dense_block_count", 0)),
        "scoring_func": _gating_func(int(get("expert_gating_func", 0))),
        "norm_topk_prob": bool(get("expert_weights_norm", False)),
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
        "n_group": int(get("expert_group_count", 1)),
        "topk_group": int(get("expert_group_used_count", 1)),
    }
    stype = get("rope.scaling.type", "none")
    if stype == "yarn":
        # convert stores 0.1 * mscale_all_dim as yarn_log_multiplier (deepseek2's legacy
        # convention) and no mscale: DeepSeek-V3 / Kimi-K2 configs have mscale = 1
        rs = {
            "rope_type": "yarn",
            "factor": float(get("rope.scaling.factor")),
            "original_max_position_embeddings": int(get("rope.scaling.original_context_length")),
            "mscale": 1.0,
            "mscale_all_dim": _round_near(float(get("rope.scaling.yarn_log_multiplier", 0.1)) * 10),
        }
        for key in ("beta_fast", "beta_slow"):
            value = get(f"rope.scaling.yarn_{key}", 0.0)
            if value:
                rs[key] = float(value)
        kw["rope_scaling"] = rs
    return kw


def _gating_func(value: int) -> str:
    """llama.cpp's expert_gating_func id -> scoring_func; absent (0) means softmax (DeepSeek-V2)."""
    names = {0: "softmax", 1: "softmax", 2: "sigmoid"}
    if value not in names:
        raise ConfigError(f"expert_gating_func {value} is not supported (1 softmax, 2 sigmoid)")
    return names[value]


def _round_near(x: float) -> float:
    """x with the float32 noise of a GGUF metadata value removed (7 significant digits)."""
    return float(f"{x:.7g}")


FAMILY_FROM_GGUF = {
    "gemma3": _gemma3_from_gguf,
    "mixtral": _mixtral_from_gguf,
    "phi3": _phi3_from_gguf,
    "deepseek_v3": _deepseek_v3_from_gguf,
}
