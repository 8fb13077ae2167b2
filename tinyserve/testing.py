"""The backend conformance kit: any backend, checked against the NumPy reference (needs pytest).

A backend author runs it with pytest from a test module of their own:

    from tinyserve.testing import conformance_tests
    TestMyBackend = conformance_tests("mybackend", device="cuda", dtype="bfloat16")

or subclasses `BackendConformance`, or calls the `check_*` functions directly. What it checks:
op parity against NumpyOps on random inputs (tolerances by dtype); logits parity on tiny random
checkpoints of every supported architecture variant - the Llama family, Gemma 3, Mixtral, Phi-3,
DeepSeek-V3 (built in-process, so nothing to download; the numpy backend is itself checked against
transformers by tests/test_hf_parity.py and tests/test_models_extra.py); greedy decoding picking
the reference's argmax; a batch of sequences == each sequence alone; a fragmented block pool == a
contiguous one; chunked prefill + cached decode == one full forward.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import create_backend
from .backends.numpy_backend import NumpyBackend
from .backends.numpy_ops import NumpyOps
from .batch import Batch
from .config import ModelConfig
from .engine import Engine, EngineConfig
from .loading import Checkpoint
from .models import build_model
from .models.rope import rope_inv_freq
from .sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class Tolerance:
    """Per compute dtype: op outputs (rtol, atol) and model logits (atol in units of their std)."""

    rtol: float
    atol: float
    logits: float


TOLERANCES = {
    "float32": Tolerance(rtol=1e-4, atol=1e-5, logits=1e-4),
    "float16": Tolerance(rtol=5e-3, atol=5e-3, logits=1.5e-2),
    "bfloat16": Tolerance(rtol=3e-2, atol=3e-2, logits=1e-1),
}


def tolerance(backend) -> Tolerance:
    dtype = getattr(backend, "dtype", None) or "float32"
    if dtype not in TOLERANCES:
        raise ValueError(
            f"no conformance tolerance for dtype {dtype!r}; known: {', '.join(TOLERANCES)}"
        )
    return TOLERANCES[dtype]


# -- tiny random checkpoints, one per architecture variant ----------------------------------------

_BASE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "eos_token_id": 1,
    "bos_token_id": 0,
}
_DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "q_lora_rank": 24,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "n_routed_experts": 8,
    "num_experts_per_tok": 3,
    "n_group": 4,
    "topk_group": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "rope_interleave": True,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "mscale": 1.0,
        "mscale_all_dim": 0.8,
        "beta_fast": 32,
        "beta_slow": 1,
    },
}
# name -> (config.json overrides, how the weights are stored). The variants of tests/fixtures/hf.
ARCHITECTURES: dict[str, tuple[dict[str, Any], str]] = {
    "llama": (
        {
            "model_type": "llama",
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
        "float32",
    ),
    "llama_mqa": ({"model_type": "llama", "num_key_value_heads": 1}, "float32"),
    "smollm2": ({"model_type": "llama", "tie_word_embeddings": True}, "float32"),
    "mistral": ({"model_type": "mistral", "sliding_window": 8}, "float32"),
    "qwen2": ({"model_type": "qwen2"}, "float32"),  # q/k/v bias
    "qwen3": ({"model_type": "qwen3", "head_dim": 32}, "float32"),  # q/k norm, Dh != D / H
    "llama_bf16": ({"model_type": "llama"}, "bfloat16"),
    "llama_f16": ({"model_type": "llama"}, "float16"),
    "llama_q8_0": ({"model_type": "llama"}, "Q8_0"),  # GGUF blocks, dequantized by the backend
    "llama_q4_0": ({"model_type": "llama"}, "Q4_0"),
    # the newer families, as tests/fixtures/hf has them (tests/make_fixtures.py), vocab 128
    "gemma3": (
        {
            "model_type": "gemma3_text",
            "num_hidden_layers": 3,
            "head_dim": 16,
            "query_pre_attn_scalar": 24,  # != head_dim: the softmax scale comes from this
            "sliding_window": 6,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {  # global: theta 1e6, linear x4; local: theta 1e4, unscaled
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            "final_logit_softcapping": 10.0,
            "hidden_activation": "gelu_pytorch_tanh",
        },
        "float32",
    ),
    "mixtral": (
        {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
        "float32",
    ),
    "phi3": (  # fused qkv / gate_up, partial rotary, LongRoPE switching at 16 tokens
        {
            "model_type": "phi3",
            "partial_rotary_factor": 0.75,
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 16,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": 16,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
            },
            "tie_word_embeddings": True,
        },
        "float32",
    ),
    "deepseek_v3": (_DEEPSEEK_V3, "float32"),  # MLA with q LoRA, YaRN, grouped sigmoid MoE
    "deepseek_v3_qlora": ({**_DEEPSEEK_V3, "q_lora_rank": None}, "float32"),  # q_proj, no LoRA
}
# mixtures of experts: a router's top-k is a discrete choice (see _pinned_routing)
MOE_ARCHITECTURES = ("mixtral", "deepseek_v3", "deepseek_v3_qlora")


GREEDY_ARCHITECTURES = ["llama", "mistral", "qwen3", "llama_q8_0", "gemma3", "phi3", "deepseek_v3"]


def tiny_checkpoint(arch: str = "llama", seed: int = 0) -> Checkpoint:
    """A random checkpoint of the named variant (see ARCHITECTURES), built in memory."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture variant {arch!r}; known: {', '.join(ARCHITECTURES)}"
        )
    overrides, storage = ARCHITECTURES[arch]
    cfg = ModelConfig.from_hf({**_BASE, **overrides})
    rng = np.random.default_rng(seed)
    D, V = cfg.hidden_size, cfg.vocab_size
    tensors: dict[str, Any] = {}

    def matrix(name: str, rows: int, cols: int, std: float | None = None) -> None:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * (std or 1 / math.sqrt(cols))
        tensors[name] = _stored(w, storage)

    def vector(name: str, size: int, mean: float = 1.0) -> None:
        tensors[name] = (mean + 0.1 * rng.standard_normal(size, dtype=np.float32)).astype(
            np.float32
        )

    matrix("model.embed_tokens.weight", V, D, std=1.0)
    _FAMILY_TENSORS.get(cfg.model_type, _llama_tensors)(cfg, matrix, vector)
    if not cfg.tie_word_embeddings:
        matrix("lm_head.weight", V, D, std=2 / math.sqrt(D))
    return Checkpoint(Path(f"<tiny {arch}>"), "safetensors", cfg, tensors)


