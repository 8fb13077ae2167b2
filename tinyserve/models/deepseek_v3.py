"""DeepSeek-V3 and Kimi-K2: DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" (MLA from DeepSeek-V2).

Multi-head latent attention (MLA): keys and values come from one compressed latent c_kv (rank r)
per token plus a single rope key k_rope (dr dims) shared by all heads, and only those r + dr
numbers per token are cached. Queries (optionally through a low-rank "q LoRA") split into a part
without position (dn) and a rotated part (dr). The decompression matrix W_UK is absorbed into the
query (q_nope . (W_UK c) = (W_UK^T q_nope) . c) and W_UV applied after attention, so attention is
an MQA with one kv head over key = [k_rope, c_kv] and value = c_kv. Rope is YaRN with interleaved
pairs; YaRN's mscale also multiplies the softmax scale. Feed-forward: the first layers dense, the
rest a mixture of routed experts (sigmoid scores, bias-corrected group-limited top-k) plus shared
experts. Reference: transformers' modeling_deepseek_v3.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..step import StepMeta
from . import WeightReader, as_numpy
from .moe import load_experts, route_sigmoid_grouped, route_softmax
from .rope import interleaved_to_halves, rope_attention_factor, rope_inv_freq, yarn_softmax_mscale


@dataclass(slots=True)
class MLP:
    gate: Any  # (F, D)
    up: Any  # (F, D)
    down: Any  # (D, F)


@dataclass(slots=True)
class MoE:
    router: Any  # (E, D)
    bias: np.ndarray  # (E,) e_score_correction_bias: steers the choice, not the weights
    experts: list  # E x (gate, up, down)
    shared: MLP | None  # every token's always-on experts (F = moe F * n_shared)


@dataclass(slots=True)
class LayerWeights:
    attn_norm: Any  # (D,)
    q_a: Any  # (q_lora, D) or None without q LoRA
    q_a_norm: Any  # (q_lora,) or None
    q_b: Any  # (H*(dr+dn), q_lora or D); rows per head reordered to [rope, nope]
    kv_a: Any  # (dr + r, D); rows reordered to [rope, latent]
    kv_a_norm: Any  # (r,)
    q_absorb: Any  # (H, dr + r, dr + dn): [q_rope, q_nope] -> [q_rope, W_UK^T q_nope]
    v_up: Any  # (H, dv, r): W_UV, latent -> value head
    o: Any  # (D, H*dv)
    ffn_norm: Any  # (D,)
    ffn: MLP | MoE


def _take_rows(t, order: np.ndarray):
    """(R, C) tensor -> rows in `order`; quantized blocks move as they are."""
    if hasattr(t, "take_rows"):
        return t.take_rows(order)
    return as_numpy(t)[order]


class DeepseekV3Model:
    """DeepSeek-V3 decoder over a backend's ops. forward: StepMeta -> logits (R, V)."""

    def __init__(self, cfg: ModelConfig, tensors: dict, ops):
        self.cfg, self.ops = cfg, ops
        D, V, H = cfg.hidden_size, cfg.vocab_size, cfg.n_heads
        dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        take = WeightReader(tensors, ops)

        # the rope op rotates the first dims in halves: move each head's rope dims first and, for
        # interleaved checkpoints, turn their pairs into halves (q.k is unchanged by the reorder)
        rope_order = interleaved_to_halves(dr) if cfg.rope_interleave else np.arange(dr)
        head = np.concatenate([dn + rope_order, np.arange(dn)])  # (dr + dn,)
        q_order = (np.arange(H)[:, None] * (dn + dr) + head).reshape(-1)  # (H*(dn+dr),)
        kv_order = np.concatenate([r + rope_order, np.arange(r)])  # (dr + r,)

        def dense_mlp(prefix: str, ffn: int) -> MLP:
            return MLP(
                ops.weight(take(f"{prefix}.gate_proj.weight", (ffn, D))),
                ops.weight(take(f"{prefix}.up_proj.weight", (ffn, D))),
                ops.weight(take(f"{prefix}.down_proj.weight", (D, ffn))),
            )

        self.embed = ops.weight(take("model.embed_tokens.weight", (V, D)))
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}"
            a = f"{p}.self_attn"
            if cfg.q_lora_rank is not None:
                q_a = ops.weight(take(f"{a}.q_a_proj.weight", (cfg.q_lora_rank, D)))
                q_a_norm = ops.vector(take(f"{a}.q_a_layernorm.weight", (cfg.q_lora_rank,)))
                q_b = take(f"{a}.q_b_proj.weight", (H * (dn + dr), cfg.q_lora_rank))
            else:
                q_a = q_a_norm = None
                q_b = take(f"{a}.q_proj.weight", (H * (dn + dr), D))
            kv_b = as_numpy(take(f"{a}.kv_b_proj.weight", (H * (dn + dv), r))).astype(np.float32)
            kv_b = kv_b.reshape(H, dn + dv, r)
            w_uk, w_uv = kv_b[:, :dn, :], kv_b[:, dn:, :]  # (H, dn, r), (H, dv, r)
            absorb = np.zeros((H, dr + r, dr + dn), dtype=np.float32)
            absorb[:, :dr, :dr] = np.eye(dr, dtype=np.float32)  # the rope part passes through
            absorb[:, dr:, dr:] = w_uk.transpose(0, 2, 1)  # q_nope -> latent query W_UK^T q_nope
            if i < cfg.first_k_dense_replace or not cfg.n_experts:
                ffn = dense_mlp(f"{p}.mlp", cfg.intermediate_size)
            else:
                E, F = cfg.n_experts, cfg.moe_intermediate_size
                bias = take.optional(f"{p}.mlp.gate.e_score_correction_bias", (E,))
                ffn = MoE(
                    router=ops.weight(take(f"{p}.mlp.gate.weight", (E, D))),
                    bias=np.zeros(E, np.float32)
                    if bias is None
                    else as_numpy(bias).astype(np.float32),
                    experts=load_experts(
                        take,
                        f"{p}.mlp.experts",
                        ("gate_proj", "up_proj", "down_proj"),
                        E,
                        F,
                        D,
                        ops,
                        stacked=("gate_proj", "up_proj", "down_proj"),
                    ),
                    shared=dense_mlp(f"{p}.mlp.shared_experts", F * cfg.n_shared_experts)
                    if cfg.n_shared_experts
                    else None,
                )
            self.layers.append(
                LayerWeights(
                    attn_norm=ops.vector(take(f"{p}.input_layernorm.weight", (D,))),
                    q_a=q_a,
                    q_a_norm=q_a_norm,
                    q_b=ops.weight(_take_rows(q_b, q_order)),
                    kv_a=ops.weight(
                        _take_rows(take(f"{a}.kv_a_proj_with_mqa.weight", (r + dr, D)), kv_order)
                    ),
                    kv_a_norm=ops.vector(take(f"{a}.kv_a_layernorm.weight", (r,))),
                    q_absorb=ops.vector(absorb),
                    v_up=ops.vector(np.ascontiguousarray(w_uv)),
                    o=ops.weight(take(f"{a}.o_proj.weight", (D, H * dv))),
                    ffn_norm=ops.vector(take(f"{p}.post_attention_layernorm.weight", (D,))),
                    ffn=ffn,
                )
            )
        self.norm = ops.vector(take("model.norm.weight", (D,)))
        self.lm_head = take.lm_head(cfg, self.embed)
        self.inv_freq = ops.vector(rope_inv_freq(cfg, rotary_dim=dr))  # (dr/2,)
        self.rope_scale = rope_attention_factor(cfg)  # YaRN scales cos/sin of q_rope and k_rope
        # the softmax scale of the uncompressed head (dn + dr), times YaRN's mscale^2
        self.scale = (dn + dr) ** -0.5 * yarn_softmax_mscale(cfg)

    def kv_layout(self) -> list[dict[str, tuple[int, ...]]]:
        """Per layer and token: one shared "head" of [k_rope (dr), c_kv (r)], not full K/V."""
        return [
            {"kv": (1, self.cfg.qk_rope_head_dim + self.cfg.kv_lora_rank)}
            for _ in range(self.cfg.n_layers)
        ]

    def _rope(self, x, positions):
        """(N, h, dr + rest) -> same: rotate the first dr dims, scaled as YaRN says."""
        y = self.ops.rope(x, positions, self.inv_freq)
        if self.rope_scale != 1.0:
            y[..., : self.cfg.qk_rope_head_dim] *= self.rope_scale
        return y

    def attention(self, x, w: LayerWeights, step: StepMeta, kv: dict, positions):
        """(N, D) -> (N, D): multi-head latent attention, absorbed, over the paged latent cache."""
        cfg, ops = self.cfg, self.ops
        N, H, dr, r = x.shape[0], cfg.n_heads, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        if w.q_a is not None:  # q LoRA: down-project, normalize, up-project
            x_q = ops.rms_norm(ops.matmul(x, w.q_a), w.q_a_norm, cfg.norm_eps)  # (N, q_lora)
        else:
            x_q = x
        q = ops.matmul(x_q, w.q_b).reshape(N, H, dr + cfg.qk_nope_head_dim)  # (N, H, dr+dn)
        q = self._rope(q, positions)
        q = ops.head_matmul(q, w.q_absorb)  # (N, H, dr + r): [q_rope, W_UK^T q_nope]

        latent = ops.matmul(x, w.kv_a)  # (N, dr + r): [k_rope, c_kv]
        latent[:, dr:] = ops.rms_norm(latent[:, dr:], w.kv_a_norm, cfg.norm_eps)
        latent = self._rope(latent.reshape(N, 1, dr + r), positions)  # (N, 1, dr + r)
        ops.write_kv(kv["kv"], latent, step.slots)

        pool = kv["kv"]  # (NB, BS, 1, dr + r): keys; its c_kv part doubles as the values
        o = ops.paged_attention(q, pool, pool[..., dr:], step, self.scale)  # (N, H, r)
        o = ops.head_matmul(o, w.v_up)  # (N, H, dv): W_UV applied after attention
        return ops.matmul(o.reshape(N, H * cfg.v_head_dim), w.o)  # (N, D)

    def _mlp(self, x, m: MLP):
        ops = self.ops
        return ops.matmul(ops.silu_mul(ops.matmul(x, m.gate), ops.matmul(x, m.up)), m.down)

    def feed_forward(self, x, ffn: MLP | MoE):
        """(N, D) -> (N, D): dense SwiGLU, or routed experts plus shared ones."""
        if isinstance(ffn, MLP):
            return self._mlp(x, ffn)
        ops, cfg = self.ops, self.cfg
        logits = ops.to_numpy(ops.matmul(x, ffn.router))  # (N, E)
        if cfg.scoring_func == "sigmoid":
            ids, weights = route_sigmoid_grouped(
                logits,
                ffn.bias,
                cfg.n_experts_per_tok,
                cfg.n_group,
                cfg.topk_group,
                cfg.norm_topk_prob,
                cfg.routed_scaling_factor,
            )
        else:  # DeepSeek-V2 style softmax routing
            ids, weights = route_softmax(logits, cfg.n_experts_per_tok, cfg.norm_topk_prob)
            weights = weights * np.float32(cfg.routed_scaling_factor)
        y = ops.moe(x, ids, weights, ffn.experts, act="silu")  # (N, D)
        return y if ffn.shared is None else y + self._mlp(x, ffn.shared)

    def forward(self, step: StepMeta, kv: list[dict]):
        """A step of N tokens -> logits (R, V) for its logits_rows."""
        ops, eps = self.ops, self.cfg.norm_eps
        positions = ops.from_numpy(step.positions)
        x = ops.embedding(ops.from_numpy(step.token_ids), self.embed)  # (N, D)
        for w, layer_kv in zip(self.layers, kv):
            x = x + self.attention(ops.rms_norm(x, w.attn_norm, eps), w, step, layer_kv, positions)
            x = x + self.feed_forward(ops.rms_norm(x, w.ffn_norm, eps), w.ffn)
        x = x[ops.from_numpy(step.logits_rows)]  # (R, D): only the rows we sample from
        return ops.matmul(ops.rms_norm(x, self.norm, eps), self.lm_head)  # (R, V)
