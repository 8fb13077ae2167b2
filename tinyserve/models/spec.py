"""What a model family declares about its fast form: typed, backend-neutral lowering specs.

A model file's op-by-op `forward` is the reference and the fallback. Next to it, `lowering_spec()`
describes the same computation in terms a backend's fast path may assume (which matrices, which
norms where, which activation, which rope, which window per layer), built from the weights the
model already holds: no second copy, nothing rewritten. A backend registers lowerings by spec type
(tinyserve/backends/lowering.py); a spec with no lowering on a backend, or None, runs op by op.

Norm gains are as the rms_norm op applies them (x / rms(x) * w): Gemma's stored offsets (1 + w)
were added at load, so there is one norm style here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import Linear


@dataclass(frozen=True, slots=True)
class Rope:
    """Rotary positions of one attention: the first 2 * len(inv_freq) dims of each head, in halves."""

    inv_freq: Any  # (R/2,) float32 NumPy
    scale: float = 1.0  # multiplies cos and sin: YaRN / LongRoPE's attention factor
    inv_freq_long: Any = None  # LongRoPE: the frequencies of sequences past original_len
    original_len: int = 0


@dataclass(frozen=True, slots=True)
class GQA:
    """Grouped-query attention over the paged cache ("k" and "v" pools of (KVH, Dh))."""

    qkv: tuple[Linear, ...]  # (q, k, v), or one (qkv,) whose rows are q | k | v
    o: Linear
    q_norm: Any  # (Dh,) RMSNorm of each query head before rope, or None
    k_norm: Any  # (Dh,) or None
    rope: Rope
    window: int | None  # sliding window (the last `window` tokens), None = global
    scale: float  # softmax scale


@dataclass(frozen=True, slots=True)
class MLA:
    """Multi-head latent attention, absorbed (DeepSeek-V2/V3, Kimi-K2): keys and values come from
    one cached latent per token, a "kv" pool of (1, dr + r) = [k_rope, c_kv]; attention is an MQA
    of the H absorbed queries [q_rope, W_UK^T q_nope] over it, with values its c_kv part."""

    q_a: Linear | None  # (q_lora, D) q LoRA's down-projection, or None (q_b reads x)
    q_a_norm: Any  # (q_lora,) or None
    q_b: Linear  # (H * (dr + dn), q_lora or D); each head's rows [rope, nope]
    kv_a: Linear  # (dr + r, D): rows [k_rope, c_kv]
    kv_a_norm: Any  # (r,) RMSNorm of c_kv
    q_absorb: Any  # (H, dr + r, dr + dn) float32: [q_rope, q_nope] -> [q_rope, W_UK^T q_nope]
    v_up: Any  # (H, dv, r) float32: W_UV, the attended latent -> each head's value
    o: Linear  # (D, H * dv)
    rope: Rope  # over the first dr dims of q heads and of the latent
    scale: float  # softmax scale (of the uncompressed head dn + dr, times YaRN's mscale^2)


@dataclass(frozen=True, slots=True)
class GatedMLP:
    """down(act(gate x) * up x)."""

    gate_up: tuple[Linear, ...]  # (gate, up), or one (gate_up,) whose rows are gate | up
    down: Linear
    act: str  # "silu" (SwiGLU) | "gelu_tanh" (GeGLU)


@dataclass(frozen=True, slots=True)
class MoE:
    """A routed mixture of gated-MLP experts, plus optional always-on shared experts."""

    router: Any  # (E, D)
    route: Callable  # (N, E) NumPy router logits -> expert ids (N, K), weights (N, K)
    experts: list  # E x (gate (F, D), up (F, D), down (D, F))
    act: str  # "silu" | "gelu_tanh"
    shared: GatedMLP | None = None


@dataclass(frozen=True, slots=True)
class DecoderLayer:
    attn_norm: Any  # (D,)
    attn: GQA | MLA
    post_attn_norm: Any  # (D,) norm of the attention's output before the residual add, or None
    ffn_norm: Any  # (D,)
    ffn: GatedMLP | MoE
    post_ffn_norm: Any  # (D,) or None


@dataclass(frozen=True, slots=True)
class Decoder:
    """A pre-norm decoder: embed (* embed_scale) -> layers -> norm -> head (-> softcap). Llama,
    Qwen2/3, Mistral, Gemma 3, Phi-3 and Mixtral declare one of GQA layers, DeepSeek-V3 and
    Kimi-K2 one of MLA layers (n_kv_heads and head_dim then describe the uncompressed heads)."""

    embed: Any  # (V, D)
    embed_scale: float
    layers: tuple[DecoderLayer, ...]
    norm: Any  # (D,)
    lm_head: Any  # (V, D)
    norm_eps: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    logit_softcap: float | None = None

    @classmethod
    def of(cls, model, layers, embed_scale: float = 1.0, logit_softcap=None) -> Decoder:
        """A model's decoder from its layers' specs and the weights every decoder model holds
        (embed, norm, lm_head) and its config's shapes."""
        cfg = model.cfg
        return cls(
            embed=model.embed,
            embed_scale=embed_scale,
            layers=tuple(layers),
            norm=model.norm,
            lm_head=model.lm_head,
            norm_eps=cfg.norm_eps,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            logit_softcap=logit_softcap,
        )
