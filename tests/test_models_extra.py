"""Gemma 3, Mixtral, Phi-3 and DeepSeek-V3 (MLA + MoE) against transformers, and their new ops.

Fixtures (tests/fixtures/hf/<name>/, made by tests/make_fixtures.py) are tiny seeded checkpoints
with the logits transformers computed from them. Each family must match those logits and greedy
ids, give the same tokens batched as alone through the paged engine, and (MoE) really route to
several experts. The new reference ops are checked against plain per-element / per-token loops.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tinyserve import LLM, SamplingParams
from tinyserve.backends import list_backends
from tinyserve.backends.numpy_ops import NumpyOps
from tinyserve.models.moe import route_sigmoid_grouped, route_softmax, split_experts
from tinyserve.models.rope import interleaved_to_halves

HERE = Path(__file__).parent
HF_DIR = HERE / "fixtures" / "hf"
GEMMA3_NPZ = HERE / "fixtures" / "gemma3_270m_reference.npz"
NAMES = [
    "gemma3",  # sliding 6 / global layers, local+global rope bases, (1 + w) norms, softcap 10
    "mixtral",  # 4 experts, top-2, renormalized
    "phi3",  # fused qkv/gate_up, partial rotary 0.75, LongRoPE (prompt 1 long, prompt 2 short)
    "deepseek_v3",  # MLA with q LoRA, YaRN + mscale, interleaved rope, grouped sigmoid MoE
    "deepseek_v3_qlora",  # the same without q LoRA (q_proj)
]
ATOL, RTOL = 2e-3, 1e-3  # as tests/test_hf_parity.py: f32 vs f32, observed |diff| <= 1.5e-4
ENGINE_BACKENDS = [  # torch only where it is importable (availability says so)
    b.name for b in list_backends() if b.name in ("numpy", "cpu", "torch") and b.available
]


def load_reference(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def greedy(llm: LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    d = HF_DIR / request.param
    assert (d / "reference.npz").exists(), f"missing fixture {d}"
    return request.param, LLM(model=str(d), backend="numpy"), load_reference(d / "reference.npz")


# -- parity with transformers -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "_2"], ids=["prompt1", "prompt2"])
def test_logits_match_transformers(case, suffix):
    _, llm, ref = case
    got = llm.logits(ref["input_ids" + suffix].tolist())
    assert got.shape == ref["logits" + suffix].shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref["logits" + suffix], atol=ATOL, rtol=RTOL)


def test_greedy_ids_match_transformers(case):
    _, llm, ref = case
    want = ref["greedy_ids"].tolist()
    assert greedy(llm, [ref["input_ids"].tolist()], len(want)) == [want]


def test_tokenizer_matches_transformers(case):
    _, llm, ref = case
    assert llm.tokenizer.encode(str(ref["text"])) == ref["input_ids"].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_fixture_can_catch_errors(name):
    """The oracle itself: logits far from flat, greedy path moving, no near-ties to flip."""
    ref = load_reference(HF_DIR / name / "reference.npz")
    assert ref["logits"].std(axis=-1).min() > 0.5
    assert len(set(ref["greedy_ids"].tolist())) >= 4
    assert ref["greedy_margins"].min() > 20 * ATOL


def test_fixture_configs_exercise_the_features():
    """Prompt longer than Gemma's window; LongRoPE on both sides of its switch; MLA with/without q LoRA."""
    g = LLM(model=str(HF_DIR / "gemma3"), backend="numpy").engine.model_config
    ids = load_reference(HF_DIR / "gemma3" / "reference.npz")["input_ids"]
    assert len(ids) > 3 * g.sliding_window and g.is_sliding(0) and not g.is_sliding(1)
    assert g.rope_local_theta != g.rope_theta and g.query_pre_attn_scalar != g.head_dim
    p = LLM(model=str(HF_DIR / "phi3"), backend="numpy").engine.model_config
    ref = load_reference(HF_DIR / "phi3" / "reference.npz")
    orig = p.rope_scaling["original_max_position_embeddings"]
    assert len(ref["input_ids"]) > orig >= len(ref["input_ids_2"]) and p.rotary_dim < p.head_dim
    d1 = LLM(model=str(HF_DIR / "deepseek_v3"), backend="numpy").engine.model_config
    d2 = LLM(model=str(HF_DIR / "deepseek_v3_qlora"), backend="numpy").engine.model_config
    assert d1.q_lora_rank and d2.q_lora_rank is None and d1.rope_interleave
    assert d1.n_group > d1.topk_group and d1.first_k_dense_replace == 1


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_routing_uses_several_experts(name, monkeypatch):
    llm = LLM(model=str(HF_DIR / name), backend="numpy")
    used = set()
    moe = NumpyOps.moe

    def spy(self, x, ids, weights, experts, act="silu"):
        used.update(np.unique(ids).tolist())
        return moe(self, x, ids, weights, experts, act)

    monkeypatch.setattr(NumpyOps, "moe", spy)
    llm.logits(load_reference(HF_DIR / name / "reference.npz")["input_ids"].tolist())
    n_experts = llm.engine.model_config.n_experts
    assert len(used) >= min(n_experts, 4), f"only experts {sorted(used)} of {n_experts} used"


