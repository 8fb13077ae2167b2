"""Tiny random checkpoints, one per architecture variant, built in memory (nothing to download)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..loading import Checkpoint, config_from_hf
from .quantize import QK_K, quantize_q4_k

_BASE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "eos_token_id": 1,
    "bos_token_id": 0,
}
_DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "q_lora_rank": 24,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "n_routed_experts": 8,
    "num_experts_per_tok": 3,
    "n_group": 4,
    "topk_group": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "rope_interleave": True,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "mscale": 1.0,
        "mscale_all_dim": 0.8,
        "beta_fast": 32,
        "beta_slow": 1,
    },
}
# name -> (config.json overrides, how the weights are stored). The variants of tests/fixtures/hf.
ARCHITECTURES: dict[str, tuple[dict[str, Any], str]] = {
    "llama": (
        {
            "model_type": "llama",
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
        "float32",
    ),
    "llama_mqa": ({"model_type": "llama", "num_key_value_heads": 1}, "float32"),
    "smollm2": ({"model_type": "llama", "tie_word_embeddings": True}, "float32"),
    "mistral": ({"model_type": "mistral", "sliding_window": 8}, "float32"),
    "qwen2": ({"model_type": "qwen2"}, "float32"),  # q/k/v bias
    "qwen3": ({"model_type": "qwen3", "head_dim": 32}, "float32"),  # q/k norm, Dh != D / H
    "llama_bf16": ({"model_type": "llama"}, "bfloat16"),
    "llama_f16": ({"model_type": "llama"}, "float16"),
    "llama_q4_0": ({"model_type": "llama"}, "Q4_0"),  # GGUF blocks (more below: _q8_0, _q4_k)
    # the newer families, as tests/fixtures/hf has them (tests/make_fixtures.py), vocab 128
    "gemma3": (
        {
            "model_type": "gemma3_text",
            "num_hidden_layers": 3,
            "head_dim": 16,
            "query_pre_attn_scalar": 24,  # != head_dim: the softmax scale comes from this
            "sliding_window": 6,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {  # global: theta 1e6, linear x4; local: theta 1e4, unscaled
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            "final_logit_softcapping": 10.0,
            "hidden_activation": "gelu_pytorch_tanh",
        },
        "float32",
    ),
    "mixtral": (
        {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
        "float32",
    ),
    "phi3": (  # fused qkv / gate_up, partial rotary, LongRoPE switching at 16 tokens
        {
            "model_type": "phi3",
            "partial_rotary_factor": 0.75,
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 16,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": 16,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
            },
            "tie_word_embeddings": True,
        },
        "float32",
    ),
    "deepseek_v3": (_DEEPSEEK_V3, "float32"),  # MLA with q LoRA, YaRN, grouped sigmoid MoE
    "deepseek_v3_qlora": ({**_DEEPSEEK_V3, "q_lora_rank": None}, "float32"),  # q_proj, no LoRA
}


def _longrope(rotary_dim: int) -> dict[str, Any]:
    """Phi-3's LongRoPE parameters for a rotary dim: short and long factors, switching at 16."""
    n = rotary_dim // 2
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 16,
        "short_factor": np.round(np.linspace(1.0, 2.5, n), 3).tolist(),
        "long_factor": np.round(np.geomspace(1.0, 32.0, n), 3).tolist(),
    }


# The quantized variants: every family in Q8_0 and Q4_K (<family>_q8_0, <family>_q4_k). Q4_K's
# super-blocks are 256 wide along a row, so these run at widths where a matrix's row (its input
# features) is whole super-blocks: D 256, F 512, H*Dh 256. A row that is not (DeepSeek's LoRA
# ranks) falls back to Q8_0, as llama.cpp's quantizer falls back to a 32-wide type (there Q5_0
# for Q4_K); norms, biases and routers stay float32 as in llama.cpp's files.
QUANT_TYPES = ("Q8_0", "Q4_K")
QUANT_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "mixtral", "phi3", "deepseek_v3")
_WIDE = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}  # 4 heads, 2 kv heads
_WIDE_FAMILY: dict[str, dict[str, Any]] = {
    "qwen3": {"head_dim": 128},  # Dh != D / H, as in the float32 variant
    "gemma3": {"head_dim": 64},
    "mixtral": {"intermediate_size": 256},  # per expert
    "phi3": {"rope_parameters": _longrope(48)},  # rotary 3/4 of Dh 64
    "deepseek_v3": {
        "num_hidden_layers": 2,  # one dense layer, one MoE layer
        "q_lora_rank": 64,  # q_b and kv_b rows: Q8_0 under Q4_K
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "moe_intermediate_size": 256,
    },
}
for _family in QUANT_FAMILIES:
    for _qtype in QUANT_TYPES:
        ARCHITECTURES[f"{_family}_{_qtype.lower()}"] = (
            {**ARCHITECTURES[_family][0], **_WIDE, **_WIDE_FAMILY.get(_family, {})},
            _qtype,
        )