def _llama_tensors(cfg: ModelConfig, matrix, vector) -> None:
    D, F = cfg.hidden_size, cfg.intermediate_size
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        vector(f"{p}.input_layernorm.weight", D)
        vector(f"{p}.post_attention_layernorm.weight", D)
        for name, rows in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
            matrix(f"{p}.self_attn.{name}_proj.weight", rows, D)
            if cfg.model_type == "qwen2":
                vector(f"{p}.self_attn.{name}_proj.bias", rows, mean=0.0)
        matrix(f"{p}.self_attn.o_proj.weight", D, cfg.q_size)
        if cfg.qk_norm:
            vector(f"{p}.self_attn.q_norm.weight", cfg.head_dim)
            vector(f"{p}.self_attn.k_norm.weight", cfg.head_dim)
        matrix(f"{p}.mlp.gate_proj.weight", F, D)
        matrix(f"{p}.mlp.up_proj.weight", F, D)
        matrix(f"{p}.mlp.down_proj.weight", D, F)
    vector("model.norm.weight", D)


def _gemma3_tensors(cfg: ModelConfig, matrix, vector) -> None:
    D, F = cfg.hidden_size, cfg.intermediate_size
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            vector(f"{p}.{norm}_layernorm.weight", D, mean=0.0)  # Gemma applies 1 + w
        for name, rows in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
            matrix(f"{p}.self_attn.{name}_proj.weight", rows, D)
        matrix(f"{p}.self_attn.o_proj.weight", D, cfg.q_size)
        vector(f"{p}.self_attn.q_norm.weight", cfg.head_dim, mean=0.0)
        vector(f"{p}.self_attn.k_norm.weight", cfg.head_dim, mean=0.0)
        matrix(f"{p}.mlp.gate_proj.weight", F, D)
        matrix(f"{p}.mlp.up_proj.weight", F, D)
        matrix(f"{p}.mlp.down_proj.weight", D, F)
    vector("model.norm.weight", D, mean=0.0)


