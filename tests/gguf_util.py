"""Test helper: write a GGUF from a tiny HF checkpoint dir the way llama.cpp's convert_hf_to_gguf does.

Independent of tinyserve's reader on purpose: tensor names come from gguf-py's own TensorNameMap,
special tokens / merges / chat template from gguf-py's SpecialVocab, quantization from
gguf.quants.quantize.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType

# HF model_type -> GGUF general.architecture (convert registers MistralForCausalLM as llama)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED_QK = {"llama"}  # "normal" (interleaved) rope in llama.cpp: q/k rows are permuted


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """(R, ...) -> (R, ...): LlamaModel.permute from convert_hf_to_gguf.py, transcribed."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def load_safetensors_f32(path: Path) -> dict[str, np.ndarray]:
    """model.safetensors -> float32 arrays (F32/F16/BF16), parsing the header directly."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = memoryview(raw)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        buf = np.frombuffer(body[begin:end], dtype=np.uint8)
        dtype = info["dtype"]
        if dtype == "F32":
            arr = buf.view("<f4")
        elif dtype == "F16":
            arr = buf.view("<f2").astype(np.float32)
        elif dtype == "BF16":
            arr = (buf.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{name}: unsupported safetensors dtype {dtype}")
        out[name] = arr.reshape(info["shape"]).astype(np.float32)
    return out


def _vocab(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """tokenizer.json -> (tokens, token types) padded to vocab_size, like convert's get_vocab_base."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(tok["model"]["vocab"])
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for tid, a in added.items():
        vocab[a["content"]] = tid
    reverse = {tid: t for t, tid in vocab.items()}
    size = max(vocab_size, max(reverse) + 1)
    tokens, types = [], []
    for i in range(size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            special = added[i].get("special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def llama3_rope_factors(theta: float, dim: int, rs: dict) -> np.ndarray:
    """Per-frequency divisors, as convert_hf_to_gguf.py stores Llama 3.1 scaling (rope_freqs)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old = float(rs["original_max_position_embeddings"])
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_gguf_from_hf_dir(
    hf_dir: str | Path,
    out_path: str | Path,
    qtype_for: Callable[[str, np.ndarray], GGMLQuantizationType] = (
        lambda name, arr: GGMLQuantizationType.F32
    ),
    pre: str = "default",
) -> Path:
    """Convert config.json + model.safetensors + tokenizer.json into a GGUF file.

    qtype_for(hf_name, array) picks the type of each 2-D tensor; 1-D tensors (norms, biases)
    stay F32 as in convert_hf_to_gguf. Returns out_path.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    model_type = cfg["model_type"]
    arch = GGUF_ARCH[model_type]
    n_layers = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)

    w = gguf.GGUFWriter(out_path, arch)
    w.add_name(hf_dir.name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    rope = cfg.get("rope_parameters") or {}  # transformers >= 5 spelling
    theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") or rope
    w.add_rope_freq_base(theta)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(int(cfg["vocab_size"]))

    tokens, types = _vocab(hf_dir, int(cfg["vocab_size"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    # merges, bos/eos/pad ids, add_bos_token, chat template: as convert does it
    gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)

    name_map = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_layers
    )
    tied = bool(cfg.get("tie_word_embeddings", False))
    for hf_name, arr in load_safetensors_f32(hf_dir / "model.safetensors").items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name}")
        if arch in PERMUTED_QK and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = llama_cpp_permute(arr, n_head, n_head)
        if arch in PERMUTED_QK and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = llama_cpp_permute(arr, n_head, n_kv)
        qtype = qtype_for(hf_name, arr) if arr.ndim == 2 else GGMLQuantizationType.F32
        data = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)
        w.add_tensor(gguf_name, data, raw_dtype=qtype)

    if (scaling.get("rope_type") or scaling.get("type")) == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(theta, head_dim, scaling))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path
