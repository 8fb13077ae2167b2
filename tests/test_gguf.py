"""GGUF loader: dequantizers vs gguf-py's reference, round trips through gguf.GGUFWriter."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf_util import llama_cpp_permute, write_gguf_from_hf_dir
from safetensors.numpy import save_file

from tinyserve.errors import ModelNotFound, TinyServeError, WeightsError
from tinyserve.loading.gguf_file import (
    QuantTensor,
    gguf_to_hf_name,
    permute_for_gguf,
    read_gguf,
    unpermute_from_gguf,
)

# Byte offsets of the f16 scale fields in each block (ggml-common.h): random bytes there could
# be inf/nan, so the tests put sane f16 values in them.
F16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}  # fmt: skip
QUANTIZABLE = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]  # gguf.quants can quantize these


def random_blocks(qtype, rows, blocks_per_row, rng, scale=1.0):
    """(rows, bytes_per_row) uint8 of random blocks whose f16 fields are finite."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    data = rng.integers(0, 256, (rows * blocks_per_row, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        f16 = np.clip(rng.standard_normal(len(data)) * scale, -65504, 65504).astype(np.float16)
        data[:, off : off + 2] = f16.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, blocks_per_row * type_size)


def quant_tensor(qtype, rows, blocks_per_row, rng, scale=1.0):
    block_size = GGML_QUANT_SIZES[qtype][0]
    data = random_blocks(qtype, rows, blocks_per_row, rng, scale)
    return QuantTensor(qtype, (rows, blocks_per_row * block_size), data)


# -- the type tables ------------------------------------------------------------------------


def test_type_tables_match_gguf():
    """tinyserve's copies of ggml's type ids, block sizes and GGUF value types agree with gguf-py."""
    from tinyserve.loading import ggml_types as ours
    from tinyserve.loading.ggml_quants import SUPPORTED_TYPES

    theirs = {q.name: int(q) for q in Q}
    mine = {q.name: int(q) for q in ours.GGMLQuantizationType}
    common = mine.keys() & theirs.keys()
    assert len(common) >= 30 and SUPPORTED_TYPES and {t.name for t in SUPPORTED_TYPES} <= common
    assert {n: mine[n] for n in common} == {n: theirs[n] for n in common}
    for n in common:
        assert ours.GGML_QUANT_SIZES[ours.GGMLQuantizationType[n]] == GGML_QUANT_SIZES[Q[n]], n
    assert {v.name: int(v) for v in ours.GGUFValueType} == {
        v.name: int(v) for v in gguf.GGUFValueType
    }
    # gguf's members work as keys of our tables and the other way round (IntEnum hashing)
    assert ours.GGML_QUANT_SIZES[Q.Q4_K] == GGML_QUANT_SIZES[ours.GGMLQuantizationType.Q4_K]


# -- dequantizers -------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
@pytest.mark.parametrize("scale", [1.0, 60000.0, 1e-7])
def test_dequantize_random_blocks_matches_gguf(qtype, scale):
    rng = np.random.default_rng(int(qtype) * 7 + int(np.log10(scale) + 10))
    qt = quant_tensor(qtype, rows=7, blocks_per_row=2, rng=rng, scale=scale)  # odd row count
    ref = gguf.quants.dequantize(qt.data, qtype)  # (7, cols)
    with np.errstate(over="ignore", invalid="ignore"):
        got = qt.dequantize()
    assert got.dtype == np.float32 and got.shape == qt.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_dequantize_quantized_values_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal((5, 96)).astype(np.float32)
    x[1] *= 1e4  # scales near the top of the f16 range
    x[2] = 0.0  # all-zero blocks (d == 0)
    x[3, :32] = 1e-6
    x[4, ::7] = -200.0
    data = gguf.quants.quantize(x, qtype)
    got = QuantTensor(qtype, x.shape, data).dequantize()
    np.testing.assert_array_equal(got, gguf.quants.dequantize(data, qtype))
    # and the quantization is what it claims to be: close to the input
    assert np.abs(got - x).max() <= np.abs(x).max() * 0.15