def _mixtral_tensors(cfg: ModelConfig, matrix, vector) -> None:
    D, F = cfg.hidden_size, cfg.moe_intermediate_size or cfg.intermediate_size
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        vector(f"{p}.input_layernorm.weight", D)
        vector(f"{p}.post_attention_layernorm.weight", D)
        for name, rows in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
            matrix(f"{p}.self_attn.{name}_proj.weight", rows, D)
        matrix(f"{p}.self_attn.o_proj.weight", D, cfg.q_size)
        moe = f"{p}.block_sparse_moe"
        matrix(f"{moe}.gate.weight", cfg.n_experts, D, std=1.0)  # router: spread-out choices
        for e in range(cfg.n_experts):
            matrix(f"{moe}.experts.{e}.w1.weight", F, D)
            matrix(f"{moe}.experts.{e}.w3.weight", F, D)
            matrix(f"{moe}.experts.{e}.w2.weight", D, F)
    vector("model.norm.weight", D)


def _phi3_tensors(cfg: ModelConfig, matrix, vector) -> None:
    D, F = cfg.hidden_size, cfg.intermediate_size
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        vector(f"{p}.input_layernorm.weight", D)
        vector(f"{p}.post_attention_layernorm.weight", D)
        matrix(f"{p}.self_attn.qkv_proj.weight", cfg.q_size + 2 * cfg.kv_size, D)
        matrix(f"{p}.self_attn.o_proj.weight", D, cfg.q_size)
        matrix(f"{p}.mlp.gate_up_proj.weight", 2 * F, D)
        matrix(f"{p}.mlp.down_proj.weight", D, F)
    vector("model.norm.weight", D)


def _deepseek_v3_tensors(cfg: ModelConfig, matrix, vector) -> None:
    D, H, E = cfg.hidden_size, cfg.n_heads, cfg.n_experts
    dn, dr, dv, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for i in range(cfg.n_layers):
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        vector(f"{p}.input_layernorm.weight", D)
        vector(f"{p}.post_attention_layernorm.weight", D)
        if cfg.q_lora_rank is not None:
            matrix(f"{a}.q_a_proj.weight", cfg.q_lora_rank, D)
            vector(f"{a}.q_a_layernorm.weight", cfg.q_lora_rank)
            matrix(f"{a}.q_b_proj.weight", H * (dn + dr), cfg.q_lora_rank)
        else:
            matrix(f"{a}.q_proj.weight", H * (dn + dr), D)
        matrix(f"{a}.kv_a_proj_with_mqa.weight", r + dr, D)
        vector(f"{a}.kv_a_layernorm.weight", r)
        matrix(f"{a}.kv_b_proj.weight", H * (dn + dv), r)
        matrix(f"{a}.o_proj.weight", D, H * dv)
        mlp = f"{p}.mlp"
        if i < cfg.first_k_dense_replace:
            experts, F = [mlp], cfg.intermediate_size
        else:
            F = cfg.moe_intermediate_size
            matrix(f"{mlp}.gate.weight", E, D, std=1.0)  # router
            vector(f"{mlp}.gate.e_score_correction_bias", E, mean=0.0)
            experts = [f"{mlp}.experts.{e}" for e in range(E)]
            experts.append(f"{mlp}.shared_experts")  # F x n_shared_experts (1 here)
        for m in experts:
            matrix(f"{m}.gate_proj.weight", F, D)
            matrix(f"{m}.up_proj.weight", F, D)
            matrix(f"{m}.down_proj.weight", D, F)
    vector("model.norm.weight", D)


# model_type -> the weights it reads beyond the embedding and lm_head (default: the Llama family)
_FAMILY_TENSORS = {
    "gemma3_text": _gemma3_tensors,
    "mixtral": _mixtral_tensors,
    "phi3": _phi3_tensors,
    "deepseek_v3": _deepseek_v3_tensors,
}


