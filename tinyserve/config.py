"""ModelConfig: one description of a transformer, plain data.

tinyserve/loading/model_config.py builds it from config.json or GGUF metadata, asking the family
file (tinyserve/models/registry.py) for the fields only that family has.

Shape legend used in comments across the package:
    D   hidden size                 L   layers              V   vocab size
    H   query heads                 KVH key/value heads     Dh  head dim
    F   feed-forward size           T   tokens of one sequence
    N   tokens scheduled in one step (flat over sequences)   S   sequences in one step
    NB  KV blocks in a pool         BS  tokens per KV block
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# Per-layer attention kinds (Gemma 3's layer_types).
FULL, SLIDING = "full_attention", "sliding_attention"
# past any model built (the deepest have ~100-200 layers); a checkpoint claiming more is broken, and
# the readers refuse it before a family builds anything per layer
MAX_LAYERS = 4096


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shapes and hyper-parameters of one decoder-only transformer (legend in the module docstring)."""

    model_type: str  # "llama", "mistral", "qwen2", "qwen3", ...
    family: str  # the tinyserve/models/ file that implements it: "llama", "gemma3", ...
    vocab_size: int  # V
    hidden_size: int  # D
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # KVH
    head_dim: int  # Dh
    intermediate_size: int  # F
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # -- per-family extras; the defaults leave the Llama family as it was --------------------
    hidden_act: str = "silu"  # gated feed-forward activation: "silu" | "gelu_pytorch_tanh"
    layer_types: tuple[str, ...] = ()  # per layer FULL | SLIDING (Gemma 3); () = all alike
    rope_local_theta: float | None = None  # Gemma 3: rope base of the sliding layers
    query_pre_attn_scalar: float | None = None  # Gemma: softmax scale 1/sqrt(this), not 1/sqrt(Dh)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)
    partial_rotary_factor: float = 1.0  # rotate only the first R = Dh * factor dims (Phi-4-mini)
    # mixture of experts (Mixtral, DeepSeek-V3)
    n_experts: int = 0  # E routed experts; 0 = dense feed-forward
    n_experts_per_tok: int = 0  # K experts per token
    moe_intermediate_size: int = 0  # F of one routed expert (DeepSeek; Mixtral uses F)
    n_shared_experts: int = 0  # DeepSeek: experts every token goes through
    first_k_dense_replace: int = 0  # DeepSeek: the first layers keep a dense feed-forward
    scoring_func: str = "softmax"  # router: "softmax" (Mixtral) | "sigmoid" (DeepSeek-V3)
    norm_topk_prob: bool = True  # renormalize the K chosen weights to sum to 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # DeepSeek group-limited routing: E experts in n_group groups,
    topk_group: int = 1  # of which only the topk_group best groups may be chosen
    # multi-head latent attention (DeepSeek-V2/V3, Kimi-K2)
    q_lora_rank: int | None = None  # None: q = x @ Wq directly
    kv_lora_rank: int = 0  # r: the compressed latent c_kv cached per token
    qk_nope_head_dim: int = 0  # dn
    qk_rope_head_dim: int = 0  # dr: the shared rope key, cached next to c_kv
    v_head_dim: int = 0  # dv
    rope_interleave: bool = False  # rotate pairs (x0, x1), (x2, x3), ... instead of halves

    @property
    def rotary_dim(self) -> int:
        """R: how many dims of each head rope rotates."""
        if self.qk_rope_head_dim:
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        """Whether layer attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[layer] == SLIDING

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def context_len(self) -> int:
        return self.max_position_embeddings

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"config field {name} must be positive, got {getattr(self, name)}"
                )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.layer_types:
            if len(self.layer_types) != self.n_layers:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers"
                )
            bad = sorted(set(self.layer_types) - {FULL, SLIDING})
            if bad:
                raise ConfigError(f"unknown layer types {bad}; expected {FULL!r} or {SLIDING!r}")
        if self.n_experts:
            if not 0 < self.n_experts_per_tok <= self.n_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.n_experts_per_tok} must be in 1..{self.n_experts}"
                )
            if self.n_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
                raise ConfigError(
                    f"{self.n_experts} experts cannot be routed in {self.n_group} groups "
                    f"choosing {self.topk_group}"
                )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(
                f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}"
            )
