"""Gemma 3, Mixtral, Phi-3 and DeepSeek-V3 from GGUF: the file convert_hf_to_gguf would write from
a tiny checkpoint gives that checkpoint's logits.

Two routes to one answer: tests/gguf_util.py writes the GGUF with gguf-py's own tensor-name map and
quantizer, transforming tensors as llama.cpp's converter does (Gemma norms + 1, Mixtral/DeepSeek
experts stacked, DeepSeek kv_b split into attn_k_b / attn_v_b, Phi-3 LongRoPE factors as tensors);
tinyserve reads it back through its own parser and name map and must undo each transformation.
The raw files are also read with gguf.GGUFReader to pin the names and metadata llama.cpp expects.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import HF_DIR
from gguf import GGMLQuantizationType as Q
from gguf_util import load_safetensors_f32, write_gguf_from_hf_dir

from tinyserve import LLM, SamplingParams
from tinyserve.backends import list_backends
from tinyserve.errors import ConfigError, WeightsError
from tinyserve.loading.gguf_file import read_gguf

NAMES = ["gemma3", "mixtral", "phi3", "deepseek_v3", "deepseek_v3_qlora"]
# the engine backends of the family tests below; torch only where it is importable
AVAILABLE = {b.name for b in list_backends() if b.available}
BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(b not in AVAILABLE, reason=f"{b} unavailable"))
    for b in ("cpu", "torch")
]
ARCH = {"gemma3": "gemma3", "mixtral": "llama", "phi3": "phi3"} | dict.fromkeys(
    ["deepseek_v3", "deepseek_v3_qlora"], "deepseek2"
)


def prompt(name: str) -> list[int]:
    """The fixture's first reference prompt: longer than Gemma's window and Phi-3's original context."""
    with np.load(HF_DIR / name / "reference.npz") as ref:
        return ref["input_ids"].tolist()


def greedy(llm: LLM, ids: list[int], n: int = 8) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return list(llm.generate([ids], params)[0].outputs[0].token_ids)


@pytest.fixture(scope="module")
def safetensors_llm():
    cache: dict[str, LLM] = {}

    def get(name: str) -> LLM:
        if name not in cache:
            cache[name] = LLM(str(HF_DIR / name), backend="numpy")
        return cache[name]

    return get


def raw(path: Path) -> tuple[dict, dict]:
    """GGUFReader's view: {key: value}, {tensor name: (numpy shape, type name)}."""
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items()}
    tensors = {
        t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for t in r.tensors
    }
    return meta, tensors


# -- float32 GGUF == the safetensors checkpoint ---------------------------------------------------


@pytest.mark.parametrize(
    "name, split_kv_b",
    [(n, True) for n in NAMES] + [("deepseek_v3", False), ("deepseek_v3_qlora", False)],
    ids=lambda v: v if isinstance(v, str) else ("kv_b_split" if v else "kv_b_whole"),
)
def test_f32_gguf_equals_safetensors(tmp_path, safetensors_llm, name, split_kv_b):
    path = write_gguf_from_hf_dir(HF_DIR / name, tmp_path / f"{name}.gguf", split_kv_b=split_kv_b)
    st, gg = safetensors_llm(name), LLM(str(path), backend="numpy")
    assert gg.config.family == st.config.family
    ids = prompt(name)
    np.testing.assert_allclose(gg.logits(ids), st.logits(ids), rtol=1e-4, atol=1e-4)
    assert greedy(gg, ids) == greedy(st, ids)


