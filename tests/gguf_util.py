"""Test helper: write a GGUF from a tiny HF checkpoint dir the way llama.cpp's convert_hf_to_gguf does.

Independent of tinyserve's reader on purpose: tensor names come from gguf-py's own TensorNameMap,
special tokens / merges / chat template from gguf-py's SpecialVocab, quantization from
gguf.quants.quantize. Per family it transcribes what convert_hf_to_gguf.py's model class does
(ggml-org/llama.cpp): LlamaModel (q/k permuted; Mixtral's experts stacked into ffn_*_exps),
Gemma3Model (RMSNorm gains stored as 1 + w), Phi3MiniModel (fused attn_qkv / ffn_up kept as they
are, LongRoPE factors as rope_factors_long/short tensors), DeepseekV2Model (arch deepseek2: MLA
as MQA with one kv head, experts stacked, e_score_correction_bias -> exp_probs_b.bias, kv_b split
into attn_k_b (transposed) / attn_v_b).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType

# HF model_type -> GGUF general.architecture (convert registers MistralForCausalLM and
# MixtralForCausalLM as llama, DeepseekV3ForCausalLM as deepseek2)
GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "deepseek_v3": "deepseek2",
    "kimi_k2": "deepseek2",
}
PERMUTED_QK = {"llama"}  # "normal" (interleaved) rope in llama.cpp: q/k rows are permuted
# convert's prepare_tensors keeps these in float32 whatever the output type (the MoE router)
ALWAYS_F32 = ("ffn_gate_inp.weight",)


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
    factor, low, high = (
        float(rs["factor"]),
        float(rs["low_freq_factor"]),
        float(rs["high_freq_factor"]),
    )
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
    split_kv_b: bool = True,
) -> Path:
    """Convert config.json + model.safetensors + tokenizer.json into a GGUF file.

    qtype_for(hf_name, array) picks the type of each tensor of 2 or more dims; 1-D tensors (norms,
    biases) and the MoE router stay F32 as in convert_hf_to_gguf, and a tensor whose rows do not
    split into whole blocks falls back to F16 as there. split_kv_b (DeepSeek only): write MLA's
    kv_b as attn_k_b / attn_v_b like current convert_hf_to_gguf.py, or as one attn_kv_b like
    converters before the split. Returns out_path.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    model_type = cfg["model_type"]
    arch = GGUF_ARCH[model_type]
    n_layers = int(cfg["num_hidden_layers"])

    w = gguf.GGUFWriter(out_path, arch)
    w.add_name(hf_dir.name)
    _common_meta(w, cfg, arch)
    extra = _FAMILY_META[arch](w, cfg)  # {gguf name: float32 array} written after the weights

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
    tensors = load_safetensors_f32(hf_dir / "model.safetensors")
    if bool(cfg.get("tie_word_embeddings", False)):
        tensors.pop("lm_head.weight", None)
    for hf_name, arr in _FAMILY_TENSORS[arch](cfg, tensors, hf_dir, split_kv_b):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name}")
        data, qtype = _encode(gguf_name, arr, qtype_for(hf_name, arr) if arr.ndim >= 2 else None)
        w.add_tensor(gguf_name, data, raw_dtype=qtype)
    for gguf_name, arr in extra.items():
        w.add_tensor(gguf_name, np.asarray(arr, dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def _encode(gguf_name: str, arr: np.ndarray, qtype: GGMLQuantizationType | None):
    """-> (data, qtype): F32 for 1-D tensors and the router, F16 where rows are not whole blocks."""
    if qtype is None or gguf_name.endswith(ALWAYS_F32):
        qtype = GGMLQuantizationType.F32
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    try:
        return gguf.quants.quantize(arr, qtype), qtype
    except gguf.QuantError:  # convert: "falling back to F16"
        return gguf.quants.quantize(arr, GGMLQuantizationType.F16), GGMLQuantizationType.F16


# -- metadata ------------------------------------------------------------------------------------


def _rope_params(cfg: dict) -> dict:
    """TextModel.__init__'s rope_parameters: rope_parameters or rope_scaling, theta mirrored in."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "full_attention" not in rp and "sliding_attention" not in rp:
        if cfg.get("rope_local_base_freq") is not None:
            rp["sliding_attention"] = {"rope_theta": cfg["rope_local_base_freq"]}
        if "rope_theta" not in rp and cfg.get("rope_theta") is not None:
            rp["rope_theta"] = cfg["rope_theta"]
        if "rope_type" not in rp and rp.get("type") is not None:
            rp["rope_type"] = rp["type"]
    return rp


def _common_meta(w: gguf.GGUFWriter, cfg: dict, arch: str) -> None:
    """TextModel.set_gguf_parameters: sizes, heads, norm eps, rope base and scaling, experts."""
    n_head = int(cfg["num_attention_heads"])
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    # deepseek2: "MLA converts into MQA (ie: GQA with 1 group)"
    w.add_head_count_kv(1 if arch == "deepseek2" else int(cfg.get("num_key_value_heads") or n_head))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    rp = _rope_params(cfg)
    full = rp.get("full_attention", rp)
    w.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    rope_type, factor = full.get("rope_type"), full.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(full["original_max_position_embeddings"]))
        if full.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(full["beta_fast"]))
        if full.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(full["beta_slow"]))
    if (local := rp.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(float(local))
    n_experts = cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    if n_experts is not None:
        w.add_expert_count(int(n_experts))
    if cfg.get("num_experts_per_tok") is not None:
        w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    if cfg.get("n_group") is not None:
        w.add_expert_group_count(int(cfg["n_group"]))
    if cfg.get("topk_group") is not None:
        w.add_expert_group_used_count(int(cfg["topk_group"]))
    w.add_vocab_size(int(cfg["vocab_size"]))


def _llama_meta(w: gguf.GGUFWriter, cfg: dict) -> dict[str, np.ndarray]:
    """LlamaModel: rope over the whole head; Llama 3.1 scaling as a rope_freqs tensor."""
    hidden, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rp = _rope_params(cfg)
    if rp.get("rope_type") == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(float(rp["rope_theta"]), head_dim, rp)}
    return {}


def _gemma3_meta(w: gguf.GGUFWriter, cfg: dict) -> dict[str, np.ndarray]:
    """Gemma3Model: head_dim k/v lengths, final soft-capping, the sliding window.

    Two keys go beyond what convert writes, because llama.cpp's Gemma 3 graph hard-codes them
    (every 6th layer global, softmax scale 1/sqrt(head_dim)) and the tiny fixture differs:
    attention.sliding_window_pattern (one flag per layer, True = sliding) when layer_types is not
    that default, and attention.scale when query_pre_attn_scalar is not head_dim."""
    n = int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim", 256))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    if cfg.get("sliding_window_pattern") != 1:
        w.add_sliding_window(int(cfg["sliding_window"]))
    types = cfg.get("layer_types")
    if types and [t == "sliding_attention" for t in types] != [(i + 1) % 6 != 0 for i in range(n)]:
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    scalar = cfg.get("query_pre_attn_scalar")
    if scalar is not None and float(scalar) != float(head_dim):
        w.add_float32(gguf.Keys.Attention.SCALE.format(arch="gemma3"), float(scalar) ** -0.5)
    return {}


def _phi3_meta(w: gguf.GGUFWriter, cfg: dict) -> dict[str, np.ndarray]:
    """Phi3MiniModel: partial rotary dims, LongRoPE factors as tensors plus their attn_factor."""
    rp = _rope_params(cfg)
    n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    max_pos = int(cfg["max_position_embeddings"])
    orig = int(
        rp.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"]
    )
    rot_pct = float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    rope_dims = int(rot_pct * n_embd) // n_head
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_rope_dimension_count(rope_dims)
    w.add_sliding_window(int(cfg.get("sliding_window") or 0))  # 0 marks "not Phi-4"
    long, short = rp.get("long_factor"), rp.get("short_factor")
    if not long:
        return {}
    scale = max_pos / orig
    kind = rp.get("rope_type", rp.get("type", "")).lower()
    if kind in ("su", "longrope"):
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    else:  # "yarn"
        attn_factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    w.add_rope_scaling_attn_factors(attn_factor)
    if len(long) != len(short) or len(long) != rope_dims // 2:
        raise ValueError(f"LongRoPE factors must have {rope_dims // 2} entries")
    return {
        "rope_factors_long.weight": np.asarray(long, dtype=np.float32),
        "rope_factors_short.weight": np.asarray(short, dtype=np.float32),
    }


def _deepseek2_meta(w: gguf.GGUFWriter, cfg: dict) -> dict[str, np.ndarray]:
    """DeepseekV2Model: MLA ranks and head sizes, MoE layout and routing, YaRN's log multiplier.

    The gating function comes from config.json's scoring_func as in convert; transformers'
    DeepseekV3 always scores with a sigmoid and its configs may omit the key, so sigmoid is the
    default here (llama.cpp would fall back to softmax for a deepseek2 file without the key)."""
    r, dr = int(cfg.get("kv_lora_rank", 512)), int(cfg["qk_rope_head_dim"])
    n_layers = int(cfg["num_hidden_layers"])
    has_moe = cfg.get("n_routed_experts") is not None
    dense = cfg.get("first_k_dense_replace")
    w.add_leading_dense_block_count(
        int(dense if dense is not None else (0 if has_moe else n_layers))
    )
    if cfg.get("q_lora_rank") is not None:
        w.add_q_lora_rank(int(cfg["q_lora_rank"]))
    w.add_kv_lora_rank(r)
    w.add_key_length(r + dr)
    w.add_value_length(r)
    w.add_key_length_mla(int(cfg["qk_nope_head_dim"]) + dr)
    w.add_value_length_mla(int(cfg["v_head_dim"]))
    w.add_expert_feed_forward_length(
        int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    )
    w.add_expert_shared_count(int(cfg.get("n_shared_experts") or 0))
    if cfg.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(float(cfg["routed_scaling_factor"]))
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    gating = {
        "sigmoid": gguf.ExpertGatingFuncType.SIGMOID,
        "softmax": gguf.ExpertGatingFuncType.SOFTMAX,
    }
    w.add_expert_gating_func(gating[cfg.get("scoring_func", "sigmoid")])
    w.add_rope_dimension_count(dr)
    if (mscale_all := _rope_params(cfg).get("mscale_all_dim")) is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * float(mscale_all))  # deepseek2's legacy convention
    return {}


_FAMILY_META = {
    "llama": _llama_meta,
    "qwen2": _llama_meta,
    "qwen3": _llama_meta,
    "gemma3": _gemma3_meta,
    "phi3": _phi3_meta,
    "deepseek2": _deepseek2_meta,
}


# -- tensors -------------------------------------------------------------------------------------

Tensors = Iterator[tuple[str, np.ndarray]]


def _llama_tensors(cfg: dict, t: dict[str, np.ndarray], hf_dir: Path, split_kv_b: bool) -> Tensors:
    """LlamaModel.modify_tensors: q/k permuted (llama arch only), Mixtral experts stacked (E, out, in)."""
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    permute = GGUF_ARCH[cfg["model_type"]] in PERMUTED_QK
    for name, arr in t.items():
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = llama_cpp_permute(arr, n_head, n_head)
        if permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = llama_cpp_permute(arr, n_head, n_kv)
        if ".block_sparse_moe.experts." not in name:
            yield name, arr
    for i in range(int(cfg["num_hidden_layers"])):
        prefix = f"model.layers.{i}.block_sparse_moe.experts"
        for wid in ("w1", "w2", "w3"):  # gate, down, up
            if f"{prefix}.0.{wid}.weight" in t:
                n_experts = int(cfg["num_local_experts"])
                stack = np.stack([t[f"{prefix}.{e}.{wid}.weight"] for e in range(n_experts)])
                yield f"{prefix}.{wid}.weight", stack  # (E, out, in)


def _gemma3_tensors(cfg: dict, t: dict[str, np.ndarray], hf_dir: Path, split_kv_b: bool) -> Tensors:
    """Gemma3Model.modify_tensors: norm gains + 1 (Gemma3RMSNorm's 1 + w), embedding rows past
    the tokenizer's vocabulary dropped."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    n_vocab_real = len(tok["model"]["vocab"]) + len(tok["added_tokens"])
    for name, arr in t.items():
        if "embed_tokens.weight" in name:
            arr = arr[:n_vocab_real]
        if name.endswith("norm.weight"):
            arr = arr + np.float32(1.0)
        yield name, arr


def _phi3_tensors(cfg: dict, t: dict[str, np.ndarray], hf_dir: Path, split_kv_b: bool) -> Tensors:
    """Phi3MiniModel: tensors as they are (qkv_proj -> attn_qkv, gate_up_proj -> ffn_up)."""
    yield from t.items()


def _deepseek2_tensors(
    cfg: dict, t: dict[str, np.ndarray], hf_dir: Path, split_kv_b: bool
) -> Tensors:
    """DeepseekV2Model.modify_tensors: MTP layers skipped, router bias renamed, experts stacked,
    kv_b split into k_b (H, r, dn), transposed for the absorbed product, and v_b (H, dv, r)."""
    n_layers = int(cfg["num_hidden_layers"])
    n_head = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    dn, dv = int(cfg["qk_nope_head_dim"]), int(cfg["v_head_dim"])
    for name, arr in t.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= n_layers:
            continue  # multi-token-prediction layers
        if ".mlp.experts." in name:
            continue  # stacked below
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        if name.endswith("kv_b_proj.weight") and split_kv_b:
            kv_b = arr.reshape(n_head, dn + dv, arr.shape[-1])  # (H, dn + dv, r)
            yield (
                name.replace("kv_b_proj", "k_b_proj"),
                kv_b[:, :dn].transpose(0, 2, 1),
            )  # (H, r, dn)
            yield name.replace("kv_b_proj", "v_b_proj"), kv_b[:, dn:]  # (H, dv, r)
            continue
        yield name, arr
    for i in range(n_layers):
        prefix = f"model.layers.{i}.mlp.experts"
        if f"{prefix}.0.down_proj.weight" not in t:
            continue
        n_experts = int(cfg["n_routed_experts"])
        for w_name in ("down_proj", "gate_proj", "up_proj"):
            stack = np.stack([t[f"{prefix}.{e}.{w_name}.weight"] for e in range(n_experts)])
            yield f"{prefix}.{w_name}.weight", stack  # (E, out, in)


_FAMILY_TENSORS = {
    "llama": _llama_tensors,
    "qwen2": _llama_tensors,
    "qwen3": _llama_tensors,
    "gemma3": _gemma3_tensors,
    "phi3": _phi3_tensors,
    "deepseek2": _deepseek2_tensors,
}


# -- hostile files: GGUF and safetensors written byte by byte, so that they can lie ------------

GGUF_U32, GGUF_F32, GGUF_STRING, GGUF_ARRAY, GGUF_U64 = 4, 6, 8, 9, 10


def gguf_str(s: str | bytes) -> bytes:
    """A GGUF string: u64 length, then the bytes."""
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key: str, vtype: int, payload: bytes) -> bytes:
    """One metadata key/value: the key, the value type, the value's bytes as given."""
    return gguf_str(key) + struct.pack("<I", vtype) + payload


def gguf_array(item_type: int, count: int, items: bytes = b"") -> bytes:
    """An array value's payload: its item type and declared count, then whatever items follow."""
    return struct.pack("<IQ", item_type, count) + items


def gguf_tensor_info(name: str, dims: tuple[int, ...], qtype: int, offset: int) -> bytes:
    """One tensor record; dims in ggml order (innermost first), offset from the data start."""
    return (
        gguf_str(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", qtype, offset)
    )


def raw_gguf(
    kvs: list[bytes],
    infos: list[bytes],
    data: bytes = b"",
    n_kv: int | None = None,
    n_tensors: int | None = None,
    alignment: int = 32,
) -> bytes:
    """A GGUF v3 file from encoded key/values and tensor records; the counts may lie."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)  # fmt: skip
    head += b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


def raw_gguf_tensors(
    tensors: list[tuple[str, np.ndarray | bytes, int, tuple[int, ...]]],
    offsets: list[int] | None = None,
    kvs: list[bytes] = (),
    alignment: int = 32,
) -> bytes:
    """A GGUF holding tensors [(name, data, ggml type, dims)], laid out aligned one after another
    unless offsets says where each starts (they may overlap, repeat or be misaligned)."""
    blobs = [np.ascontiguousarray(d).tobytes() if isinstance(d, np.ndarray) else d
             for _, d, _, _ in tensors]  # fmt: skip
    if offsets is None:
        offsets, at = [], 0
        for b in blobs:
            offsets.append(at)
            at += len(b) + (-len(b) % alignment)
    size = max([o + len(b) for o, b in zip(offsets, blobs)], default=0)
    data = bytearray(size)
    for o, b in zip(offsets, blobs):
        data[o : o + len(b)] = b
    kvs = [gguf_kv("general.architecture", GGUF_STRING, gguf_str("llama")), *kvs]
    infos = [gguf_tensor_info(n, dims, q, o) for (n, _, q, dims), o in zip(tensors, offsets)]
    return raw_gguf(kvs, infos, bytes(data), alignment=alignment)


def raw_safetensors(header: dict | str | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    """A safetensors file: an 8-byte header length (may lie), the JSON header as given, the data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    h = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(h) if n is None else n) + h + data
