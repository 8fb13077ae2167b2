"""Hostile weights files: every lie a GGUF or safetensors file can tell is a one-line
WeightsError (or ConfigError) naming the file and what lies, never a MemoryError, a traceback
from struct/json/NumPy, or a model that generates text.

The files are written byte by byte (tests/gguf_util.py's raw writers), so each class of lie is
built on purpose rather than found in one sample file.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from gguf_util import (
    GGUF_ARRAY,
    GGUF_F32,
    GGUF_STRING,
    GGUF_U32,
    GGUF_U64,
    gguf_array,
    gguf_kv,
    gguf_str,
    gguf_tensor_info,
    raw_gguf,
    raw_gguf_tensors,
    raw_safetensors,
)

from tinyserve.errors import ConfigError, TinyServeError, WeightsError
from tinyserve.loading import load_checkpoint
from tinyserve.loading.ggml_types import GGMLQuantizationType as Q
from tinyserve.loading.gguf_file import read_gguf
from tinyserve.loading.safetensors_file import read_safetensors
from tinyserve.tokenizer import Tokenizer

F32, F16, Q8_0, Q4_K, Q6_K = int(Q.F32), int(Q.F16), int(Q.Q8_0), int(Q.Q4_K), int(Q.Q6_K)


def _read(tmp_path, raw: bytes, name: str = "hostile.gguf"):
    path = tmp_path / name
    path.write_bytes(raw)
    return read_gguf(path)


def _refused(tmp_path, raw: bytes, match: str, error=WeightsError):
    """The file is refused with `error`, one line naming the file and matching `match`."""
    with pytest.raises(error, match=match) as e:
        _read(tmp_path, raw)
    msg = str(e.value)
    assert "hostile.gguf" in msg and "\n" not in msg, msg
    return msg


def _norm(values=None) -> tuple[str, np.ndarray, int, tuple[int, ...]]:
    v = np.ones(32, np.float32) if values is None else np.asarray(values, np.float32)
    return "output_norm.weight", v, F32, (v.size,)


def _embd(name="token_embd.weight", rows=2) -> tuple[str, np.ndarray, int, tuple[int, ...]]:
    return name, np.full((rows, 32), 0.5, np.float32), F32, (32, rows)


def test_a_sane_raw_file_loads(tmp_path):
    """The writer's baseline: the hostile files below differ from this one in one lie each."""
    f = _read(tmp_path, raw_gguf_tensors([_norm(), _embd()]))
    assert set(f.tensors) == {"model.norm.weight", "model.embed_tokens.weight"}
    np.testing.assert_array_equal(f.tensors["model.embed_tokens.weight"], np.full((2, 32), 0.5))


# -- declared counts and sizes the file cannot hold --------------------------------------------

HUGE = 2**40


@pytest.mark.parametrize(
    "kv",
    [
        gguf_kv("big.strings", GGUF_ARRAY, gguf_array(GGUF_STRING, HUGE)),  # the vocab's path
        gguf_kv("few.strings", GGUF_ARRAY, gguf_array(GGUF_STRING, 1000)),  # the short path
        gguf_kv("big.numbers", GGUF_ARRAY, gguf_array(GGUF_U32, HUGE)),
        gguf_kv("big.arrays", GGUF_ARRAY, gguf_array(GGUF_ARRAY, HUGE)),
        gguf_kv("big.string", GGUF_STRING, struct.pack("<Q", 2**62)),
        gguf_kv("strings", GGUF_ARRAY, gguf_array(GGUF_STRING, 2000, struct.pack("<Q", 2**62))),
        gguf_str("x" * 10) + struct.pack("<I", GGUF_U64),  # the value is missing
        struct.pack("<Q", 2**63) + b"key",  # a key longer than the file
    ],
    ids=[
        "string-array",
        "short-string-array",
        "u32-array",
        "array-array",
        "string",
        "string-in-array",
        "missing-value",
        "key",
    ],
)
def test_declared_sizes_are_checked_before_allocation(tmp_path, kv):
    _refused(tmp_path, raw_gguf([kv], [], alignment=1), "truncated or corrupt")


# -- crashers found by fuzzing (tests/fuzz/run.py), kept as regressions --------------------------