@pytest.mark.parametrize("name", NAMES)
def test_gguf_config_equals_hf_config(tmp_path, safetensors_llm, name):
    """Every field the model reads comes back from the metadata. Not compared: model_type (the
    GGUF names the architecture, not the HF class) and bos_token_id (gguf-py's SpecialVocab takes
    it from tokenizer_config.json, which names another token than these fixtures' config.json)."""
    path = write_gguf_from_hf_dir(HF_DIR / name, tmp_path / f"{name}.gguf")
    want, got = safetensors_llm(name).config, read_gguf(path).config()
    skip = ("model_type", "extra", "bos_token_id")
    fields = [f for f in want.__dataclass_fields__ if f not in skip]
    diff = {
        f: (getattr(got, f), getattr(want, f))
        for f in fields
        if getattr(got, f) != getattr(want, f)
    }
    if want.rope_scaling:  # the GGUF keeps what the rope maths needs, not every config.json key
        got_rs, want_rs = diff.pop("rope_scaling", (want.rope_scaling, want.rope_scaling))
        for key, value in got_rs.items():
            if key in want_rs:
                assert value == pytest.approx(want_rs[key]), key
        assert got_rs["rope_type"] == want_rs["rope_type"]
    assert diff == {}


# -- Q8_0 weights: exactly the dequantized checkpoint, close to float32 ---------------------------