# MLA without q LoRA (q_proj reads x), quantized: the other way into DeepSeek's attention
ARCHITECTURES["deepseek_v3_qlora_q8_0"] = (
    {**ARCHITECTURES["deepseek_v3_q8_0"][0], "q_lora_rank": None},
    "Q8_0",
)
QUANTIZED_ARCHITECTURES = [name for name, (_, s) in ARCHITECTURES.items() if s.startswith("Q")]

# mixtures of experts: a router's top-k is a discrete choice (see _pinned_routing)
MOE_ARCHITECTURES = tuple(
    name
    for name, (overrides, _) in ARCHITECTURES.items()
    if overrides["model_type"] in ("mixtral", "deepseek_v3")
)

# The quantized variants in the greedy, batching and lowering checks: a subset, to keep the kit's
# run time modest (each check runs on every backend): every family once in Q4_K, a few in Q8_0.
GREEDY_ARCHITECTURES = [
    "llama",
    "mistral",
    "qwen3",
    "gemma3",
    "phi3",
    "deepseek_v3",
    *(f"{family}_q4_k" for family in QUANT_FAMILIES),
    "llama_q8_0",
]
# batched == alone, paged == contiguous and chunked == whole: every family, float32 and quantized
BATCH_ARCHITECTURES = [
    "llama_q4_k",
    "qwen2",  # q/k/v biases
    "qwen3_q8_0",
    "mistral",  # sliding window: attention must mask by position
    "gemma3_q4_k",
    "mixtral_q8_0",
    "phi3",  # LongRoPE
    "deepseek_v3_q4_k",
]
# the fused lowering == op by op: every family in Q4_K, and Q8_0 where llama.cpp files mostly are
LOWERING_ARCHITECTURES = [
    *(f"{family}_q4_k" for family in QUANT_FAMILIES),
    "llama_q8_0",
    "mixtral_q8_0",
    "deepseek_v3_qlora_q8_0",
]