def test_fuzz_string_length_past_int64_in_a_long_string_array(tmp_path):
    """gguf target, seed 1: a vocab-sized string array whose second string declares 2^64 - 1
    bytes overflowed the int64 offsets table (OverflowError) before the length was checked."""
    items = gguf_str("a") + struct.pack("<Q", 2**64 - 1) + bytes(9000)  # room for 1025 lengths
    kv = gguf_kv("tokenizer.ggml.tokens", GGUF_ARRAY, gguf_array(GGUF_STRING, 1025, items))
    _refused(tmp_path, raw_gguf([kv], [], alignment=1), "truncated or corrupt")


@pytest.mark.parametrize("field", ["n_kv", "n_tensors"])
def test_declared_record_counts_are_checked(tmp_path, field):
    raw = raw_gguf([], [gguf_tensor_info("t", (32,), F32, 0)], bytes(128), **{field: 2**60})
    _refused(tmp_path, raw, "truncated or corrupt")


def test_deeply_nested_arrays_are_refused(tmp_path):
    nested = gguf_array(GGUF_U32, 0)
    for _ in range(5000):  # 12 bytes a level: a RecursionError without a cap
        nested = gguf_array(GGUF_ARRAY, 1, nested)
    _refused(tmp_path, raw_gguf([gguf_kv("deep", GGUF_ARRAY, nested)], []), "nested")


def test_unknown_array_item_type(tmp_path):
    _refused(tmp_path, raw_gguf([gguf_kv("a", GGUF_ARRAY, gguf_array(99, 1))], []), "item type")


def test_duplicate_metadata_key(tmp_path):
    kv = gguf_kv("general.name", GGUF_STRING, gguf_str("a"))
    _refused(tmp_path, raw_gguf([kv, kv], []), "general.name.*twice")


@pytest.mark.parametrize("dims", [(2**40, 2**40), (2**63, 2), (0, 32)])
def test_tensor_dims_the_file_cannot_hold(tmp_path, dims):
    raw = raw_gguf([], [gguf_tensor_info("token_embd.weight", dims, F32, 0)], bytes(256))
    _refused(tmp_path, raw, "token_embd.weight")


# -- tensor data offsets -----------------------------------------------------------------------


def test_misaligned_offset_is_refused(tmp_path):
    raw = raw_gguf_tensors([_norm(), _embd()], offsets=[0, 132])  # 132 % 32 != 0
    _refused(tmp_path, raw, "token_embd.weight.*general.alignment 32")


def test_misaligned_for_a_declared_alignment(tmp_path):
    kv = gguf_kv("general.alignment", GGUF_U32, struct.pack("<I", 64))
    raw = raw_gguf_tensors([_norm(), _embd()], offsets=[0, 160], kvs=[kv], alignment=64)
    _refused(tmp_path, raw, "token_embd.weight.*general.alignment 64")


@pytest.mark.parametrize(
    "payload",
    [
        (GGUF_U32, struct.pack("<I", 24)),
        (GGUF_U32, struct.pack("<I", 0)),
        (GGUF_STRING, gguf_str("32")),
        (GGUF_F32, struct.pack("<f", 32.0)),
    ],
    ids=["not-a-power-of-two", "zero", "string", "float"],
)
def test_bad_alignment_values(tmp_path, payload):
    kv = gguf_kv("general.alignment", *payload)
    _refused(tmp_path, raw_gguf_tensors([_norm()], kvs=[kv]), "general.alignment")


def test_overlapping_tensors_are_refused(tmp_path):
    raw = raw_gguf_tensors([_norm(), _embd()], offsets=[0, 96])  # the norm's 128 bytes reach 128
    _refused(tmp_path, raw, "token_embd.weight overlaps.*output_norm.weight")


def test_two_tensors_sharing_one_offset(tmp_path):
    raw = raw_gguf_tensors([_embd("token_embd.weight"), _embd("output.weight")], offsets=[0, 0])
    _refused(tmp_path, raw, "overlaps")


def test_offset_past_the_end_of_the_file(tmp_path):
    raw = raw_gguf_tensors([_norm(), _embd()])
    raw = raw.replace(struct.pack("<IQ", F32, 128), struct.pack("<IQ", F32, 2**62))
    _refused(tmp_path, raw, "token_embd.weight extends past the end")


def test_duplicate_tensor_name(tmp_path):
    _refused(tmp_path, raw_gguf_tensors([_norm(), _embd(), _embd()]), "token_embd.weight.*twice")


