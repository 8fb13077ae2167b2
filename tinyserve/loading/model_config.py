"""ModelConfig from a checkpoint's own description: config.json or GGUF metadata.

The fields every family shares are read here; the family serving the checkpoint (found through
tinyserve/models/registry.py) reads its own and they override these.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import MAX_LAYERS, ModelConfig
from ..errors import ConfigError, UnsupportedArchitecture
from ..models.family import rope_scaling_from_hf
from ..models.registry import gguf_family, hf_family, supported_gguf_archs, supported_model_types
from .json_file import FieldTypes, check_field_types, json_type, read_json_object

_INT, _OPT_INT, _NUM, _OPT_NUM = ("int",), ("int", "null"), ("number",), ("number", "null")
# the JSON type of every config.json field a family reads (shared and family fields alike)
CONFIG_JSON_TYPES: FieldTypes = {
    "model_type": ("string",), "architectures": ("string array", "null"),
    "vocab_size": _INT, "hidden_size": _INT, "num_hidden_layers": _INT,
    "num_attention_heads": _INT, "intermediate_size": _INT,
    "num_key_value_heads": _OPT_INT, "head_dim": _OPT_INT, "max_position_embeddings": _INT,
    "rms_norm_eps": _NUM, "rope_theta": _OPT_NUM, "rope_local_base_freq": _OPT_NUM,
    "rope_scaling": ("object", "null"), "rope_parameters": ("object", "null"),
    "tie_word_embeddings": ("bool",), "sliding_window": _OPT_INT,
    "use_sliding_window": ("bool",), "sliding_window_pattern": _OPT_INT,
    "bos_token_id": _OPT_INT, "eos_token_id": ("int", "int array", "null"),
    "hidden_act": ("string",), "hidden_activation": ("string", "null"),
    "layer_types": ("string array", "null"), "query_pre_attn_scalar": _OPT_NUM,
    "final_logit_softcapping": _OPT_NUM, "attn_logit_softcapping": _OPT_NUM,
    "partial_rotary_factor": _NUM, "original_max_position_embeddings": _OPT_INT,
    "num_local_experts": _OPT_INT, "num_experts_per_tok": _OPT_INT,
    "n_routed_experts": _OPT_INT, "n_shared_experts": _OPT_INT,
    "moe_intermediate_size": _OPT_INT, "first_k_dense_replace": _OPT_INT,
    "n_group": _OPT_INT, "topk_group": _OPT_INT, "routed_scaling_factor": _NUM,
    "scoring_func": ("string",), "norm_topk_prob": ("bool",), "q_lora_rank": _OPT_INT,
    "kv_lora_rank": _INT, "qk_nope_head_dim": _INT, "qk_rope_head_dim": _INT,
    "v_head_dim": _INT, "rope_interleave": ("bool",),
}  # fmt: skip
# ... and of the rope_scaling / rope_parameters objects (Gemma 3's holds one per layer type)
ROPE_JSON_TYPES: FieldTypes = {
    "rope_type": ("string",), "type": ("string",), "factor": _NUM, "rope_theta": _NUM,
    "original_max_position_embeddings": _INT, "low_freq_factor": _NUM,
    "high_freq_factor": _NUM, "beta_fast": _NUM, "beta_slow": _NUM, "mscale": _NUM,
    "mscale_all_dim": _NUM, "attention_factor": _NUM, "partial_rotary_factor": _NUM,
    "long_factor": ("array",), "short_factor": ("array",),
    "full_attention": ("object",), "sliding_attention": ("object",),
}  # fmt: skip


def check_config_json(hf: Mapping[str, Any], source: str = "config.json") -> None:
    """Raise ConfigError naming the first field whose JSON type no family reads it as."""
    check_field_types(hf, CONFIG_JSON_TYPES, source)
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key) or {}
        check_field_types(rope, ROPE_JSON_TYPES, f"{source}: {key}")
        for kind in ("full_attention", "sliding_attention"):
            check_field_types(rope.get(kind) or {}, ROPE_JSON_TYPES, f"{source}: {key}.{kind}")
        for factors in ("long_factor", "short_factor"):
            if not all(json_type(x) in ("int", "number") for x in rope.get(factors) or []):
                raise ConfigError(f"{source}: {key}.{factors} must be an array of numbers")


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """From a Hugging Face config.json dict."""
    check_config_json(hf, source)
    model_type = hf.get("model_type") or ""
    family = hf_family(model_type)
    if family is None:
        arch = (hf.get("architectures") or [model_type or "<missing model_type>"])[0]
        raise UnsupportedArchitecture(
            f"unsupported architecture {arch!r} (model_type {model_type!r}); "
            f"supported: {', '.join(supported_model_types())}"
        )
    try:
        hidden, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        sliding = hf.get("sliding_window")
        kw = {
            "model_type": model_type,
            "family": family.name,
            "vocab_size": int(hf["vocab_size"]),
            "hidden_size": hidden,
            "n_layers": layer_count(hf["num_hidden_layers"], "num_hidden_layers"),
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
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_ids": eos_ids,
        }
        return ModelConfig(**{**kw, **family.config_from_hf(hf)})
    except ConfigError as e:
        raise named(e, source) from None
    except KeyError as e:
        raise ConfigError(f"{source} lacks required field {e.args[0]!r}") from None
    except (TypeError, ValueError, ArithmeticError, IndexError) as e:
        # values of the right JSON type that still do not make a model (a head count of 0)
        raise ConfigError(f"{source} has a malformed field: {type(e).__name__}: {e}") from None


def layer_count(value: Any, key: str) -> int:
    """A checkpoint's layer count, checked before a family builds anything per layer."""
    n = int(value)
    if not 0 < n <= MAX_LAYERS:
        raise ConfigError(f"{key} must be in 1..{MAX_LAYERS}, got {str(value):.40}")
    return n