# -- through the paged engine: batched == alone --------------------------------------------------


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_alone(name, backend):
    ref = load_reference(HF_DIR / name / "reference.npz")
    ids = ref["input_ids"].tolist()
    prompts = [ids, ref["input_ids_2"].tolist(), ids[:9], ids[5:]]
    # LongRoPE keys depend on the sequence's length, so Phi-3's blocks are not prefix-cacheable
    cacheable = name != "phi3"
    llm = LLM(model=str(HF_DIR / name), backend=backend, block_size=4)  # prefix caching asked for
    assert getattr(llm.engine.model, "prefix_cacheable", True) == cacheable
    assert (
        llm.engine.kv_manager.enable_prefix_caching == cacheable
    )  # the engine honours the opt-out
    together = greedy(llm, prompts, 6)
    alone = [greedy(llm, [p], 6)[0] for p in prompts]
    assert together == alone
    if backend == "numpy":
        assert together[0] == ref["greedy_ids"].tolist()[:6]


# -- the new reference ops ------------------------------------------------------------------------


def test_gelu_tanh_mul_matches_formula():
    rng = np.random.default_rng(0)
    g, u = rng.standard_normal((2, 3, 7)).astype(np.float32)
    want = [
        [
            0.5 * a * (1 + math.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3))) * b
            for a, b in zip(ga, ua)
        ]
        for ga, ua in zip(g.astype(float), u.astype(float))
    ]
    np.testing.assert_allclose(NumpyOps().gelu_tanh_mul(g, u), want, rtol=1e-5, atol=1e-6)


def test_softcap_bounds_and_slope():
    x = np.array([-1e4, -3.0, 0.0, 1e-3, 3.0, 1e4], np.float32)
    y = NumpyOps().softcap(x, 5.0)
    np.testing.assert_allclose(
        y, [-5.0, 5 * math.tanh(-0.6), 0.0, 1e-3, 5 * math.tanh(0.6), 5.0], rtol=1e-5
    )


def test_head_matmul_matches_loop():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((5, 3, 4)), rng.standard_normal((3, 6, 4))
    want = np.stack([x[:, h] @ w[h].T for h in range(3)], axis=1)
    np.testing.assert_allclose(NumpyOps().head_matmul(x, w), want, rtol=1e-6)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_moe_matches_per_token_loop(act):
    rng = np.random.default_rng(2)
    N, D, F, E, K = 9, 8, 6, 5, 2
    ops = NumpyOps()
    x = rng.standard_normal((N, D)).astype(np.float32)
    experts = [
        tuple(rng.standard_normal(s).astype(np.float32) for s in ((F, D), (F, D), (D, F)))
        for _ in range(E)
    ]
    ids = np.stack([rng.choice(E - 1, K, replace=False) for _ in range(N)])  # expert E-1 unused
    w = rng.random((N, K)).astype(np.float32)
    mul = ops.silu_mul if act == "silu" else ops.gelu_tanh_mul
    want = np.zeros((N, D), np.float32)
    for n in range(N):
        for k in range(K):
            gate, up, down = experts[ids[n, k]]
            want[n] += w[n, k] * (mul(gate @ x[n], up @ x[n]) @ down.T)
    np.testing.assert_allclose(ops.moe(x, ids, w, experts, act), want, rtol=1e-4, atol=1e-5)