def test_two_names_for_one_weight(tmp_path):
    """llama's q/k names map to HF names; a file may not name one HF weight twice either."""
    raw = raw_gguf_tensors([_embd("output.weight"), _embd("lm_head.weight")])
    _refused(tmp_path, raw, "output.weight and lm_head.weight")


def test_unknown_ggml_type(tmp_path):
    raw = raw_gguf([], [gguf_tensor_info("output_norm.weight", (32,), 77, 0)], bytes(128))
    _refused(tmp_path, raw, "output_norm.weight.*type id 77")


# -- NaN / Inf in weights ----------------------------------------------------------------------


def _q8_0(n_blocks: int, bad_block: int | None = None, value=np.nan) -> np.ndarray:
    """Q8_0 blocks (d f16 | 32 int8), scale 1; one block's d set to value."""
    blocks = np.zeros((n_blocks, 34), np.uint8)
    blocks[:, :2] = np.array([1.0], np.float16).view(np.uint8)
    blocks[:, 2:] = 3
    if bad_block is not None:
        blocks[bad_block, :2] = np.array([value], np.float16).view(np.uint8)
    return blocks


def _k_blocks(qtype: int, n_blocks: int, offset: int, value) -> np.ndarray:
    """K-quant blocks of zeros but for one f16 field (at offset) of block 0 set to value."""
    size = {Q4_K: 144, Q6_K: 210}[qtype]
    blocks = np.zeros((n_blocks, size), np.uint8)
    blocks[0, offset : offset + 2] = np.array([value], np.float16).view(np.uint8)
    return blocks


@pytest.mark.parametrize(
    "tensor, match",
    [
        (_norm([1.0] * 31 + [np.nan]), "output_norm.weight holds NaN"),
        (_norm([np.inf] + [1.0] * 31), "output_norm.weight holds NaN"),
        (
            ("output_norm.weight", np.array([1.0] * 31 + [np.inf], np.float16), F16, (32,)),
            "output_norm.weight holds NaN",
        ),
        (("token_embd.weight", _q8_0(4, 2), Q8_0, (64, 2)), "token_embd.weight: block 2"),
        (("token_embd.weight", _q8_0(4, 0, np.inf), Q8_0, (64, 2)), "block 0"),
        (("token_embd.weight", _k_blocks(Q4_K, 2, 2, -np.inf), Q4_K, (256, 2)), "scale"),
        (("token_embd.weight", _k_blocks(Q6_K, 2, 208, np.nan), Q6_K, (256, 2)), "scale"),
    ],
    ids=[
        "f32-nan",
        "f32-inf",
        "f16-inf",
        "q8_0-d-nan",
        "q8_0-d-inf",
        "q4_k-dmin-inf",
        "q6_k-d-nan",
    ],
)
def test_non_finite_weights_are_refused_at_load(tmp_path, tensor, match):
    _refused(tmp_path, raw_gguf_tensors([tensor]), match)


def test_finite_quant_scales_load(tmp_path):
    f = _read(tmp_path, raw_gguf_tensors([("token_embd.weight", _q8_0(4), Q8_0, (64, 2))]))
    np.testing.assert_array_equal(f.tensors["model.embed_tokens.weight"].dequantize(), 3.0)


# -- metadata the loader reads as numbers ------------------------------------------------------


def test_head_count_that_is_not_a_number(tmp_path):
    q = ("blk.0.attn_q.weight", np.ones((4, 32), np.float32), F32, (32, 4))
    kv = gguf_kv("llama.attention.head_count", GGUF_STRING, gguf_str("two"))
    _refused(tmp_path, raw_gguf_tensors([q], kvs=[kv]), "head_count", ConfigError)


def test_architecture_that_is_not_a_string(tmp_path):
    kv = gguf_kv("general.architecture", GGUF_U32, struct.pack("<I", 7))
    _refused(tmp_path, raw_gguf([kv], []), "general.architecture")