def q8_twin(name: str, out: Path) -> Path:
    """The fixture with every tensor replaced by what a Q8_0 GGUF holds: 2-D+ weights rounded
    through Q8_0 blocks along their rows (F16 where rows are not whole blocks, as convert falls
    back), routers and 1-D tensors untouched. Loaded from safetensors: no GGUF reader involved."""
    import shutil

    from safetensors.numpy import save_file

    out.mkdir()
    for f in (HF_DIR / name).iterdir():
        if f.name not in ("model.safetensors", "reference.npz"):
            shutil.copy(f, out / f.name)
    twin = {}
    for key, arr in load_safetensors_f32(HF_DIR / name / "model.safetensors").items():
        qtype = Q.F32 if arr.ndim < 2 or key.endswith("gate.weight") else Q.Q8_0
        if arr.shape[-1] % 32 and qtype == Q.Q8_0:
            qtype = Q.F16
        twin[key] = gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype)
    save_file(twin, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_q8_0_gguf_equals_dequantized_checkpoint(tmp_path, safetensors_llm, name):
    """Quantized blocks (stacked experts split by rows, permuted q/k rows, Gemma's embedding)
    reach the model where the safetensors twin puts their dequantized values; against float32
    they are close, up to the odd MoE routing near-tie that rounding flips (DeepSeek token 0)."""
    path = write_gguf_from_hf_dir(
        HF_DIR / name, tmp_path / "q8.gguf", qtype_for=lambda n, a: Q.Q8_0
    )
    _, tensors = raw(path)
    kinds = {t for _, t in tensors.values()}
    assert "Q8_0" in kinds
    if name.startswith("deepseek"):  # k_b rows (dn) and v_b rows (r) are not whole blocks:
        assert tensors["blk.0.attn_k_b.weight"][1] == "F16"  # elementwise, so the twin's
        assert tensors["blk.0.attn_v_b.weight"][1] == "F16"  # F16 kv_b holds the same values
    ids = prompt(name)
    got = LLM(str(path), backend="numpy").logits(ids)
    want = LLM(str(q8_twin(name, tmp_path / "twin")), backend="numpy").logits(ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    f32 = safetensors_llm(name).logits(ids)
    assert np.median(np.abs(got - f32).max(axis=-1)) < 0.05 * np.abs(f32).max()
    assert (got.argmax(-1) == f32.argmax(-1)).mean() >= 0.9


# -- the files as llama.cpp reads them -------------------------------------------------------------


def test_gemma3_norms_stored_plus_one_and_undone(tmp_path):
    path = write_gguf_from_hf_dir(HF_DIR / "gemma3", tmp_path / "g.gguf")
    hf = load_safetensors_f32(HF_DIR / "gemma3" / "model.safetensors")
    r = gguf.GGUFReader(path)
    stored = {t.name: np.asarray(t.data) for t in r.tensors}
    for gguf_name, hf_name in [
        ("blk.1.attn_q_norm.weight", "model.layers.1.self_attn.q_norm.weight"),
        ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ]:
        np.testing.assert_allclose(stored[gguf_name], hf[hf_name] + 1, rtol=0, atol=1e-7)
        np.testing.assert_allclose(read_gguf(path).tensors[hf_name], hf[hf_name], atol=1e-6)
    meta, _ = raw(path)
    assert meta["gemma3.final_logit_softcapping"] == 10.0
    assert meta["gemma3.attention.sliding_window"] == 6
    assert meta["gemma3.rope.freq_base_swa"] == 10000.0
    assert (
        meta["gemma3.rope.scaling.type"] == "linear" and meta["gemma3.rope.scaling.factor"] == 4.0
    )
    # beyond llama.cpp's defaults (every 6th layer global, q scaled by 1/sqrt(head_dim)):
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, False, True]
    assert meta["gemma3.attention.scale"] == pytest.approx(24**-0.5)


def test_mixtral_experts_stacked_under_llama(tmp_path):
    path = write_gguf_from_hf_dir(HF_DIR / "mixtral", tmp_path / "m.gguf")
    meta, tensors = raw(path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.expert_count"] == 4 and meta["llama.expert_used_count"] == 2
    assert tensors["blk.0.ffn_gate_exps.weight"][0] == (4, 96, 64)  # (E, F, D)
    assert tensors["blk.0.ffn_down_exps.weight"][0] == (4, 64, 96)  # (E, D, F)
    assert tensors["blk.0.ffn_gate_inp.weight"][0] == (4, 64)


def test_phi3_fused_tensors_and_longrope(tmp_path):
    path = write_gguf_from_hf_dir(HF_DIR / "phi3", tmp_path / "p.gguf")
    meta, tensors = raw(path)
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(tensors)
    assert tensors["blk.0.ffn_up.weight"][0] == (2 * 160, 64)  # gate rows, then up rows
    assert meta["phi3.rope.dimension_count"] == 12  # int(0.75 * 64) // 4
    assert meta["phi3.rope.scaling.original_context_length"] == 16
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(
        np.sqrt(1 + np.log(4) / np.log(16))
    )
    f = read_gguf(path)
    np.testing.assert_array_equal(f.tensors["rope_factors_long"], [1, 2, 4, 8, 16, 32])
    np.testing.assert_allclose(f.tensors["rope_factors_short"], [1.0, 1.1, 1.3, 1.6, 2.0, 2.5])


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3_qlora"])
def test_deepseek2_names_and_metadata(tmp_path, name):
    path = write_gguf_from_hf_dir(HF_DIR / name, tmp_path / "d.gguf")
    meta, tensors = raw(path)
    a = "deepseek2"
    assert meta["general.architecture"] == a and meta[f"{a}.attention.head_count_kv"] == 1
    want = {
        "expert_count": 8, "expert_used_count": 3, "expert_shared_count": 1,
        "leading_dense_block_count": 1, "expert_feed_forward_length": 32,
        "expert_weights_norm": True, "expert_gating_func": 2, "expert_group_count": 4,
        "expert_group_used_count": 2, "attention.kv_lora_rank": 16,
        "attention.key_length": 16 + 8, "attention.value_length": 16,
        "attention.key_length_mla": 16, "attention.value_length_mla": 12,
        "rope.dimension_count": 8, "rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
        "rope.scaling.original_context_length": 16,
    }  # fmt: skip
    assert {k: meta[f"{a}.{k}"] for k in want} == want
    assert meta[f"{a}.expert_weights_scale"] == pytest.approx(2.5)
    assert meta[f"{a}.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * 0.8)
    if name == "deepseek_v3":
        assert meta[f"{a}.attention.q_lora_rank"] == 24
        assert {
            "blk.0.attn_q_a.weight",
            "blk.0.attn_q_a_norm.weight",
            "blk.0.attn_q_b.weight",
        } <= set(tensors)
    else:
        assert f"{a}.attention.q_lora_rank" not in meta and "blk.0.attn_q.weight" in tensors
    # dense first layer, MoE after it: routed experts stacked, shared experts, router bias
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors
    assert tensors["blk.1.ffn_up_exps.weight"][0] == (8, 32, 64)  # (E, F, D)
    assert tensors["blk.1.ffn_down_shexp.weight"][0] == (64, 32)
    assert tensors["blk.1.exp_probs_b.bias"][0] == (8,)
    # kv_b split: k_b (H, r, dn) transposed, v_b (H, dv, r); no attn_kv_b left
    assert tensors["blk.0.attn_k_b.weight"][0] == (4, 16, 8)
    assert tensors["blk.0.attn_v_b.weight"][0] == (4, 12, 16)
    assert "blk.0.attn_kv_b.weight" not in tensors


def test_deepseek2_kv_b_merged_back_exactly(tmp_path):
    hf = load_safetensors_f32(HF_DIR / "deepseek_v3" / "model.safetensors")
    f = read_gguf(write_gguf_from_hf_dir(HF_DIR / "deepseek_v3", tmp_path / "d.gguf"))
    for i in range(3):
        name = f"model.layers.{i}.self_attn.kv_b_proj.weight"
        np.testing.assert_array_equal(f.tensors[name], hf[name])
        assert f.gguf_names[name] == f"blk.{i}.attn_kv_b.weight"
    assert not any(n.endswith((".k_b_proj.weight", ".v_b_proj.weight")) for n in f.tensors)
    bias = "model.layers.2.mlp.gate.e_score_correction_bias"
    np.testing.assert_array_equal(f.tensors[bias], hf[bias])


def _write_k_b_v_b(path: Path, k_b: np.ndarray | None, v_b: np.ndarray | None, qtype=Q.Q8_0):
    w = gguf.GGUFWriter(path, "deepseek2")
    for name, arr in (("blk.0.attn_k_b.weight", k_b), ("blk.0.attn_v_b.weight", v_b)):
        if arr is not None:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_deepseek2_quantized_k_b_v_b_merge(tmp_path):
    """Q8_0 k_b / v_b (rows of whole blocks, as in real DeepSeek files) dequantize and merge."""
    rng = np.random.default_rng(3)
    H, r, dn, dv = 2, 64, 32, 32
    kv_b = rng.standard_normal((H, dn + dv, r)).astype(np.float32)  # (H, dn + dv, r)
    k_b = np.ascontiguousarray(kv_b[:, :dn].transpose(0, 2, 1))  # (H, r, dn)
    v_b = np.ascontiguousarray(kv_b[:, dn:])  # (H, dv, r)
    f = read_gguf(_write_k_b_v_b(tmp_path / "q.gguf", k_b, v_b))

    def q8(x):
        return gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0)

    want = np.concatenate([q8(k_b).transpose(0, 2, 1), q8(v_b)], axis=1).reshape(-1, r)
    np.testing.assert_array_equal(f.tensors["model.layers.0.self_attn.kv_b_proj.weight"], want)


def test_deepseek2_k_b_without_v_b_is_an_error(tmp_path):
    k_b = np.zeros((2, 64, 32), np.float32)
    with pytest.raises(WeightsError, match="attn_v_b"):
        read_gguf(_write_k_b_v_b(tmp_path / "k.gguf", k_b, None))


def test_unknown_expert_gating_func_is_a_config_error(tmp_path):
    path = write_gguf_from_hf_dir(HF_DIR / "deepseek_v3", tmp_path / "d.gguf")
    f = read_gguf(path)
    f.metadata["deepseek2.expert_gating_func"] = 3  # llama.cpp's sqrt-softplus
    with pytest.raises(ConfigError, match="expert_gating_func 3"):
        f.config()


# -- the files users bring, on the engine backends -------------------------------------------------


def _close_to_reference(llm: LLM, reference: LLM, ids: list[int], atol: float) -> None:
    """llm's logits within atol of the reference's, and each greedy step the reference's argmax
    up to that margin (a near-tie may go either way under rounding, nothing more)."""
    want = reference.logits(ids)  # (T, V)
    got = llm.logits(ids)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    err = float(np.max(np.abs(got - want)))
    assert err <= atol, f"logits: max |diff| {err:.3g} > {atol:.3g}"
    out = greedy(llm, ids)
    assert len(out) == 8
    seen = reference.logits(ids + out[:-1])[len(ids) - 1 :]  # (8, V) what the reference saw
    for i, (row, token) in enumerate(zip(seen, out)):
        assert row[token] >= row.max() - atol, f"greedy step {i}: {token} is not the argmax"


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixtral_q8_0_gguf_generates(tmp_path, safetensors_llm, backend):
    """Issue 12: Mixtral (a llama-architecture GGUF with experts) with Q8_0 attention and experts
    ran into the Llama fast path on the cpu backend (AttributeError: no attribute 'gate')."""
    path = write_gguf_from_hf_dir(
        HF_DIR / "mixtral", tmp_path / "m.gguf", qtype_for=lambda n, a: Q.Q8_0
    )
    _, tensors = raw(path)
    assert tensors["blk.0.attn_q.weight"][1] == "Q8_0"
    assert tensors["blk.0.ffn_gate_exps.weight"][1] == "Q8_0"
    llm = LLM(str(path), backend=backend)
    reference = LLM(str(path), backend="numpy")  # the dequantized blocks in float32
    ids = prompt("mixtral")
    # a backend may round activations to 8 bits for its dot products with the blocks (llama.cpp's
    # kernels do): that may cost as much as rounding the weights to Q8_0 did, no more
    atol = float(np.abs(reference.logits(ids) - safetensors_llm("mixtral").logits(ids)).max())
    _close_to_reference(llm, reference, ids, atol)


def phi3_4k_dir(out: Path) -> Path:
    """The phi3 fixture configured as Phi-3-mini-4k is: plain (partial) rope, rope_scaling null,
    original_max_position_embeddings == max_position_embeddings. Same weights."""
    out.mkdir()
    for f in (HF_DIR / "phi3").iterdir():
        if f.name not in ("config.json", "reference.npz"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((HF_DIR / "phi3" / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg |= {
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "original_max_position_embeddings": cfg["max_position_embeddings"],
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.mark.parametrize("backend", ["numpy", *BACKENDS])
def test_phi3_4k_gguf_without_rope_factors(tmp_path, backend):
    """Issue 12: llama.cpp's converter writes rope.scaling.original_context_length for every
    Phi-3, LongRoPE or not; Phi-3-mini-4k has no rope_factors_* tensors and must load with plain
    rope (it was refused: "longrope rope_scaling lacks short_factor")."""
    hf = phi3_4k_dir(tmp_path / "phi3_4k")
    path = write_gguf_from_hf_dir(hf, tmp_path / "p.gguf")
    meta, tensors = raw(path)
    assert meta["phi3.rope.scaling.original_context_length"] == 64
    assert not any(name.startswith("rope_factors") for name in tensors)
    gg, st = LLM(str(path), backend=backend), LLM(str(hf), backend="numpy")
    assert gg.config.rope_scaling is None and gg.config.rotary_dim == st.config.rotary_dim == 12
    ids = prompt("phi3")  # 26 tokens: past where the LongRoPE fixture switches to long factors
    _close_to_reference(gg, st, ids, atol=1e-3)
    # the twin is a different model from the LongRoPE fixture: reading this file as LongRoPE (or
    # the fixture as plain rope) moves the logits far beyond the bound above
    with np.load(HF_DIR / "phi3" / "reference.npz") as ref:
        assert np.abs(st.logits(ids) - ref["logits"]).max() > 0.1