def test_dense_types_match_gguf(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 8)) * [[1], [1e4], [1e-4]]).astype(np.float32)
    w = gguf.GGUFWriter(tmp_path / "d.gguf", "llama")
    w.add_tensor("f32", x)
    w.add_tensor("f16", x.astype(np.float16))
    w.add_tensor("bf16", gguf.quants.quantize(x, Q.BF16), raw_dtype=Q.BF16)
    _write(w)
    t = read_gguf(tmp_path / "d.gguf").tensors
    np.testing.assert_array_equal(t["f32"], x)
    np.testing.assert_array_equal(t["f16"], x.astype(np.float16).astype(np.float32))
    bf16_ref = gguf.quants.dequantize(gguf.quants.quantize(x, Q.BF16), Q.BF16)
    np.testing.assert_array_equal(t["bf16"], bf16_ref)
    assert all(t[k].dtype == np.float32 and t[k].shape == (3, 8) for k in t)


def test_quant_tensor_rows():
    rng = np.random.default_rng(1)
    qt = quant_tensor(Q.Q4_K, rows=9, blocks_per_row=1, rng=rng)
    full = qt.dequantize()
    ids = [8, 0, 3, 3]
    np.testing.assert_array_equal(qt.dequantize_rows(ids), full[ids])
    perm = rng.permutation(9)
    taken = qt.take_rows(perm)
    assert taken.shape == (9, 256) and taken.qtype == Q.Q4_K
    np.testing.assert_array_equal(taken.dequantize(), full[perm])
    assert qt.block_size == 256 and qt.type_size == 144 and qt.nbytes == 9 * 144


def test_quant_tensor_rejects_bad_shapes():
    data = np.zeros((2, 34), np.uint8)
    with pytest.raises(WeightsError, match="block size"):
        QuantTensor(Q.Q8_0, (2, 33), data)
    with pytest.raises(WeightsError, match="shape"):
        QuantTensor(Q.Q8_0, (3, 32), data)
    with pytest.raises(WeightsError, match="IQ4_NL"):
        QuantTensor(Q.IQ4_NL, (2, 32), np.zeros((2, 18), np.uint8))


# -- q/k permutation ----------------------------------------------------------------------


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (4, 2), (6, 1)])
def test_permute_matches_llama_cpp(n_head, n_kv):
    rng = np.random.default_rng(n_head * 10 + n_kv)
    head_dim = 8
    wq = rng.standard_normal((n_head * head_dim, 5)).astype(np.float32)
    wk = rng.standard_normal((n_kv * head_dim, 5)).astype(np.float32)
    bk = rng.standard_normal(n_kv * head_dim).astype(np.float32)
    np.testing.assert_array_equal(
        permute_for_gguf(wq, n_head), llama_cpp_permute(wq, n_head, n_head)
    )
    np.testing.assert_array_equal(permute_for_gguf(wk, n_kv), llama_cpp_permute(wk, n_head, n_kv))
    np.testing.assert_array_equal(permute_for_gguf(bk, n_kv), llama_cpp_permute(bk, n_head, n_kv))
    np.testing.assert_array_equal(unpermute_from_gguf(permute_for_gguf(wk, n_kv), n_kv), wk)


def test_unpermute_quant_tensor_moves_raw_rows():
    rng = np.random.default_rng(2)
    qt = quant_tensor(Q.Q8_0, rows=16, blocks_per_row=2, rng=rng)
    back = unpermute_from_gguf(qt, n_head=2)
    assert isinstance(back, QuantTensor)
    np.testing.assert_array_equal(permute_for_gguf(back.dequantize(), 2), qt.dequantize())


def test_permute_rejects_odd_head_split():
    with pytest.raises(WeightsError, match="heads"):
        permute_for_gguf(np.zeros((12, 4)), 4)  # 3 rows per head: not even


# -- whole files ----------------------------------------------------------------------------