def _stored(w: np.ndarray, storage: str):
    """A float32 matrix the way a checkpoint would hold it."""
    if storage == "float32":
        return w
    if storage == "float16":
        return w.astype(np.float16)
    if storage == "bfloat16":
        from .loading.safetensors_file import BF16Array

        return BF16Array((w.view(np.uint32) >> 16).astype(np.uint16))  # truncated to bf16
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from .loading.gguf_file import QuantTensor

    qtype = GGMLQuantizationType[storage]
    return QuantTensor(qtype, w.shape, quantize(w, qtype))


# -- helpers --------------------------------------------------------------------------------------


def _engine(ckpt: Checkpoint, backend, **config) -> Engine:
    config = {"block_size": 4, "kv_cache_tokens": 1024, "max_num_seqs": 8, **config}
    return Engine(ckpt, None, backend, EngineConfig(**config))


def _prompts(seed: int, lengths=(11, 5, 23), vocab: int = 128) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=n).tolist() for n in lengths]


def _greedy(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[i] for i in ids]


def _close(got: np.ndarray, want: np.ndarray, atol: float, what: str) -> None:
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    assert got.shape == want.shape, f"{what}: shape {got.shape}, reference {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    assert err <= atol, f"{what}: max |diff| {err:.3g} > tolerance {atol:.3g}"


# A backend may round activations to 8 bits for its dot products with GGUF blocks (llama.cpp's
# q8 x q4 kernels do); on quantized checkpoints logits may then move by this much (x their std).
QUANTIZED_ACTIVATION_TOLERANCE = 0.1


def _logits_atol(backend, reference: np.ndarray, arch: str = "llama") -> float:
    tol = tolerance(backend).logits
    if ARCHITECTURES[arch][1].startswith("Q"):
        tol = max(tol, QUANTIZED_ACTIVATION_TOLERANCE)
    return tol * max(1.0, float(reference.std()))


# -- the checks -----------------------------------------------------------------------------------


def check_ops(backend, seed: int = 0) -> None:
    """Every op of backend.ops against NumpyOps on random inputs rounded to the backend's dtype."""
    ops, ref, tol = backend.ops, NumpyOps(), tolerance(backend)
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def put(x):  # an activation on the backend, and the float32 values it actually holds
        t = ops.from_numpy(x)
        return t, np.asarray(ops.to_numpy(t), dtype=np.float32)

    def same(got, want, what, scale=1.0):
        np.testing.assert_allclose(
            np.asarray(ops.to_numpy(got), dtype=np.float32),
            want,
            rtol=tol.rtol,
            atol=tol.atol * scale,
            err_msg=f"op {what}",
        )

    ids = rng.integers(0, 50, size=9)
    w = ops.weight(rand(50, 24))
    same(ops.embedding(ops.from_numpy(ids), w), ref.embedding(ids, ops.to_numpy(w)), "embedding")
    for n, k, m in ((1, 8, 5), (7, 64, 33), (16, 96, 64)):
        x, xr = put(rand(n, k))
        w = ops.weight(rand(m, k) / math.sqrt(k))
        same(ops.matmul(x, w), ref.matmul(xr, ops.to_numpy(w)), f"matmul {n}x{k}x{m}", scale=4)
    for shape in ((1, 8), (3, 5, 64), (7, 96)):
        x, xr = put(rand(*shape) * 3)
        g = ops.vector(rand(shape[-1]))
        same(
            ops.rms_norm(x, g, 1e-6),
            ref.rms_norm(xr, ops.to_numpy(g), 1e-6),
            f"rms_norm {shape}",
            4,
        )
    cfg = tiny_checkpoint("llama").config
    for rotary in (16, 8):  # full and partial rotary
        inv = rope_inv_freq(cfg, rotary_dim=rotary)
        pos = np.array([0, 1, 2, 7, 100, 255, 3, 4000], dtype=np.int64)
        x, xr = put(rand(8, 3, 16))
        want = ref.rope(xr, pos, inv)
        same(ops.rope(x, ops.from_numpy(pos), ops.vector(inv)), want, f"rope R={rotary}", 4)
    gate, gr = put(rand(5, 96) * 3)
    up, ur = put(rand(5, 96))
    same(ops.silu_mul(gate, up), ref.silu_mul(gr, ur), "silu_mul", 4)
    same(ops.gelu_tanh_mul(gate, up), ref.gelu_tanh_mul(gr, ur), "gelu_tanh_mul", 4)
    x, xr = put(rand(4, 3, 17) * 4)
    same(ops.softmax(x), ref.softmax(xr), "softmax")
    x, xr = put(rand(6, 50) * 20)
    same(ops.softcap(x, 10.0), ref.softcap(xr, 10.0), "softcap", 4)
    x, xr = put(rand(7, 3, 24) / 3)
    w = ops.vector(rand(3, 10, 24))  # MLA's absorbed projections are held as vectors (float32)
    same(ops.head_matmul(x, w), ref.head_matmul(xr, ops.to_numpy(w)), "head_matmul", 4)
    _check_moe(ops, rng, put, same)
    _check_kv_ops(backend, rng, same)