def test_route_softmax_picks_top_k_and_renormalizes():
    logits = np.array([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 2.5]], np.float32)
    ids, w = route_softmax(logits, 2)
    assert ids.tolist() == [[1, 2], [0, 3]]
    np.testing.assert_allclose(
        w[0], [1 / (1 + math.exp(-1)), 1 - 1 / (1 + math.exp(-1))], rtol=1e-6
    )
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)


def test_route_sigmoid_grouped_matches_brute_force():
    rng = np.random.default_rng(3)
    N, E, G, TG, K = 20, 12, 4, 2, 3
    logits = rng.standard_normal((N, E)).astype(np.float32)
    bias = rng.standard_normal(E).astype(np.float32)
    ids, w = route_sigmoid_grouped(logits, bias, K, G, TG, True, 2.5)
    for n in range(N):
        s = 1 / (1 + np.exp(-logits[n].astype(np.float64)))
        c = s + bias
        merit = [sorted(c[g * 3 : g * 3 + 3])[-2:] for g in range(G)]
        groups = sorted(range(G), key=lambda g: -sum(merit[g]))[:TG]
        allowed = [e for e in range(E) if e // 3 in groups]
        best = sorted(allowed, key=lambda e: -c[e])[:K]
        assert sorted(ids[n].tolist()) == sorted(best)
        want = {e: 2.5 * s[e] / sum(s[b] for b in best) for e in best}
        np.testing.assert_allclose(w[n], [want[e] for e in ids[n]], rtol=1e-5)
        assert not set(best) - set(allowed)


def test_interleaved_rope_equals_half_rope_of_reordered_dims():
    """Rotating pairs (x0, x1), (x2, x3) ... == NumpyOps.rope (halves) on x[interleaved_to_halves]."""
    rng = np.random.default_rng(4)
    dim, pos = 8, np.array([0, 3, 17])
    inv_freq = (1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    x = rng.standard_normal((3, 2, dim)).astype(np.float32)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(
        1j * pos[:, None, None] * inv_freq
    )  # pairs as complex
    pairs = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)  # (N, h, dim) interleaved again
    perm = interleaved_to_halves(dim)
    np.testing.assert_allclose(
        NumpyOps().rope(x[..., perm], pos, inv_freq), pairs[..., perm], atol=1e-5
    )


def test_split_experts_dense_stack():
    stack = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    parts = split_experts(stack.reshape(6, 4), 2)
    assert [p.tolist() for p in parts] == [stack[0].tolist(), stack[1].tolist()]


# -- the real Gemma-3-270M ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_270m():
    from conftest import catalog_model

    path = catalog_model("gemma3-270m")
    return LLM(model=str(path), backend="numpy"), load_reference(GEMMA3_NPZ)


@pytest.mark.real_model
def test_gemma3_270m_logits_match_transformers(gemma3_270m):
    # Both sides dequantize the same Q4_K/Q5_0/Q6_K/Q8_0 blocks to the same f32 values; what is
    # left is f32 rounding through 18 layers (transformers' own f32-vs-f64 gap is stored).
    llm, ref = gemma3_270m
    ids = ref["input_ids"].tolist()
    got = llm.logits(ids)  # (T, V)
    assert got.shape == (len(ids), 262144)
    np.testing.assert_array_equal(got.argmax(-1), ref["argmax"])
    np.testing.assert_allclose(got[-1], ref["logits_last"], atol=ATOL, rtol=RTOL)
    top = np.take_along_axis(got, ref["top_ids"], axis=-1)
    np.testing.assert_allclose(top, ref["top_logits"], atol=ATOL, rtol=RTOL)


@pytest.mark.real_model
def test_gemma3_270m_greedy_is_sensible(gemma3_270m):
    llm, ref = gemma3_270m
    want = ref["greedy_ids"].tolist()
    got = greedy(llm, [ref["input_ids"].tolist()], len(want))[0]
    close = np.flatnonzero(ref["greedy_margins"] < 0.05)
    n_sure = int(close[0]) if close.size else len(want)
    assert got[:n_sure] == want[:n_sure]
    text = llm.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))[0]
    assert "France" in text.outputs[0].text or "Paris" in text.outputs[0].text, text.outputs[0].text