N_HEAD, N_KV, HEAD_DIM, D, F, V, L = 4, 2, 64, 256, 256, 40, 2
QTYPES = {  # HF suffix -> type stored in the file
    "q_proj.weight": Q.Q4_K, "k_proj.weight": Q.Q8_0, "v_proj.weight": Q.Q4_1,
    "o_proj.weight": Q.Q6_K, "gate_proj.weight": Q.Q5_K, "up_proj.weight": Q.Q4_0,
    "down_proj.weight": Q.F16,
}  # fmt: skip
BLOCK_NAMES = {  # GGUF name in block i -> HF name
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}  # fmt: skip
SHAPES = {
    "attn_q": (N_HEAD * HEAD_DIM, D), "attn_k": (N_KV * HEAD_DIM, D), "attn_v": (N_KV * HEAD_DIM, D),
    "attn_output": (D, N_HEAD * HEAD_DIM), "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F),
}  # fmt: skip
METADATA = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.tokens": ["a", "b", "ab", "<|im_end|>", "Ġé", ""],
    "tokenizer.ggml.merges": ["a b", "Ġ é"],
    "tokenizer.ggml.token_type": [1, 1, 1, 3, 1, 5],
    "tokenizer.ggml.scores": [0.0, -1.5, -2.25, 0.0, 3.0, -1e9],
    "tokenizer.ggml.bos_token_id": 3,
    "tokenizer.ggml.add_bos_token": False,
    "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
}