def config_from_json_file(path: str | Path) -> ModelConfig:
    """From a config.json file."""
    path = Path(path)
    return config_from_hf(read_json_object(path), str(path))


# {arch}.{key} metadata that is text, or may hold one value per layer; every other key a family
# reads is one number
GGUF_STRING_KEYS = frozenset({"rope.scaling.type"})
GGUF_PER_LAYER_KEYS = frozenset({
    "attention.head_count", "attention.head_count_kv", "feed_forward_length",
    "attention.sliding_window_pattern",
})  # fmt: skip


def config_from_gguf(meta: Mapping[str, Any], tensor_names: set[str]) -> ModelConfig:
    """From GGUF metadata (plain Python values) and the names of the tensors in the file."""
    arch = meta.get("general.architecture", "<missing general.architecture>")
    if not isinstance(arch, str):
        raise ConfigError(f"GGUF metadata general.architecture must be a string, got {arch!r}")
    try:
        return _config_from_gguf(meta, arch, tensor_names)
    except ConfigError:
        raise
    except (TypeError, ValueError, ArithmeticError, IndexError, KeyError) as e:
        # values of the right type that still do not make a model (a head count of 0)
        raise ConfigError(f"GGUF metadata is malformed: {type(e).__name__}: {e}") from None


def _config_from_gguf(meta: Mapping[str, Any], arch: str, tensor_names: set[str]) -> ModelConfig:
    found = gguf_family(meta)
    if found is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture {arch!r}; supported: {', '.join(supported_gguf_archs())}"
        )
    family, model_type = found

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ConfigError(f"GGUF metadata lacks {arch}.{key}")
        if isinstance(value, str) != (key in GGUF_STRING_KEYS):
            kind = "text" if key in GGUF_STRING_KEYS else "a number"
            raise ConfigError(f"GGUF metadata {arch}.{key} must be {kind}, got {value!r:.80}")
        if not isinstance(value, (str, bool, int, float)) and (
            key not in GGUF_PER_LAYER_KEYS
            or not all(isinstance(v, (bool, int, float)) for v in value)
        ):
            raise ConfigError(f"GGUF metadata {arch}.{key} must be a number, got an array")
        return value

    hidden, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(get("vocab_size", 0) or (len(tokens) if tokens else 0))
    scaling = None
    stype = get("rope.scaling.type", "none")
    if stype and stype not in ("none",):
        scaling = {
            "rope_type": stype,
            "factor": float(get("rope.scaling.factor", 1.0)),
            "original_max_position_embeddings": int(get("rope.scaling.original_context_length", 0)),
        }
    bos, eos, eot = (_token_id(meta, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot"))
    eos_ids = [] if eos is None else [eos]
    if eot is not None and eot not in eos_ids:
        eos_ids.append(eot)
    sliding = get("attention.sliding_window", 0)
    n_layers = layer_count(get("block_count"), f"{arch}.block_count")
    kw = {
        "model_type": model_type,
        "family": family.name,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": int(n_kv if not isinstance(n_kv, list) else n_kv[0]),
        "head_dim": int(get("attention.key_length", 0) or hidden // n_heads),
        "intermediate_size": int(get("feed_forward_length")),
        "norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": scaling,
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "sliding_window": int(sliding) if sliding else None,
        "bos_token_id": bos,
        "eos_token_ids": tuple(eos_ids),
    }
    return ModelConfig(**{**kw, **family.config_from_gguf(get, n_layers, tensor_names)})


def _token_id(meta: Mapping[str, Any], key: str) -> int | None:
    value = meta.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"GGUF metadata {key} must be a token id, got {value!r:.80}")
    return value


def named(e: ConfigError, source: str) -> ConfigError:
    """e, its message led by the file it is about (unless it names it already)."""
    return e if source in str(e) else type(e)(f"{source}: {e}")