def _check_moe(ops, rng, put, same) -> None:
    """moe with router output as the models pass it (NumPy ids and weights), one expert unused."""
    ref = NumpyOps()
    N, D, F, E, K = 11, 32, 24, 5, 2
    x, xr = put(rng.standard_normal((N, D), dtype=np.float32))
    experts = [
        tuple(
            ops.weight(rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[1]))
            for shape in ((F, D), (F, D), (D, F))
        )
        for _ in range(E)
    ]
    dense = [tuple(np.asarray(ops.to_numpy(m), np.float32) for m in e) for e in experts]
    ids = np.stack([rng.choice(E - 1, K, replace=False) for _ in range(N)])  # (N, K): E-1 unused
    weights = rng.random((N, K)).astype(np.float32)
    for act in ("silu", "gelu_tanh"):
        want = ref.moe(xr, ids, weights, dense, act)
        same(ops.moe(x, ids, weights, experts, act), want, f"moe ({act})", 4)


def _check_kv_ops(backend, rng, same) -> None:
    """write_kv, copy_blocks and paged_attention over a fragmented pool, mixed prefill + decode."""
    ops, ref = backend.ops, NumpyOps()
    NB, BS, KVH, Dh, H = 12, 4, 2, 16, 4
    (pools,) = backend.allocate_kv([{"k": (KVH, Dh), "v": (KVH, Dh)}], NB, BS)
    k_ref = np.zeros((NB, BS, KVH, Dh), np.float32)
    v_ref = np.zeros_like(k_ref)
    # three sequences: 6 new prompt tokens, 1 decode token after 9, 3 more after 2; scattered blocks
    tables = [[7, 2], [0, 11, 5], [9, 1]]
    chunks = [(list(range(6)), 0, tables[0]), ([1], 9, tables[1]), ([4, 5, 6], 2, tables[2])]
    history = Batch.build([([0] * 9, 0, tables[1]), ([0] * 2, 0, tables[2])], BS)
    batch = Batch.build(chunks, BS)
    for b in (history, batch):
        k_new = rng.standard_normal((b.n_tokens, KVH, Dh), dtype=np.float32)
        v_new = rng.standard_normal((b.n_tokens, KVH, Dh), dtype=np.float32)
        k_t, v_t = ops.from_numpy(k_new), ops.from_numpy(v_new)
        ops.write_kv(pools["k"], k_t, ops.from_numpy(b.slots))
        ops.write_kv(pools["v"], v_t, ops.from_numpy(b.slots))
        ref.write_kv(k_ref, np.asarray(ops.to_numpy(k_t), np.float32), b.slots)
        ref.write_kv(v_ref, np.asarray(ops.to_numpy(v_t), np.float32), b.slots)
    same(pools["k"], k_ref, "write_kv")
    q = ops.from_numpy(rng.standard_normal((batch.n_tokens, H, Dh), dtype=np.float32))
    qr = np.asarray(ops.to_numpy(q), np.float32)
    for window in (None, 3):
        got = ops.paged_attention(q, pools["k"], pools["v"], batch, 0.25, window)
        want = ref.paged_attention(qr, k_ref, v_ref, batch, 0.25, window)
        same(got, want, f"paged_attention (window {window})", 2)
    # MLA (DeepSeek): one pool of [k_rope, c_kv] per token; values are a strided view of it
    (mla,) = backend.allocate_kv([{"kv": (1, Dh + 8)}], NB, BS)
    latent = ops.from_numpy(rng.standard_normal((batch.n_tokens, 1, Dh + 8), dtype=np.float32))
    ops.write_kv(mla["kv"], latent, ops.from_numpy(batch.slots))
    mla_ref = np.asarray(ops.to_numpy(mla["kv"]), np.float32)
    qm = ops.from_numpy(rng.standard_normal((batch.n_tokens, H, Dh + 8), dtype=np.float32))
    got = ops.paged_attention(qm, mla["kv"], mla["kv"][..., 8:], batch, 0.25)
    want = ref.paged_attention(
        np.asarray(ops.to_numpy(qm), np.float32), mla_ref, mla_ref[..., 8:], batch, 0.25
    )
    same(got, want, "paged_attention (strided value view)", 2)
    backend.copy_blocks([pools], [7, 0], [3, 4])
    ref.copy_blocks(v_ref, np.array([7, 0]), np.array([3, 4]))
    same(pools["v"], v_ref, "copy_blocks")


