"""Write the committed seed corpora (tests/fuzz/corpus/<target>/): small, valid (or nearly valid)
inputs each target's fuzzing starts from. Rerun after changing a target's input format:

    python tests/fuzz/make_corpus.py
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # tests/: gguf_util's raw writers

from gguf_util import (
    GGUF_ARRAY,
    GGUF_F32,
    GGUF_STRING,
    GGUF_U32,
    gguf_array,
    gguf_kv,
    gguf_str,
    raw_gguf_tensors,
    raw_safetensors,
)

CORPUS = HERE / "corpus"
FIXTURES = HERE.parent / "fixtures" / "hf"
F32, Q8_0 = 0, 8


def _u32(key: str, v: int) -> bytes:
    return gguf_kv(key, GGUF_U32, struct.pack("<I", v))


def _f32(key: str, v: float) -> bytes:
    return gguf_kv(key, GGUF_F32, struct.pack("<f", v))


def _strings(key: str, items: list[str]) -> bytes:
    return gguf_kv(
        key, GGUF_ARRAY, gguf_array(GGUF_STRING, len(items), b"".join(map(gguf_str, items)))
    )


def _q8_0(rows: int, cols: int, rng) -> np.ndarray:
    blocks = np.zeros((rows * cols // 32, 34), np.uint8)
    blocks[:, :2] = np.array([0.01], np.float16).view(np.uint8)
    blocks[:, 2:] = rng.integers(0, 256, (len(blocks), 32), dtype=np.uint8)
    return blocks


def tiny_llama_gguf(rng) -> bytes:
    """A whole one-layer llama GGUF (D 32, 2 heads of 16, 1 kv head, vocab 8) with a gpt2 vocab."""
    D, F, V = 32, 32, 8
    kvs = [_u32("llama.embedding_length", D), _u32("llama.block_count", 1),
           _u32("llama.attention.head_count", 2), _u32("llama.attention.head_count_kv", 1),
           _u32("llama.feed_forward_length", F), _u32("llama.context_length", 64),
           _f32("llama.attention.layer_norm_rms_epsilon", 1e-5), _f32("llama.rope.freq_base", 1e4),
           gguf_kv("tokenizer.ggml.model", GGUF_STRING, gguf_str("gpt2")),
           gguf_kv("tokenizer.ggml.pre", GGUF_STRING, gguf_str("smollm")),
           _strings("tokenizer.ggml.tokens", ["a", "b", "ab", "Ġ", "Ġa", "<s>", "</s>", "1"]),
           _strings("tokenizer.ggml.merges", ["a b", "Ġ a"]),
           _u32("tokenizer.ggml.bos_token_id", 5), _u32("tokenizer.ggml.eos_token_id", 6)]  # fmt: skip
    norm = np.ones(D, np.float32)
    tensors = [("token_embd.weight", _q8_0(V, D, rng), Q8_0, (D, V)),
               ("output_norm.weight", norm, F32, (D,)),
               ("blk.0.attn_norm.weight", norm, F32, (D,)),
               ("blk.0.ffn_norm.weight", norm, F32, (D,))]  # fmt: skip
    for name, rows, cols in [("attn_q", 32, D), ("attn_k", 16, D), ("attn_v", 16, D),
                             ("attn_output", D, 32), ("ffn_gate", F, D), ("ffn_up", F, D),
                             ("ffn_down", D, F)]:  # fmt: skip
        tensors.append((f"blk.0.{name}.weight", _q8_0(rows, cols, rng), Q8_0, (cols, rows)))
    return raw_gguf_tensors(tensors, kvs=kvs)


def gguf_seeds(rng) -> dict[str, bytes]:
    norm = ("output_norm.weight", np.ones(32, np.float32), F32, (32,))
    many = _strings("tokenizer.ggml.tokens", [f"t{i}" for i in range(1100)])  # the lazy path
    nested = gguf_kv(
        "nested", GGUF_ARRAY, gguf_array(GGUF_ARRAY, 1, gguf_array(GGUF_U32, 1, b"\1\0\0\0"))
    )
    return {
        "tiny_llama.gguf": tiny_llama_gguf(rng),
        "one_tensor.gguf": raw_gguf_tensors([norm]),
        "aligned_64.gguf": raw_gguf_tensors(
            [norm, ("token_embd.weight", _q8_0(2, 32, rng), Q8_0, (32, 2))],
            kvs=[_u32("general.alignment", 64)],
            alignment=64,
        ),
        "long_strings.gguf": raw_gguf_tensors([norm], kvs=[many, nested]),
    }  # fmt: skip


def safetensors_seeds() -> dict[str, bytes]:
    def entry(dtype, shape, a, b):
        return {"dtype": dtype, "shape": shape, "data_offsets": [a, b]}

    data = np.arange(8, dtype="<f4").tobytes()
    return {
        "two.safetensors": raw_safetensors({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2, 3], 8, 32)}, data),
        "dtypes.safetensors": raw_safetensors({"__metadata__": {"format": "pt"}, "h": entry("F16", [4], 0, 8),
                                               "bf": entry("BF16", [2, 2], 8, 16), "i": entry("I64", [2], 16, 32)},
                                              np.ones(8, "<f4").tobytes()),
        "empty.safetensors": raw_safetensors({"e": entry("F32", [0], 0, 0)}),
    }  # fmt: skip


TEMPLATES = {
    "chatml": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "llama2": "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}",
    "hostile_class": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "hostile_globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "hostile_loop": "{% for i in range(100) %}{% for m in messages %}{{ m.content|tojson }}{% break %}{% endfor %}{% endfor %}",
    "set_and_filters": "{% set ns = namespace(x=0) %}{% for m in messages %}{% set ns.x = ns.x + 1 %}{{ m.role|upper }}{{ m.content|length }}{% endfor %}{{ ns.x }}{{ strftime_now('%Y') }}",
    "broken": "{% for m in messages %}{{ m.content }",
}  # fmt: skip


def protocol_seeds() -> dict[str, bytes]:
    bodies = {
        "completion": {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0.5},
        "completion_ids": {"prompt": [5, 6, 7], "max_tokens": 2, "logprobs": 2, "stop": ["\n"]},
        "completion_stream": {"prompt": "x", "stream": True, "stream_options": {"include_usage": True},
                              "top_k": 3, "min_p": 0.1, "seed": 1, "n": 2, "stop_token_ids": [2]},
        "chat": {"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "hi"}], "max_completion_tokens": 3},
        "chat_parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                       "logprobs": True, "top_logprobs": 2, "response_format": {"type": "text"}},
    }  # fmt: skip
    return {f"{k}.json": json.dumps(v).encode() for k, v in bodies.items()}


def main() -> None:
    rng = np.random.default_rng(0)
    seeds = {
        "gguf": gguf_seeds(rng),
        "safetensors": safetensors_seeds(),
        "model_config": {
            f"{d.name}.json": (d / "config.json").read_bytes()
            for d in sorted(FIXTURES.iterdir())
            if (d / "config.json").exists()
        },
        "gguf_vocab": {
            f"random_{i}.bin": rng.integers(0, 256, 64 << (i % 4), dtype=np.uint8).tobytes()
            for i in range(8)
        },
        "chat_template": {
            f"{k}.txt": v.encode() + b"\0" + rng.integers(0, 256, 96, dtype=np.uint8).tobytes()
            for k, v in TEMPLATES.items()
        },
        "protocol": protocol_seeds(),
    }
    for target, files in seeds.items():
        d = CORPUS / target
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
        print(f"{target}: {len(files)} seeds, {sum(map(len, files.values()))} bytes")


if __name__ == "__main__":
    main()
