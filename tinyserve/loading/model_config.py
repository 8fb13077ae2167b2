"""ModelConfig from a checkpoint's own description: config.json or GGUF metadata.

The fields every family shares are read here; the family serving the checkpoint (found through
tinyserve/models/registry.py) reads its own and they override these.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import ConfigError, UnsupportedArchitecture
from ..models.family import rope_scaling_from_hf
from ..models.registry import gguf_family, hf_family, supported_gguf_archs, supported_model_types


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """From a Hugging Face config.json dict."""
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
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_ids": eos_ids,
        }
        return ModelConfig(**{**kw, **family.config_from_hf(hf)})
    except KeyError as e:
        raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json has a malformed field: {e}") from None


def config_from_json_file(path: str | Path) -> ModelConfig:
    """From a config.json file."""
    try:
        hf = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return config_from_hf(hf)


def config_from_gguf(meta: Mapping[str, Any], tensor_names: set[str]) -> ModelConfig:
    """From GGUF metadata (plain Python values) and the names of the tensors in the file."""
    arch = meta.get("general.architecture", "<missing general.architecture>")
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
    n_layers = int(get("block_count"))
    kw = {
        "model_type": model_type,
        "family": family.name,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "n_layers": n_layers,
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
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_ids": tuple(eos_ids),
    }
    return ModelConfig(**{**kw, **family.config_from_gguf(get, n_layers, tensor_names)})
