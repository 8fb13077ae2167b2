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

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, WeightsError
from ..step import StepMeta
from . import Linear, WeightReader, as_numpy, spec
from .family import GGUF_BLOCK, Family, round_near
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


def _weight_rows(ops, t, order: np.ndarray):
    """ops.weight of t's rows in order; ops that defer their weights (tensor parallelism) read
    only the rows a rank keeps."""
    deferred = getattr(ops, "deferred_rows", lambda t, order: None)(t, order)
    return ops.weight(_take_rows(t, order)) if deferred is None else deferred


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
                    q_b=_weight_rows(ops, q_b, q_order),
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

    def route(self, logits: np.ndarray, bias: np.ndarray):
        """(N, E) NumPy router logits -> expert ids (N, K), weights (N, K)."""
        cfg = self.cfg
        if cfg.scoring_func == "sigmoid":
            return route_sigmoid_grouped(
                logits,
                bias,
                cfg.n_experts_per_tok,
                cfg.n_group,
                cfg.topk_group,
                cfg.norm_topk_prob,
                cfg.routed_scaling_factor,
            )
        # DeepSeek-V2 style softmax routing
        ids, weights = route_softmax(logits, cfg.n_experts_per_tok, cfg.norm_topk_prob)
        return ids, weights * np.float32(cfg.routed_scaling_factor)

    def feed_forward(self, x, ffn: MLP | MoE):
        """(N, D) -> (N, D): dense SwiGLU, or routed experts plus shared ones."""
        if isinstance(ffn, MLP):
            return self._mlp(x, ffn)
        ops = self.ops
        ids, weights = self.route(ops.to_numpy(ops.matmul(x, ffn.router)), ffn.bias)  # (N, K)
        y = ops.moe(x, ids, weights, ffn.experts, act="silu")  # (N, D)
        return y if ffn.shared is None else y + self._mlp(x, ffn.shared)

    # -- the declared fast form ---------------------------------------------------------------

    def lowering_spec(self) -> spec.Decoder:
        """This decoder as a backend's fast path may run it (tinyserve/models/spec.py): MLA layers
        over the latent cache, dense or routed feed-forwards."""
        cfg = self.cfg
        rope = spec.Rope(rope_inv_freq(cfg, rotary_dim=cfg.qk_rope_head_dim), self.rope_scale)

        def mlp(m: MLP) -> spec.GatedMLP:
            return spec.GatedMLP((Linear(m.gate), Linear(m.up)), Linear(m.down), "silu")

        def ffn(f: MLP | MoE):
            if isinstance(f, MLP):
                return mlp(f)
            return spec.MoE(
                f.router,
                partial(self.route, bias=f.bias),
                f.experts,
                "silu",
                None if f.shared is None else mlp(f.shared),
            )

        layers = tuple(
            spec.DecoderLayer(
                attn_norm=w.attn_norm,
                attn=spec.MLA(
                    q_a=None if w.q_a is None else Linear(w.q_a),
                    q_a_norm=w.q_a_norm,
                    q_b=Linear(w.q_b),
                    kv_a=Linear(w.kv_a),
                    kv_a_norm=w.kv_a_norm,
                    q_absorb=w.q_absorb,
                    v_up=w.v_up,
                    o=Linear(w.o),
                    rope=rope,
                    scale=self.scale,
                ),
                post_attn_norm=None,
                ffn_norm=w.ffn_norm,
                ffn=ffn(w.ffn),
                post_ffn_norm=None,
            )
            for w in self.layers
        )
        return spec.Decoder.of(self, layers)

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


# -- the family: what checkpoints say about it -----------------------------------------------


def _config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
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


def _config_from_gguf(get, n_layers: int, tensor_names: set[str]) -> dict[str, Any]:
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
            "mscale_all_dim": round_near(float(get("rope.scaling.yarn_log_multiplier", 0.1)) * 10),
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


_K_B_RE = re.compile(r"(model\.layers\.\d+\.self_attn\.)k_b_proj\.weight")