def test_random_header_corruption_gives_only_typed_errors(tmp_path):
    """Bytes of a valid raw file flipped at random: loading either works or is a TinyServeError."""
    raw = raw_gguf_tensors(
        [_norm(), ("token_embd.weight", _q8_0(4), Q8_0, (64, 2))],
        kvs=[gguf_kv("tokens", GGUF_ARRAY, gguf_array(GGUF_STRING, 2, gguf_str("a") * 2))],
    )
    rng = np.random.default_rng(0)
    for _ in range(300):
        b = bytearray(raw)
        for pos in rng.integers(0, 300, size=2):
            b[pos] = int(rng.integers(0, 256))
        try:
            _read(tmp_path, bytes(b))
        except TinyServeError as e:
            assert "\n" not in str(e)


# -- safetensors --------------------------------------------------------------------------------


def _st(tmp_path, header, data: bytes = b"", n=None, name="model.safetensors"):
    path = tmp_path / name
    path.write_bytes(raw_safetensors(header, data, n))
    return path


def _st_refused(tmp_path, header, data: bytes = b"", match: str = "", n=None):
    path = _st(tmp_path, header, data, n)
    with pytest.raises(WeightsError, match=match) as e:
        read_safetensors(path)
    assert "model.safetensors" in str(e.value) and "\n" not in str(e.value)


def _entry(offsets, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_safetensors_baseline_loads(tmp_path):
    path = _st(tmp_path, {"a": _entry([0, 8]), "b": _entry([8, 16])}, np.ones(4, "<f4").tobytes())
    assert set(read_safetensors(path)) == {"a", "b"}


@pytest.mark.parametrize("n", [2**63, 2**40, 10**6])
def test_safetensors_header_length_past_the_file(tmp_path, n):
    _st_refused(tmp_path, {"a": _entry([0, 8])}, bytes(8), "header of", n=n)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]},
        {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
        {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]},
        {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
        [1, 2],
    ],
)
def test_safetensors_malformed_entries(tmp_path, entry):
    _st_refused(tmp_path, {"a": entry}, bytes(8), "tensor 'a' has a malformed")


@pytest.mark.parametrize("shape", [(2**62, 2**62), (3,)])
def test_safetensors_size_disagrees_with_shape(tmp_path, shape):
    _st_refused(tmp_path, {"a": _entry([0, 8], shape)}, bytes(8), "tensor 'a'")


def test_safetensors_overlapping_and_shared_offsets(tmp_path):
    data = bytes(16)
    _st_refused(tmp_path, {"a": _entry([0, 8]), "b": _entry([4, 12])}, data, "'b' overlaps.*'a'")
    _st_refused(tmp_path, {"a": _entry([0, 8]), "b": _entry([0, 8])}, data, "overlaps")


def test_safetensors_out_of_file(tmp_path):
    _st_refused(tmp_path, {"a": _entry([2**62, 2**62 + 8])}, bytes(8), "'a' lies outside")


def test_safetensors_duplicate_name_in_the_header(tmp_path):
    a, b = json.dumps(_entry([0, 8])), json.dumps(_entry([8, 16]))
    header = f'{{"a": {a}, "a": {b}}}'
    _st_refused(tmp_path, header, bytes(16), "'a' appears twice")


@pytest.mark.parametrize("header", ["[" * 100_000, b"\xff\xfe{", "{}" + "x", "null"])
def test_safetensors_unreadable_headers(tmp_path, header):
    _st_refused(tmp_path, header, b"", "corrupt")


@pytest.mark.parametrize(
    "dtype, values",
    [
        ("F32", np.array([1, np.nan], "<f4")),
        ("F16", np.array([np.inf, 1], "<f2")),
        ("BF16", np.array([0x7FC0, 0x3F80], "<u2")),
    ],  # bf16 NaN, 1.0
)
def test_safetensors_non_finite_small_tensors(tmp_path, dtype, values):
    _st_refused(
        tmp_path,
        {"norm": _entry([0, values.nbytes], (2,), dtype)},
        values.tobytes(),
        "'norm' holds NaN",
    )


# -- a model folder's JSON files and its shard index -----------------------------------------