def _write(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_model(tmp_path, arch, rng):
    """Write a llama-shaped GGUF; returns (path, {hf_name: expected float32 array})."""
    w = gguf.GGUFWriter(tmp_path / f"{arch}.gguf", arch)
    w.add_block_count(L)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_tokenizer_model(METADATA["tokenizer.ggml.model"])
    w.add_token_list(METADATA["tokenizer.ggml.tokens"])
    w.add_token_merges(METADATA["tokenizer.ggml.merges"])
    w.add_token_types(METADATA["tokenizer.ggml.token_type"])
    w.add_token_scores(METADATA["tokenizer.ggml.scores"])
    w.add_bos_token_id(METADATA["tokenizer.ggml.bos_token_id"])
    w.add_add_bos_token(METADATA["tokenizer.ggml.add_bos_token"])
    w.add_chat_template(METADATA["tokenizer.chat_template"])
    permuted = arch == "llama"
    expected = {}

    def add(gguf_name, hf_name, x, qtype=Q.F32, n_head=None):
        permute = permuted and n_head
        if qtype in F16_FIELDS and qtype not in QUANTIZABLE:  # K-quants: random blocks
            block_size = GGML_QUANT_SIZES[qtype][0]
            data = random_blocks(qtype, x.shape[0], x.shape[1] // block_size, rng)
            want = gguf.quants.dequantize(data, qtype)  # as stored
            if permute:  # stored[i] = hf[order[i]], order from llama.cpp's own formula
                order = llama_cpp_permute(np.arange(x.shape[0]), n_head)
                want = want[np.argsort(order)]
        else:
            data = gguf.quants.quantize(llama_cpp_permute(x, n_head) if permute else x, qtype)
            # quantization works row by row, so it commutes with the row permutation
            want = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
        w.add_tensor(gguf_name, data, raw_dtype=qtype)
        expected[hf_name] = want

    def randn(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    add("token_embd.weight", "model.embed_tokens.weight", randn(V, D), Q.Q8_0)
    add("output_norm.weight", "model.norm.weight", randn(D))
    add("output.weight", "lm_head.weight", randn(V, D), Q.Q6_K)
    for i in range(L):
        for gname, hname in BLOCK_NAMES.items():
            kind = gname.split(".")[0]
            if gname.endswith(".bias"):
                x = randn(SHAPES[kind][0])
            else:
                x = randn(*SHAPES[kind]) if kind in SHAPES else randn(D)
            qtype = QTYPES.get(hname.split(".", 1)[-1], Q.F32) if x.ndim == 2 else Q.F32
            heads = {"attn_q": N_HEAD, "attn_k": N_KV}.get(kind)
            add(f"blk.{i}.{gname}", f"model.layers.{i}.{hname}", x, qtype, heads)
    add("blk.0.brand_new.weight", "blk.0.brand_new.weight", randn(3, 32), Q.Q8_0)
    _write(w)
    return tmp_path / f"{arch}.gguf", expected


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_read_gguf_round_trip(tmp_path, arch):
    path, expected = _tiny_model(tmp_path, arch, np.random.default_rng(3))
    f = read_gguf(path)
    assert set(f.tensors) == set(expected)
    for name, want in expected.items():
        t = f.tensors[name]
        got = t.dequantize() if isinstance(t, QuantTensor) else t
        np.testing.assert_array_equal(got, want, err_msg=name)
    q = f.tensors["model.layers.1.self_attn.q_proj.weight"]
    assert isinstance(q, QuantTensor) and q.qtype == Q.Q4_K and q.shape == (N_HEAD * HEAD_DIM, D)
    assert isinstance(f.tensors["model.layers.0.mlp.down_proj.weight"], np.ndarray)  # F16 -> f32
    assert f.gguf_names["lm_head.weight"] == "output.weight"
    meta = f.metadata
    assert meta["general.architecture"] == arch
    assert {k: meta[k] for k in METADATA} == METADATA
    assert meta[f"{arch}.attention.head_count_kv"] == N_KV and meta[f"{arch}.block_count"] == L
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == 1e-5  # f32 shown as written
    assert not any(k.startswith("GGUF.") for k in meta)


def test_quant_tensors_are_memory_mapped(tmp_path):
    path, _ = _tiny_model(tmp_path, "qwen2", np.random.default_rng(4))
    f = read_gguf(path)
    q = f.tensors["model.layers.0.self_attn.q_proj.weight"]
    norm = f.tensors["model.norm.weight"]
    for arr in (q.data, norm):
        base = arr
        while not isinstance(base, np.memmap) and base.base is not None:
            base = base.base
        assert isinstance(base, np.memmap), "tensor data was copied out of the file"


def test_loading_leaves_the_blocks_unmapped(tmp_path):
    """The scale check reads every block, so every page of a tensor: the loader drops them
    again (a later read maps them back from the file), or the whole file would stay resident
    until the backend had copied what it packs."""
    import mmap

    from conftest import mapped_bytes

    w = gguf.GGUFWriter(tmp_path / "big.gguf", "llama")
    x = np.random.default_rng(5).standard_normal((256, 4096)).astype(np.float32)
    w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    _write(w)
    t = read_gguf(tmp_path / "big.gguf").tensors["model.layers.0.mlp.up_proj.weight"]
    if mapped_bytes(t.data) is None:
        pytest.skip("no /proc/self/pagemap")
    assert mapped_bytes(t.data) <= 2 * mmap.PAGESIZE  # at most the pages it shares at its ends
    np.testing.assert_array_equal(t.dequantize(), gguf.quants.dequantize(t.data, Q.Q8_0))
    # reading through the mapping maps its pages back: the check above can tell
    assert mapped_bytes(t.data) >= t.data.nbytes - 2 * mmap.PAGESIZE


def test_header_matches_gguf_reader(tmp_path):
    """Our header parser vs gguf-py's GGUFReader on the same file: same values, same bytes."""
    path, _ = _tiny_model(tmp_path, "qwen2", np.random.default_rng(8))  # qwen2: stored as is
    f = read_gguf(path)
    reader = gguf.GGUFReader(path)
    fields = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(f.metadata) == list(fields)
    for key, field in fields.items():
        want = field.contents()
        if isinstance(want, float):  # ours shows an f32 by its shortest repr
            assert np.float32(f.metadata[key]) == np.float32(want), key
        else:
            assert f.metadata[key] == want, key
    assert [t.name for t in reader.tensors] == list(f.gguf_names.values())
    for t in reader.tensors:
        ours = f.tensors[gguf_to_hf_name(t.name, "qwen2")]
        if isinstance(ours, QuantTensor):
            assert ours.qtype == t.tensor_type
            np.testing.assert_array_equal(ours.data, t.data.reshape(ours.data.shape))
        else:
            np.testing.assert_array_equal(ours, gguf.quants.dequantize(t.data, t.tensor_type))


def test_long_string_arrays_read_lazily_like_gguf_reader(tmp_path):
    """A string array past _LAZY_STRINGS (a vocab) stays raw bytes until read (GGUFStrings):
    the same strings as gguf-py's reader, by index, slice and iteration, invalid UTF-8 replaced;
    cut short, the file is a WeightsError."""
    from tinyserve.loading.gguf_header import GGUFStrings

    words = [f"tok{i}" + "é" * (i % 3) for i in range(3000)] + ["", "a b", "\x00"]
    w = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    w.add_array("tokenizer.ggml.tokens", words)
    w.add_array("short.list", ["x", "y"])
    w.add_uint32("after", 7)
    _write(w)
    meta = read_gguf(tmp_path / "v.gguf").metadata
    got = meta["tokenizer.ggml.tokens"]
    assert isinstance(got, GGUFStrings) and isinstance(meta["short.list"], list)
    want = gguf.GGUFReader(tmp_path / "v.gguf").fields["tokenizer.ggml.tokens"].contents()
    assert len(got) == len(want) == len(words) and list(got) == want == words
    assert got[1] == words[1] and got[-1] == words[-1] and got[10:13] == words[10:13]
    assert got == words and meta["after"] == 7
    raw = (tmp_path / "v.gguf").read_bytes()
    bad = raw.replace("tok2999éé".encode(), b"tok2999\xff\xfe\xff\xfe")  # same length
    (tmp_path / "b.gguf").write_bytes(bad)
    assert read_gguf(tmp_path / "b.gguf").metadata["tokenizer.ggml.tokens"][2999] == "tok2999" + "\ufffd" * 4
    at = raw.index(b"tok1500")
    (tmp_path / "cut.gguf").write_bytes(raw[:at])
    with pytest.raises(WeightsError, match="cut.gguf"):
        read_gguf(tmp_path / "cut.gguf")


# -- bad files ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFound, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def test_bad_magic(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGML" + bytes(200))
    with pytest.raises(WeightsError, match="bad.gguf"):
        read_gguf(p)


@pytest.mark.parametrize("keep", [0, 10, 300, -100])
def test_truncated_file(tmp_path, keep):
    path, _ = _tiny_model(tmp_path, "llama", np.random.default_rng(5))
    raw = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(raw[:keep])  # a negative keep drops the last tensor bytes
    with pytest.raises(WeightsError, match="cut.gguf") as e:
        read_gguf(cut)
    assert "\n" not in str(e.value)


def test_corrupt_header_bytes_raise_only_our_errors(tmp_path):
    path, _ = _tiny_model(tmp_path, "llama", np.random.default_rng(9))
    raw = path.read_bytes()
    rng = np.random.default_rng(10)
    bad = tmp_path / "fuzz.gguf"
    for _ in range(100):
        b = bytearray(raw)
        for pos in rng.integers(0, 3000, size=3):  # the header: metadata and tensor infos
            b[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(b))
        try:
            read_gguf(bad)
        except TinyServeError as e:
            assert "\n" not in str(e)


def test_unsupported_quant_type_is_named(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "iq.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((2, 18), np.uint8), raw_dtype=Q.IQ4_NL)
    _write(w)
    with pytest.raises(WeightsError, match="IQ4_NL"):
        read_gguf(tmp_path / "iq.gguf")


# -- convert a tiny HF checkpoint -----------------------------------------------------------


def _tiny_hf_dir(tmp_path, model_type, rng, tie=False):
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = ["a", "b", "c", "Ġ"]
    vocab = {c: i for i, c in enumerate(chars)} | {"ab": 4, "Ġa": 5, "abc": 6}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("Ġ", "a"), ("ab", "c")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # ids 7, 8
    hf = tmp_path / f"hf-{model_type}"
    hf.mkdir()
    tok.save(str(hf / "tokenizer.json"))
    n_head, n_kv, head_dim, d, f, v = 4, 2, 16, 64, 96, 10  # vocab padded past the tokenizer
    cfg = {
        "model_type": model_type, "architectures": ["X"], "vocab_size": v, "hidden_size": d,
        "num_hidden_layers": 2, "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "head_dim": head_dim, "intermediate_size": f, "rms_norm_eps": 1e-6,
        "rope_theta": 100000.0, "max_position_embeddings": 128, "tie_word_embeddings": tie,
        "bos_token_id": 7, "eos_token_id": 8,
    }  # fmt: skip
    (hf / "config.json").write_text(json.dumps(cfg))
    (hf / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages[0]['content'] }}", "eos_token": "<|im_end|>"})
    )
    shapes = {"embed_tokens": (v, d), "norm": (d,)} | ({} if tie else {"lm_head": (v, d)})
    tensors = {
        f"model.{k}.weight" if k != "lm_head" else "lm_head.weight": s for k, s in shapes.items()
    }
    for i in range(2):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (n_head * head_dim, d),
            p + "self_attn.k_proj.weight": (n_kv * head_dim, d),
            p + "self_attn.v_proj.weight": (n_kv * head_dim, d),
            p + "self_attn.o_proj.weight": (d, n_head * head_dim),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }  # fmt: skip
        if model_type == "qwen2":
            for k, rows in (("q", n_head), ("k", n_kv), ("v", n_kv)):
                tensors[p + f"self_attn.{k}_proj.bias"] = (rows * head_dim,)
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in tensors.items()}
    save_file(arrays, str(hf / "model.safetensors"))
    return hf, cfg, arrays, tok


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_write_gguf_from_hf_dir_round_trip(tmp_path, model_type):
    hf, _, arrays, tok = _tiny_hf_dir(tmp_path, model_type, np.random.default_rng(6))

    def qtype_for(name, arr):
        return Q.Q8_0 if "mlp" in name else Q.F32

    out = write_gguf_from_hf_dir(hf, tmp_path / "m.gguf", qtype_for=qtype_for)
    f = read_gguf(out)
    assert set(f.tensors) == set(arrays)
    for name, want in arrays.items():
        t = f.tensors[name]
        if "mlp" in name:
            want = gguf.quants.dequantize(gguf.quants.quantize(want, Q.Q8_0), Q.Q8_0)
            t = t.dequantize()
        np.testing.assert_array_equal(t, want, err_msg=name)

    meta = f.metadata
    arch = model_type
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.attention.head_count_kv"] == 2
    assert meta[f"{arch}.attention.key_length"] == 16
    vocab = tok.get_vocab(with_added_tokens=True)
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get) + ["[PAD9]"]
    assert meta["tokenizer.ggml.token_type"] == [1] * 7 + [3, 3, 5]
    assert meta["tokenizer.ggml.merges"] == ["a b", "Ġ a", "ab c"]
    assert meta["tokenizer.ggml.bos_token_id"] == 7 and meta["tokenizer.ggml.eos_token_id"] == 8
    assert meta["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"

    config = f.config()
    assert (config.n_heads, config.n_kv_heads, config.head_dim) == (4, 2, 16)
    assert (config.vocab_size, config.intermediate_size, config.n_layers) == (10, 96, 2)
    assert config.rope_theta == 100000.0 and config.norm_eps == 1e-6
    assert config.tie_word_embeddings is False and config.eos_token_ids == (8,)


def test_write_gguf_tied_embeddings(tmp_path):
    hf, _, arrays, _ = _tiny_hf_dir(tmp_path, "llama", np.random.default_rng(7), tie=True)
    f = read_gguf(write_gguf_from_hf_dir(hf, tmp_path / "t.gguf"))
    assert "lm_head.weight" not in f.tensors and set(f.tensors) == set(arrays)
    assert f.config().tie_word_embeddings is True