def _merge_kv_b(path: Path, tensors: dict, gguf_names: dict[str, str]) -> None:
    """MLA's kv_b_proj (H*(dn+dv), r) back from the attn_k_b (H, r, dn) / attn_v_b (H, dv, r) pair
    newer convert_hf_to_gguf.py writes instead (k_b transposed for llama.cpp's absorbed product).

    The model dequantizes kv_b at load anyway, so the merged tensor is float32."""
    for k_name in [n for n in tensors if _K_B_RE.fullmatch(n)]:
        prefix = _K_B_RE.fullmatch(k_name).group(1)
        v_name, kv_name = f"{prefix}v_b_proj.weight", f"{prefix}kv_b_proj.weight"
        if v_name not in tensors:
            raise WeightsError(f"{path}: {gguf_names[k_name]} has no matching attn_v_b tensor")
        k_b = np.asarray(as_numpy(tensors.pop(k_name)), dtype=np.float32)
        v_b = np.asarray(as_numpy(tensors.pop(v_name)), dtype=np.float32)
        if k_b.ndim == 2 or v_b.ndim == 2:  # quantized: rows of all heads folded together
            k_b, v_b = _heads_like(k_b, v_b, path, gguf_names[k_name])
        if k_b.ndim != 3 or v_b.ndim != 3 or k_b.shape[:2] != (v_b.shape[0], v_b.shape[2]):
            raise WeightsError(
                f"{path}: {gguf_names[k_name]} {k_b.shape} and its attn_v_b {v_b.shape} are not "
                f"(H, r, dn) and (H, dv, r)"
            )
        kv_b = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)  # (H, dn + dv, r)
        tensors[kv_name] = np.ascontiguousarray(kv_b.reshape(-1, kv_b.shape[-1]))  # (H*(dn+dv), r)
        gguf_names[kv_name] = gguf_names.pop(k_name).replace("attn_k_b", "attn_kv_b")
        gguf_names.pop(v_name)


def _heads_like(k_b: np.ndarray, v_b: np.ndarray, path: Path, name: str):
    """Quantized k_b (H*r, dn) / v_b (H*dv, r) -> (H, r, dn), (H, dv, r): r is v_b's row length."""
    r = v_b.shape[-1]
    if k_b.ndim == 2:
        if k_b.shape[0] % r:
            raise WeightsError(f"{path}: {name} rows {k_b.shape[0]} do not split into heads of {r}")
        k_b = k_b.reshape(-1, r, k_b.shape[-1])  # (H, r, dn)
    if v_b.ndim == 2:
        if v_b.shape[0] % k_b.shape[0]:
            raise WeightsError(f"{path}: attn_v_b rows {v_b.shape[0]} do not match {name}'s heads")
        v_b = v_b.reshape(k_b.shape[0], -1, r)  # (H, dv, r)
    return k_b, v_b


FAMILY = Family(
    name="deepseek_v3",
    model=DeepseekV3Model,
    model_types=("deepseek_v3", "kimi_k2"),
    gguf_archs={"deepseek2": "deepseek_v3"},  # llama.cpp's arch for DeepSeek-V2/V3 and Kimi-K2
    config_from_hf=_config_from_hf,
    config_from_gguf=_config_from_gguf,
    gguf_block_names={
        **GGUF_BLOCK,
        "attn_q_a": "self_attn.q_a_proj",
        "attn_q_a_norm": "self_attn.q_a_layernorm",
        "attn_q_b": "self_attn.q_b_proj",
        "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
        "attn_kv_a_norm": "self_attn.kv_a_layernorm",
        "attn_kv_b": "self_attn.kv_b_proj",
        "attn_k_b": "self_attn.k_b_proj",  # newer converters split kv_b: merged back at load
        "attn_v_b": "self_attn.v_b_proj",
        "ffn_gate_inp": "mlp.gate",
        "exp_probs_b": "mlp.gate.e_score_correction",  # + ".bias": e_score_correction_bias
        "ffn_gate_exps": "mlp.experts.gate_proj",  # stacked (E*F, D)
        "ffn_up_exps": "mlp.experts.up_proj",
        "ffn_down_exps": "mlp.experts.down_proj",
        "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
        "ffn_up_shexp": "mlp.shared_experts.up_proj",
        "ffn_down_shexp": "mlp.shared_experts.down_proj",
    },
    gguf_fix_tensors=_merge_kv_b,
)
