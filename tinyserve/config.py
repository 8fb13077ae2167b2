"""ModelConfig: one description of a transformer, built from config.json or from GGUF metadata.

Shape legend used in comments across the package:
    D   hidden size                 L   layers              V   vocab size
    H   query heads                 KVH key/value heads     Dh  head dim
    F   feed-forward size           T   tokens of one sequence
    N   tokens scheduled in one step (flat over sequences)   S   sequences in one step
    NB  KV blocks in a pool         BS  tokens per KV block
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnsupportedArchitecture

# HF `model_type` / GGUF `general.architecture` -> model family (a file in tinyserve/models/).
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "mixtral": "mixtral",
    "phi3": "phi3",
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "deepseek_v3",
}
# Per-layer attention kinds (Gemma 3's layer_types).
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shapes and hyper-parameters of one decoder-only transformer (legend in the module docstring)."""

    model_type: str  # "llama", "mistral", "qwen2", "qwen3", ...
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
    def family(self) -> str:
        return FAMILIES[self.model_type]

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
        if self.model_type not in FAMILIES:
            raise UnsupportedArchitecture(
                f"unsupported architecture {self.model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
            )
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

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face config.json dict."""
        from .config_families import FAMILY_FROM_HF  # not at the top: it imports this module

        model_type = hf.get("model_type") or ""
        if model_type not in FAMILIES:
            arch = (hf.get("architectures") or [model_type or "<missing model_type>"])[0]
            raise UnsupportedArchitecture(
                f"unsupported architecture {arch!r} (model_type {model_type!r}); "
                f"supported: {', '.join(sorted(FAMILIES))}"
            )
        try:
            hidden, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            sliding = hf.get("sliding_window")
            if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
                sliding = None  # Qwen configs carry a window they do not use
            family_kw = FAMILY_FROM_HF.get(FAMILIES[model_type], lambda hf: {})(hf)
            kw = {
                "model_type": model_type,
                "vocab_size": int(hf["vocab_size"]),
                "hidden_size": hidden,
                "n_layers": int(hf["num_hidden_layers"]),
                "n_heads": n_heads,
                "n_kv_heads": int(hf.get("num_key_value_heads") or n_heads),
                "head_dim": int(hf.get("head_dim") or hidden // n_heads),
                "intermediate_size": int(hf["intermediate_size"]),
                "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
                "rope_theta": float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                "rope_scaling": rope_scaling_from_hf(hf.get("rope_scaling") or rope),
                "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
                "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
                "sliding_window": int(sliding) if sliding else None,
                "qk_norm": model_type == "qwen3",
                "bos_token_id": hf.get("bos_token_id"),
                "eos_token_ids": eos_ids,
            }
            return cls(**{**kw, **family_kw})
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a malformed field: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        try:
            hf = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} is not a JSON object")
        return cls.from_hf(hf)

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
        """From GGUF metadata (plain Python values) and the names of the tensors in the file."""
        from .config_families import FAMILY_FROM_GGUF  # not at the top: it imports this module

        arch = meta.get("general.architecture", "<missing general.architecture>")
        model_type = _GGUF_ARCH.get(arch, arch)
        if arch == "llama" and meta.get("llama.expert_count"):
            model_type = "mixtral"  # llama.cpp files Mixtral under the llama architecture
        if model_type not in FAMILIES:
            raise UnsupportedArchitecture(
                f"unsupported architecture {arch!r}; supported: {', '.join(sorted(FAMILIES))}"
            )

        def get(key, default=None):
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ConfigError(f"GGUF metadata lacks {arch}.{key}")
            return value

        hidden, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
        n_kv = get("attention.head_count_kv", n_heads)
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = int(meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else 0))
        scaling = None
        stype = meta.get(f"{arch}.rope.scaling.type")
        if stype and stype not in ("none",):
            scaling = {
                "rope_type": stype,
                "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0)),
                "original_max_position_embeddings": int(
                    meta.get(f"{arch}.rope.scaling.original_context_length", 0)
                ),
            }
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = [] if eos is None else [int(eos)]
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None and int(eot) not in eos_ids:
            eos_ids.append(int(eot))
        sliding = meta.get(f"{arch}.attention.sliding_window")
        family_kw = FAMILY_FROM_GGUF.get(FAMILIES[model_type], lambda get, n, names: {})(
            get, int(get("block_count")), tensor_names
        )
        kw = {
            "model_type": model_type,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "n_layers": int(get("block_count")),
            "n_heads": n_heads,
            "n_kv_heads": int(n_kv if not isinstance(n_kv, list) else n_kv[0]),
            "head_dim": int(meta.get(f"{arch}.attention.key_length") or hidden // n_heads),
            "intermediate_size": int(get("feed_forward_length")),
            "norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "rope_scaling": scaling,
            "max_position_embeddings": int(get("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in tensor_names,
            "sliding_window": int(sliding) if sliding else None,
            "qk_norm": arch == "qwen3",
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_ids": tuple(eos_ids),
        }
        return cls(**{**kw, **family_kw})


def rope_scaling_from_hf(rs: dict[str, Any] | None) -> dict[str, Any] | None:
    """config.json rope_scaling / rope_parameters -> its dict with rope_type set, None if plain."""
    if not rs:
        return None
    rs = {k: v for k, v in rs.items() if k != "rope_theta"}
    rs["rope_type"] = rs.get("rope_type") or rs.get("type") or "default"
    if rs["rope_type"] == "default":
        return None
    return rs


# GGUF general.architecture -> HF model_type where the two differ.
_GGUF_ARCH = {"deepseek2": "deepseek_v3"}