# -- GGUF: Mixtral's stacked experts, as llama.cpp files them -------------------------------------


def write_mixtral_gguf(hf_dir: Path, out: Path, expert_qtype) -> Path:
    """The mixtral fixture as convert_hf_to_gguf writes Mixtral: arch llama, q/k permuted for
    llama.cpp's rope, each layer's experts stacked into ffn_{gate,up,down}_exps (E, out, in)."""
    import json

    import gguf
    from gguf_util import llama_cpp_permute, load_safetensors_f32

    cfg = json.loads((hf_dir / "config.json").read_text())
    t = load_safetensors_f32(hf_dir / "model.safetensors")
    H, KVH, E = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_local_experts"]
    w = gguf.GGUFWriter(out, "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(KVH)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_expert_count(E)
    w.add_expert_used_count(cfg["num_experts_per_tok"])

    def add(name, arr, qtype=gguf.GGMLQuantizationType.F32):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", t["model.embed_tokens.weight"])
    add("output_norm.weight", t["model.norm.weight"])
    add("output.weight", t["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}", f"blk.{i}"
        add(f"{b}.attn_norm.weight", t[f"{p}.input_layernorm.weight"])
        add(f"{b}.ffn_norm.weight", t[f"{p}.post_attention_layernorm.weight"])
        add(f"{b}.attn_q.weight", llama_cpp_permute(t[f"{p}.self_attn.q_proj.weight"], H))
        add(f"{b}.attn_k.weight", llama_cpp_permute(t[f"{p}.self_attn.k_proj.weight"], H, KVH))
        add(f"{b}.attn_v.weight", t[f"{p}.self_attn.v_proj.weight"])
        add(f"{b}.attn_output.weight", t[f"{p}.self_attn.o_proj.weight"])
        add(f"{b}.ffn_gate_inp.weight", t[f"{p}.block_sparse_moe.gate.weight"])
        for hf, gg in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
            stack = np.stack([t[f"{p}.block_sparse_moe.experts.{e}.{hf}.weight"] for e in range(E)])
            add(f"{b}.{gg}.weight", stack, expert_qtype)  # (E, out, in)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    from tinyserve.backends import create_backend
    from tinyserve.engine import Engine
    from tinyserve.loading import load_checkpoint

    return Engine(load_checkpoint(path), None, create_backend("numpy")).logits(ids)


def test_mixtral_gguf_stacked_experts_match_transformers(tmp_path):
    import gguf

    ref = load_reference(HF_DIR / "mixtral" / "reference.npz")
    path = write_mixtral_gguf(
        HF_DIR / "mixtral", tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32
    )
    from tinyserve.loading import load_checkpoint

    ckpt = load_checkpoint(path)
    assert ckpt.config.model_type == "mixtral" and ckpt.config.n_experts == 4
    got = gguf_logits(path, ref["input_ids"].tolist())
    np.testing.assert_allclose(got, ref["logits"], atol=ATOL, rtol=RTOL)


def test_mixtral_gguf_quantized_experts_split_by_rows(tmp_path):
    """Q8_0 stacks: each expert's slice of raw blocks dequantizes to that expert's Q8_0 matrix."""
    import gguf

    Q8 = gguf.GGMLQuantizationType.Q8_0
    path = write_mixtral_gguf(HF_DIR / "mixtral", tmp_path / "q.gguf", Q8)
    from gguf_util import load_safetensors_f32

    from tinyserve.loading import load_checkpoint

    t = load_checkpoint(path).tensors["model.layers.1.block_sparse_moe.experts.w2.weight"]
    hf = load_safetensors_f32(HF_DIR / "mixtral" / "model.safetensors")
    for e, part in enumerate(split_experts(t, 4)):
        want = hf[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"]
        np.testing.assert_array_equal(
            part.dequantize(), gguf.quants.dequantize(gguf.quants.quantize(want, Q8), Q8)
        )
    ref = load_reference(HF_DIR / "mixtral" / "reference.npz")
    got = gguf_logits(path, ref["input_ids"].tolist())  # Q8_0 experts: close, not exact
    assert (got.argmax(-1) == ref["logits"].argmax(-1)).mean() > 0.9
