"""What a model family declares beside its math, and the helpers its config readers share.

A family file in tinyserve/models/ ends with `FAMILY = Family(...)`: the config.json model_types
and GGUF architectures it serves, how it reads its own config fields from each, its GGUF tensor
names and llama.cpp's storage quirks for it. tinyserve/models/registry.py lists the family files;
tinyserve/loading/ reads the fields every family shares and asks the family for the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A GGUF metadata reader: get(key, default) -> the value of `{arch}.{key}`; ConfigError for a
# missing key without a default.
GGUFGet = Callable[..., Any]

# llama.cpp's tensor names every decoder shares (gguf-py's tensor_mapping.py), GGUF -> HF.
# Whole tensors:
GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",  # llama3 rope factors (Llama-3.1 GGUFs)
}
# Per block `blk.{i}.{name}.weight|bias` -> `model.layers.{i}.{hf}.weight|bias`:
GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def no_fields(*args) -> dict[str, Any]:
    """A config reader for a family the shared fields describe completely."""
    return {}


@dataclass(frozen=True, slots=True)
class Family:
    """One architecture family: its model class and how checkpoints describe it.

    config_from_hf(hf) and config_from_gguf(get, n_layers, tensor_names) return ModelConfig
    keyword arguments that override the shared fields the loader reads; some GGUF facts are told
    by which tensors a file has, not by its metadata, hence tensor_names (the names in the file).
    """

    name: str  # ModelConfig.family and the key in registry.FAMILIES
    model: Callable  # the model class: model(cfg, tensors, ops)
    model_types: tuple[str, ...]  # config.json model_type values it serves
    gguf_archs: dict[str, str]  # GGUF general.architecture -> the model_type it stands for
    config_from_hf: Callable[[dict[str, Any]], dict[str, Any]] = no_fields
    config_from_gguf: Callable[[GGUFGet, int, set[str]], dict[str, Any]] = no_fields
    gguf_global_names: dict[str, str] = field(default_factory=lambda: GGUF_GLOBAL)
    gguf_block_names: dict[str, str] = field(default_factory=lambda: GGUF_BLOCK)
    # a metadata key `{arch}.{key}` that must be set for this family to claim one of its GGUF
    # archs: llama.cpp files Mixtral under "llama", told apart by llama.expert_count
    gguf_marker: str | None = None
    # archs whose q/k llama.cpp stores permuted for its interleaved rope: undone at load
    gguf_permuted_qk: frozenset[str] = frozenset()
    # RMSNorm gains stored as 1 + w (the family applies norms as (1 + w)): undone at load
    gguf_norms_plus_one: bool = False
    # the family's own tensor surgery after renaming: fix(path, tensors, gguf_names), in place
    gguf_fix_tensors: Callable[[Path, dict, dict[str, str]], None] | None = None


def rope_scaling_from_hf(rs: dict[str, Any] | None) -> dict[str, Any] | None:
    """config.json rope_scaling / rope_parameters -> its dict with rope_type set, None if plain."""
    if not rs:
        return None
    rs = {k: v for k, v in rs.items() if k != "rope_theta"}
    rs["rope_type"] = rs.get("rope_type") or rs.get("type") or "default"
    if rs["rope_type"] == "default":
        return None
    return rs


def round_near(x: float) -> float:
    """x with the float32 noise of a GGUF metadata value removed (7 significant digits)."""
    return float(f"{x:.7g}")