def tiny_checkpoint(arch: str = "llama", seed: int = 0) -> Checkpoint:
    """A random checkpoint of the named variant (see ARCHITECTURES), built in memory."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture variant {arch!r}; known: {', '.join(ARCHITECTURES)}"
        )
    overrides, storage = ARCHITECTURES[arch]
    cfg = config_from_hf({**_BASE, **overrides})
    rng = np.random.default_rng(seed)
    D, V = cfg.hidden_size, cfg.vocab_size
    tensors: dict[str, Any] = {}

    def matrix(
        name: str, rows: int, cols: int, std: float | None = None, router: bool = False
    ) -> None:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * (std or 1 / math.sqrt(cols))
        tensors[name] = w if router else _stored(w, storage)  # routers stay float32

    def vector(name: str, size: int, mean: float = 1.0) -> None:
        tensors[name] = (mean + 0.1 * rng.standard_normal(size, dtype=np.float32)).astype(
            np.float32
        )

    matrix("model.embed_tokens.weight", V, D, std=1.0)
    _FAMILY_TENSORS.get(cfg.model_type, _llama_tensors)(cfg, matrix, vector)
    if not cfg.tie_word_embeddings:
        matrix("lm_head.weight", V, D, std=2 / math.sqrt(D))
    return Checkpoint(Path(f"<tiny {arch}>"), "safetensors", cfg, tensors)


def _attention_tensors(p: str, cfg: ModelConfig, matrix, bias=None) -> None:
    """q/k/v (with biases when `bias` is given: Qwen2) and o of layer prefix p."""
    for name, rows in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
        matrix(f"{p}.self_attn.{name}_proj.weight", rows, cfg.hidden_size)
        if bias is not None:
            bias(f"{p}.self_attn.{name}_proj.bias", rows, mean=0.0)
    matrix(f"{p}.self_attn.o_proj.weight", cfg.hidden_size, cfg.q_size)


def _mlp_tensors(p: str, D: int, F: int, matrix) -> None:
    """SwiGLU gate/up/down of layer prefix p."""
    matrix(f"{p}.mlp.gate_proj.weight", F, D)
    matrix(f"{p}.mlp.up_proj.weight", F, D)
    matrix(f"{p}.mlp.down_proj.weight", D, F)


def _llama_tensors(cfg: ModelConfig, matrix, vector) -> None:
    D, F = cfg.hidden_size, cfg.intermediate_size
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        vector(f"{p}.input_layernorm.weight", D)
        vector(f"{p}.post_attention_layernorm.weight", D)
        _attention_tensors(p, cfg, matrix, vector if cfg.model_type == "qwen2" else None)
        if cfg.qk_norm:
            vector(f"{p}.self_attn.q_norm.weight", cfg.head_dim)
            vector(f"{p}.self_attn.k_norm.weight", cfg.head_dim)
        _mlp_tensors(p, D, F, matrix)
    vector("model.norm.weight", D)


def _gemma3_tensors(cfg: ModelConfig, matrix, vector) -> None:
    D, F = cfg.hidden_size, cfg.intermediate_size
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            vector(f"{p}.{norm}_layernorm.weight", D, mean=0.0)  # Gemma applies 1 + w
        _attention_tensors(p, cfg, matrix)
        vector(f"{p}.self_attn.q_norm.weight", cfg.head_dim, mean=0.0)
        vector(f"{p}.self_attn.k_norm.weight", cfg.head_dim, mean=0.0)
        _mlp_tensors(p, D, F, matrix)
    vector("model.norm.weight", D, mean=0.0)


def _mixtral_tensors(cfg: ModelConfig, matrix, vector) -> None:
    D, F = cfg.hidden_size, cfg.moe_intermediate_size or cfg.intermediate_size
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        vector(f"{p}.input_layernorm.weight", D)
        vector(f"{p}.post_attention_layernorm.weight", D)
        _attention_tensors(p, cfg, matrix)
        moe = f"{p}.block_sparse_moe"
        matrix(f"{moe}.gate.weight", cfg.n_experts, D, std=1.0, router=True)  # spread-out choices
        for e in range(cfg.n_experts):
            matrix(f"{moe}.experts.{e}.w1.weight", F, D)
            matrix(f"{moe}.experts.{e}.w3.weight", F, D)
            matrix(f"{moe}.experts.{e}.w2.weight", D, F)
    vector("model.norm.weight", D)


def _phi3_tensors(cfg: ModelConfig, matrix, vector) -> None:
    D, F = cfg.hidden_size, cfg.intermediate_size
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        vector(f"{p}.input_layernorm.weight", D)
        vector(f"{p}.post_attention_layernorm.weight", D)
        matrix(f"{p}.self_attn.qkv_proj.weight", cfg.q_size + 2 * cfg.kv_size, D)
        matrix(f"{p}.self_attn.o_proj.weight", D, cfg.q_size)
        matrix(f"{p}.mlp.gate_up_proj.weight", 2 * F, D)
        matrix(f"{p}.mlp.down_proj.weight", D, F)
    vector("model.norm.weight", D)


def _deepseek_v3_tensors(cfg: ModelConfig, matrix, vector) -> None:
    D, H, E = cfg.hidden_size, cfg.n_heads, cfg.n_experts
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for i in range(cfg.n_layers):
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        vector(f"{p}.input_layernorm.weight", D)
        vector(f"{p}.post_attention_layernorm.weight", D)
        if cfg.q_lora_rank is not None:
            matrix(f"{a}.q_a_proj.weight", cfg.q_lora_rank, D)
            vector(f"{a}.q_a_layernorm.weight", cfg.q_lora_rank)
            matrix(f"{a}.q_b_proj.weight", H * (dn + dr), cfg.q_lora_rank)
        else:
            matrix(f"{a}.q_proj.weight", H * (dn + dr), D)
        matrix(f"{a}.kv_a_proj_with_mqa.weight", r + dr, D)
        vector(f"{a}.kv_a_layernorm.weight", r)
        matrix(f"{a}.kv_b_proj.weight", H * (dn + dv), r)
        matrix(f"{a}.o_proj.weight", D, H * dv)
        mlp = f"{p}.mlp"
        if i < cfg.first_k_dense_replace:
            experts, F = [mlp], cfg.intermediate_size
        else:
            F = cfg.moe_intermediate_size
            matrix(f"{mlp}.gate.weight", E, D, std=1.0, router=True)
            vector(f"{mlp}.gate.e_score_correction_bias", E, mean=0.0)
            experts = [f"{mlp}.experts.{e}" for e in range(E)]
            experts.append(f"{mlp}.shared_experts")  # F x n_shared_experts (1 here)
        for m in experts:
            matrix(f"{m}.gate_proj.weight", F, D)
            matrix(f"{m}.up_proj.weight", F, D)
            matrix(f"{m}.down_proj.weight", D, F)
    vector("model.norm.weight", D)


# model_type -> the weights it reads beyond the embedding and lm_head (default: the Llama family)
_FAMILY_TENSORS = {
    "gemma3_text": _gemma3_tensors,
    "mixtral": _mixtral_tensors,
    "phi3": _phi3_tensors,
    "deepseek_v3": _deepseek_v3_tensors,
}


def _stored(w: np.ndarray, storage: str):
    """A float32 matrix the way a checkpoint would hold it."""
    if storage == "float32":
        return w
    if storage == "float16":
        return w.astype(np.float16)
    if storage == "bfloat16":
        from ..loading.safetensors_file import BF16Array

        return BF16Array((w.view(np.uint32) >> 16).astype(np.uint16))  # truncated to bf16
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from ..loading.gguf_file import QuantTensor

    if storage == "Q4_K":
        if w.shape[-1] % QK_K == 0:
            return QuantTensor(GGMLQuantizationType.Q4_K, w.shape, quantize_q4_k(w))
        storage = "Q8_0"  # a row that is not whole super-blocks (see QUANT_TYPES)
    qtype = GGMLQuantizationType[storage]
    return QuantTensor(qtype, w.shape, quantize(w, qtype))