@pytest.fixture
def ckpt(tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(TINY, d)
    return d


def _index(d: Path, weight_map) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _all_in(shard: str) -> dict[str, str]:
    return {name: shard for name in read_safetensors(TINY / "model.safetensors")}


def test_index_baseline_loads(ckpt):
    _index(ckpt, _all_in("model.safetensors"))
    assert load_checkpoint(ckpt).tensors


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink-file", "symlink-dir"])
def test_index_shards_must_stay_inside_the_model_dir(ckpt, tmp_path, how):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(ckpt / "model.safetensors", outside / "model.safetensors")
    shard = {
        "dotdot": "../outside/model.safetensors",
        "absolute": str(outside / "model.safetensors"),
        "symlink-file": "link.safetensors",
        "symlink-dir": "sub/model.safetensors",
    }[how]
    (ckpt / "link.safetensors").symlink_to(outside / "model.safetensors")
    (ckpt / "sub").symlink_to(outside, target_is_directory=True)
    _index(ckpt, _all_in(shard))
    with pytest.raises(WeightsError, match="lies outside the model directory"):
        load_checkpoint(ckpt)


def test_index_symlinks_inside_the_dir_and_the_hub_cache_layout(tmp_path):
    """A snapshot of the Hugging Face hub cache links its files into ../../blobs: allowed."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in TINY.iterdir():
        if f.is_file():
            shutil.copy(f, blobs / f.name)
            (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    _index(snap, _all_in("model.safetensors"))
    assert load_checkpoint(snap).tensors


@pytest.mark.parametrize(
    "index, match",
    [
        ('{"weight_map": ["model.safetensors"]}', "weight_map must be an object, got array"),
        ('{"metadata": {}}', "weight_map must be an object, got null"),
        ('{"weight_map": {"a": 3}}', r"weight_map\['a'\] must be a shard"),
        ("[]", "not a JSON object"),
        ("{nope", "not valid JSON"),
    ],
)
def test_index_json_types(ckpt, index, match):
    (ckpt / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ConfigError, match=match) as e:
        load_checkpoint(ckpt)
    assert "model.safetensors.index.json" in str(e.value)


def test_a_tensor_in_two_shards(ckpt):
    shutil.copy(ckpt / "model.safetensors", ckpt / "copy.safetensors")
    names = list(_all_in(""))
    _index(
        ckpt,
        {n: ("model.safetensors" if i % 2 else "copy.safetensors") for i, n in enumerate(names)},
    )
    with pytest.raises(WeightsError, match="is in both"):
        load_checkpoint(ckpt)


def _edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"hidden_size": "64"}, "'hidden_size' must be int, got string"),
        ({"hidden_size": 64.0}, "'hidden_size' must be int, got number"),
        ({"num_hidden_layers": True}, "'num_hidden_layers' must be int, got bool"),
        ({"rms_norm_eps": None}, "'rms_norm_eps' must be number, got null"),
        ({"eos_token_id": [1, "2"]}, "'eos_token_id'"),
        ({"rope_scaling": [1]}, "'rope_scaling' must be object or null, got array"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling: field 'factor'"),
        ({"model_type": ["llama"]}, "'model_type' must be string"),
        ({"num_attention_heads": 0}, "num_attention_heads|n_heads|ZeroDivision"),
    ],
)
def test_config_json_fields_are_type_checked(ckpt, changes, match):
    _edit(ckpt / "config.json", **changes)
    with pytest.raises(ConfigError, match=match) as e:
        load_checkpoint(ckpt)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_config_json_non_finite_and_deep(ckpt):
    (ckpt / "config.json").write_text('{"rms_norm_eps": NaN}')
    with pytest.raises(ConfigError, match="non-finite"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text("[" * 100_000)
    with pytest.raises(ConfigError, match="config.json"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    "name, changes, match",
    [
        ("tokenizer_config.json", {"add_bos_token": "yes"}, "'add_bos_token'"),
        ("tokenizer_config.json", {"bos_token": 1}, "'bos_token'"),
        ("tokenizer_config.json", {"eos_token": {"id": 2}}, "'eos_token' is an object"),
        ("tokenizer_config.json", {"chat_template": 3}, "'chat_template'"),
        ("generation_config.json", {"eos_token_id": "2"}, "'eos_token_id'"),
        ("generation_config.json", {"bos_token_id": 1.5}, "'bos_token_id'"),
    ],
)
def test_tokenizer_json_files_are_type_checked(ckpt, name, changes, match):
    _edit(ckpt / name, **changes)
    with pytest.raises(ConfigError, match=match) as e:
        Tokenizer.from_dir(ckpt)
    assert name in str(e.value) and "\n" not in str(e.value)
    (ckpt / name).write_text("[1]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        Tokenizer.from_dir(ckpt)