def check_logits(backend, arch: str, seed: int = 0) -> None:
    """The backend's logits of every position match the numpy backend's on a random checkpoint:
    one prompt of 29 tokens, one of 11 (Phi-3's LongRoPE: both sides of its switch at 16).

    Mixtures of experts below float32 get the reference's expert choices (_pinned_routing): a
    near-tie between two experts may flip under rounding and move whole rows, a discrete event
    that says nothing about the backend's arithmetic."""
    ckpt = tiny_checkpoint(arch, seed)
    pin = arch in MOE_ARCHITECTURES and _dtype(backend) != "float32"
    for ids in _prompts(seed + 1, lengths=(29, 11)):
        choices: list[np.ndarray] = []
        with _pinned_routing(choices, replay=False):
            want = _engine(ckpt, NumpyBackend()).logits(ids)  # (T, V)
        with _pinned_routing(choices if pin else None, replay=True):
            got = _engine(ckpt, backend).logits(ids)
        _close(np.asarray(got), want, _logits_atol(backend, want, arch), f"{arch} logits")


def _dtype(backend) -> str:
    return getattr(backend, "dtype", None) or "float32"


@contextmanager
def _pinned_routing(choices: list | None, replay: bool):
    """Record each router call's expert ids into `choices`, or (replay) make each call pick the
    recorded experts, weighted from this run's own router logits. choices None: routers untouched."""
    if choices is None:
        yield
        return
    from .models import deepseek_v3, mixtral

    calls = iter(choices)

    def pinned_softmax(route):
        def call(logits, k, renormalize=True):
            ids, weights = route(logits, k, renormalize)
            if not replay:
                choices.append(ids)
                return ids, weights
            ids = next(calls)
            assert ids.shape == (logits.shape[0], k), "router calls differ from the reference's"
            z = logits.astype(np.float32)
            p = np.exp(z - z.max(axis=-1, keepdims=True))  # softmax, as route_softmax
            weights = np.take_along_axis(p / p.sum(axis=-1, keepdims=True), ids, axis=-1)
            if renormalize:
                weights /= weights.sum(axis=-1, keepdims=True)
            return ids, weights

        return call

    def pinned_sigmoid(route):
        def call(logits, bias, k, *args):
            if not replay:
                ids, weights = route(logits, bias, k, *args)
                choices.append(ids)
                return ids, weights
            ids = next(calls)
            assert ids.shape == (logits.shape[0], k), "router calls differ from the reference's"
            # the bias steers only the choice: a large one on the recorded experts picks them
            # (and their groups) while their weights still come from this run's scores
            push = np.zeros(logits.shape, np.float32)  # (N, E)
            np.put_along_axis(push, ids, np.float32(1e4), axis=-1)
            return route(logits, np.asarray(bias, np.float32)[None, :] + push, k, *args)

        return call

    patches = [
        (mixtral, "route_softmax", pinned_softmax),
        (deepseek_v3, "route_softmax", pinned_softmax),
        (deepseek_v3, "route_sigmoid_grouped", pinned_sigmoid),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, wrap in patches:
            setattr(module, name, wrap(getattr(module, name)))
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
    if replay:
        assert next(calls, None) is None, "fewer router calls than in the reference run"


def check_greedy(backend, arch: str = "llama", n_tokens: int = 12, seed: int = 0) -> None:
    """Greedy decoding through the engine picks, at every step, the reference's argmax (up to the
    dtype's tolerance when two logits are that close). Below float32, a mixture of experts may
    legitimately fail this where a router's near-tie flips (check_logits pins the routing)."""
    ckpt = tiny_checkpoint(arch, seed)
    prompts = _prompts(seed + 2)
    got = _greedy(_engine(ckpt, backend), prompts, n_tokens)
    reference = _engine(ckpt, NumpyBackend())
    for prompt, out in zip(prompts, got):
        assert len(out) == n_tokens, f"{arch}: {len(out)} tokens generated, wanted {n_tokens}"
        logits = reference.logits(prompt + out[:-1])[
            len(prompt) - 1 :
        ]  # (n, V) what the reference saw
        margin = _logits_atol(backend, logits, arch)
        for i, (row, token) in enumerate(zip(logits, out)):
            best = int(np.argmax(row))
            assert row[token] >= row[best] - margin, (
                f"{arch}: greedy step {i} chose {token} ({row[token]:.4f}) but the reference's argmax is "
                f"{best} ({row[best]:.4f})"
            )


def check_batched_equals_alone(backend, seed: int = 0) -> None:
    """Sequences batched with others (prefill chunks and decodes mixed) get the logits they get alone."""
    ckpt = tiny_checkpoint("qwen2", seed)
    model = build_model(ckpt.config, ckpt.tensors, backend.ops)
    BS = 4
    prompts = _prompts(seed + 3, lengths=(9, 3, 14))
    tables = [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]

    def run(seqs: list[int]) -> list[np.ndarray]:
        """Prefill the given sequences together, then decode one token each together."""
        kv = backend.allocate_kv(model.kv_layout(), 12, BS)
        first = Batch.build([(prompts[s], 0, tables[s]) for s in seqs], BS)
        out = [np.asarray(backend.forward(model, first, kv))]
        second = Batch.build([([7 + s], len(prompts[s]), tables[s]) for s in seqs], BS)
        out.append(np.asarray(backend.forward(model, second, kv)))
        return out

    together = run([0, 1, 2])
    for s in range(3):
        alone = run([s])
        atol = _logits_atol(backend, alone[0])
        _close(together[0][s : s + 1], alone[0], atol, f"prefill of sequence {s} batched vs alone")
        _close(together[1][s : s + 1], alone[1], atol, f"decode of sequence {s} batched vs alone")
    engine = _engine(ckpt, backend)
    batched = _greedy(engine, prompts, 6)
    if (getattr(backend, "dtype", None) or "float32") == "float32":
        assert batched == [_greedy(engine, [p], 6)[0] for p in prompts], "greedy batched != alone"


def check_paged_equals_contiguous(backend, seed: int = 0) -> None:
    """A sequence in scattered blocks of a pool full of other data == the same in blocks 0, 1, 2, ...;
    and prefill in chunks with cached decode == one forward over everything."""
    ckpt = tiny_checkpoint("mistral", seed)  # sliding window: attention must mask by position
    model = build_model(ckpt.config, ckpt.tensors, backend.ops)
    BS, NB = 4, 16
    ids = _prompts(seed + 4, lengths=(22,))[0]
    n_blocks = -(-len(ids) // BS)
    rows = list(range(len(ids)))

    kv = backend.allocate_kv(model.kv_layout(), NB, BS)
    contiguous = np.asarray(
        backend.forward(model, Batch.build([(ids, 0, list(range(n_blocks)))], BS, rows), kv)
    )

    kv = backend.allocate_kv(model.kv_layout(), NB, BS)
    noise = _prompts(seed + 5, lengths=(NB * BS,))[
        0
    ]  # fill every block with another sequence first
    backend.forward(model, Batch.build([(noise, 0, list(range(NB)))], BS), kv)
    scattered = list(np.random.default_rng(seed).permutation(NB)[:n_blocks])
    paged = np.asarray(backend.forward(model, Batch.build([(ids, 0, scattered)], BS, rows), kv))
    _close(paged, contiguous, _logits_atol(backend, contiguous), "fragmented pool vs contiguous")

    kv = backend.allocate_kv(model.kv_layout(), NB, BS)
    stepwise, start = [], 0
    for n in (5, 8, 1, 7, 1):  # chunked prefill, then decodes reading the cached K/V
        chunk = ids[start : start + n]
        b = Batch.build([(chunk, start, scattered)], BS, list(range(n)))
        stepwise.append(np.asarray(backend.forward(model, b, kv)))
        start += n
    _close(
        np.concatenate(stepwise), contiguous, _logits_atol(backend, contiguous), "chunked vs full"
    )


# -- pytest face ----------------------------------------------------------------------------------


class BackendConformance:
    """The checks as pytest tests. Subclass as `Test...` and set backend / device / dtype."""

    backend: str = "numpy"
    device: str | None = None
    dtype: str | None = None

    def make_backend(self):
        return create_backend(self.backend, device=self.device, dtype=self.dtype)

    def pytest_generate_tests(self, metafunc):  # pytest calls this for the class's own tests
        if "conformance_arch" in metafunc.fixturenames:
            metafunc.parametrize("conformance_arch", list(ARCHITECTURES))
        if "conformance_greedy_arch" in metafunc.fixturenames:
            metafunc.parametrize("conformance_greedy_arch", GREEDY_ARCHITECTURES)

    def test_availability(self):
        from .backends import get_backend_class

        ok, reason = get_backend_class(self.backend).availability()
        assert isinstance(ok, bool) and isinstance(reason, str)
        assert ok, f"backend {self.backend!r} is unavailable: {reason}"

    def test_ops(self):
        check_ops(self.make_backend())

    def test_logits(self, conformance_arch):
        check_logits(self.make_backend(), conformance_arch)

    def test_greedy(self, conformance_greedy_arch):
        backend = self.make_backend()
        if conformance_greedy_arch in MOE_ARCHITECTURES and _dtype(backend) != "float32":
            import pytest

            pytest.skip("a router's near-tie may flip below float32 (test_logits pins routing)")
        check_greedy(backend, conformance_greedy_arch)

    def test_batched_equals_alone(self):
        check_batched_equals_alone(self.make_backend())

    def test_paged_equals_contiguous(self):
        check_paged_equals_contiguous(self.make_backend())


def conformance_tests(backend: str, device: str | None = None, dtype: str | None = None) -> type:
    """A pytest test class running the whole kit on one backend: `TestMine = conformance_tests("mine")`."""
    suffix = "".join(
        part.capitalize()
        for part in f"{backend} {device or ''} {dtype or ''}".replace(":", " ").split()
    )
    return type(
        f"Test{suffix}Conformance",
        (BackendConformance,),
        {
            "backend": backend,
            "device": device,
            "dtype": dtype,
            "__module__": __name__,
        },
    )


def run_conformance(
    backend: str,
    device: str | None = None,
    dtype: str | None = None,
    pytest_args: tuple[str, ...] = ("-q",),
) -> int:
    """Run the kit on one backend outside a test suite (scripts, CI); returns pytest's exit code."""
    import tempfile

    import pytest

    with tempfile.TemporaryDirectory() as tmp:
        # a fresh module name per run: pytest refuses a second module of the same name
        module = Path(tmp) / f"test_conformance_{Path(tmp).name.lstrip('tmp_')}.py"
        module.write_text(
            "from tinyserve.testing import conformance_tests\n"
            f"TestConformance = conformance_tests({backend!r}, {device!r}, {dtype!r})\n"
        )
        return int(pytest.main([str(module), "-p", "no:cacheprovider", *pytest_args]))
