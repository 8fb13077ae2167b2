"""Mixtral: Jiang et al. 2024, "Mixtral of Experts".

Mistral's decoder (GQA, rotary positions, optional sliding window) with each feed-forward replaced
by a sparse mixture of E SwiGLU experts: a linear router scores the experts, softmax, the top K
(two of eight in Mixtral 8x7B) are kept and their weights renormalized to sum to 1. Attention is
the Llama family's, reused as is. Reference: transformers' modeling_mixtral.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig
from . import Linear, WeightReader
from .family import GGUF_BLOCK, Family
from .llama import LlamaModel
from .moe import load_experts, route_softmax
from .rope import rope_inv_freq
from .spec import MoE


@dataclass(slots=True)
class LayerWeights:
    attn_norm: Any  # (D,)
    q: Linear  # (H*Dh, D)
    k: Linear  # (KVH*Dh, D)
    v: Linear  # (KVH*Dh, D)
    o: Linear  # (D, H*Dh)
    q_norm: Any  # None: Mixtral has no q/k norms (LlamaModel.attention reads them)
    k_norm: Any
    ffn_norm: Any  # (D,)
    router: Any  # (E, D)
    experts: list  # E x (gate (F, D), up (F, D), down (D, F))


class MixtralModel(LlamaModel):
    """Mixtral decoder over a backend's ops. forward: StepMeta -> logits (R, V)."""

    def __init__(self, cfg: ModelConfig, tensors: dict, ops):
        self.cfg, self.ops = cfg, ops
        D, V, E = cfg.hidden_size, cfg.vocab_size, cfg.n_experts
        F = cfg.moe_intermediate_size or cfg.intermediate_size
        take = WeightReader(tensors, ops)

        self.embed = ops.weight(take("model.embed_tokens.weight", (V, D)))
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}"
            moe = f"{p}.block_sparse_moe"
            self.layers.append(
                LayerWeights(
                    attn_norm=ops.vector(take(f"{p}.input_layernorm.weight", (D,))),
                    q=take.linear(f"{p}.self_attn.q_proj", cfg.q_size, D),
                    k=take.linear(f"{p}.self_attn.k_proj", cfg.kv_size, D),
                    v=take.linear(f"{p}.self_attn.v_proj", cfg.kv_size, D),
                    o=take.linear(f"{p}.self_attn.o_proj", D, cfg.q_size),
                    q_norm=None,
                    k_norm=None,
                    ffn_norm=ops.vector(take(f"{p}.post_attention_layernorm.weight", (D,))),
                    router=ops.weight(take(f"{moe}.gate.weight", (E, D))),
                    # HF: experts.{e}.w1 (gate), w3 (up), w2 (down); GGUF: all experts stacked
                    experts=load_experts(
                        take,
                        f"{moe}.experts",
                        ("w1", "w3", "w2"),
                        E,
                        F,
                        D,
                        ops,
                        stacked=("w1", "w3", "w2"),
                    ),
                )
            )
        self.norm = ops.vector(take("model.norm.weight", (D,)))
        self.lm_head = take.lm_head(cfg, self.embed)
        self.inv_freq = ops.vector(rope_inv_freq(cfg))  # (Dh/2,)
        self.scale = cfg.head_dim**-0.5

    def feed_forward(self, x, w: LayerWeights):
        """(N, D) -> (N, D): each token through its top-K experts, weighted by the router."""
        ops = self.ops
        router_logits = ops.to_numpy(ops.matmul(x, w.router))  # (N, E)
        expert_ids, weights = self.route(router_logits)  # (N, K) each
        return ops.moe(x, expert_ids, weights, w.experts, act="silu")  # (N, D)

    def route(self, router_logits):
        """(N, E) -> expert ids (N, K), weights (N, K): softmax, top K, renormalized."""
        return route_softmax(router_logits, self.cfg.n_experts_per_tok)

    def ffn_spec(self, w: LayerWeights) -> MoE:
        return MoE(w.router, self.route, w.experts, "silu")


# -- the family: what checkpoints say about it -----------------------------------------------


def _config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    return {
        "hidden_act": hf.get("hidden_act", "silu"),
        "n_experts": int(hf["num_local_experts"]),
        "n_experts_per_tok": int(hf["num_experts_per_tok"]),
        "moe_intermediate_size": int(hf["intermediate_size"]),
    }


def _config_from_gguf(get, n_layers: int, tensor_names: set[str]) -> dict[str, Any]:
    return {
        "n_experts": int(get("expert_count")),
        "n_experts_per_tok": int(get("expert_used_count")),
        "moe_intermediate_size": int(get("feed_forward_length")),
    }


FAMILY = Family(
    name="mixtral",
    model=MixtralModel,
    model_types=("mixtral",),
    gguf_archs={"llama": "mixtral"},  # llama.cpp files Mixtral under llama, with expert_count
    gguf_marker="expert_count",
    config_from_hf=_config_from_hf,
    config_from_gguf=_config_from_gguf,
    gguf_block_names={  # router and stacked experts
        **GGUF_BLOCK,
        "ffn_gate_inp": "block_sparse_moe.gate",
        "ffn_gate_exps": "block_sparse_moe.experts.w1",  # every expert's gate, (E*F, D)
        "ffn_down_exps": "block_sparse_moe.experts.w2",  # (E*D, F)
        "ffn_up_exps": "block_sparse_moe.experts.w3",  # (E*F, D)
    },
    gguf_permuted_qk=frozenset({"llama"}),  # as for Llama: llama.cpp's interleaved rope
)
