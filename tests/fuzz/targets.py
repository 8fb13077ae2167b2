"""Fuzz targets: bytes -> one parser of untrusted input, whose only allowed failure is the
project's typed error (TinyServeError; for the server's request parsing also its HTTPError).

Every other exception is a bug: atheris reports it as a crash (tests/fuzz/run.py), and the seed
corpus test (tests/test_fuzz_corpus.py) runs the committed inputs through the same functions
without atheris. The targets read their bytes with `Reader` below, not atheris'
FuzzedDataProvider, so that a corpus file means the same thing with or without atheris.

Targets: gguf (header, tensor records, layout, config), safetensors (header), model_config
(config.json -> ModelConfig), gguf_vocab (the tokenizer built from GGUF metadata, then encode
and decode), chat_template (hostile jinja2 templates in the sandbox), protocol (the server's
request bodies -> prompts and SamplingParams).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from tinyserve.errors import TinyServeError

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
TINY = HERE.parent / "fixtures" / "hf" / "smollm2"
_SCRATCH = Path(tempfile.mkdtemp(prefix="tinyserve-fuzz-"))


class Reader:
    """Deterministic choices from a byte string; past its end every read gives 0 / empty."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def int(self, bits: int = 8) -> int:
        n = 0
        for _ in range(bits // 8):
            n = n << 8 | self.byte()
        return n

    def pick(self, options):
        return options[self.byte() % len(options)]

    def text(self, max_len: int = 16) -> str:
        """UTF-8 with bad bytes replaced, as GGUF and JSON strings reach the code."""
        n = self.byte() % (max_len + 1)
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")

    def until(self, sep: bytes = b"\0") -> bytes:
        end = self.data.find(sep, self.pos)
        end = len(self.data) if end < 0 else end
        out, self.pos = self.data[self.pos : end], end + len(sep)
        return out


# -- weights files -----------------------------------------------------------------------------


def gguf(data: bytes) -> None:
    """A GGUF file: header, metadata, tensor records, data layout, then its ModelConfig."""
    from tinyserve.loading.gguf_file import read_gguf

    path = _SCRATCH / "input.gguf"
    path.write_bytes(data)
    f = read_gguf(path)
    for t in f.tensors.values():  # each tensor's first row must be readable
        if hasattr(t, "dequantize_rows"):
            t.dequantize_rows([0])
        else:
            t.reshape(-1)[:1].sum()
    f.config()


def safetensors(data: bytes) -> None:
    """A .safetensors file: its header and tensor entries."""
    from tinyserve.loading.safetensors_file import read_safetensors

    path = _SCRATCH / "input.safetensors"
    path.write_bytes(data)
    for t in read_safetensors(path).values():
        getattr(t, "bits", t).reshape(-1)[:1].sum()


def model_config(data: bytes) -> None:
    """config.json bytes -> ModelConfig."""
    from tinyserve.loading.json_file import parse_json_object
    from tinyserve.loading.model_config import config_from_hf

    config_from_hf(parse_json_object(data, "config.json"))


# -- tokenizers and chat templates -------------------------------------------------------------

_PIECES = ["a", "b", "ab", "ba", " ", "Ġ", "Ġa", "▁", "▁a", "<0x41>", "<0xFF>", "<0xZZ>", "<s>",
           "</s>", "<unk>", "\n", "Ċ", "1", "23", "é", "日本", "", "a b", "<|im_end|>"]  # fmt: skip
_PRES = ["default", "gpt-2", "llama-bpe", "smollm", "qwen2", "gpt2", "starcoder", "", "nope"]


def _value(r: Reader, kind: str):
    """A metadata value of the kind the tokenizer expects, or (sometimes) of another type,
    as a file may hold."""
    choice = r.byte() % 8
    if choice == 7:
        return r.pick([None, "x", 1.5, [1, 2], -1, 2**40, True])
    if kind == "id":
        return r.int(8) - 4
    if kind == "bool":
        return bool(choice & 1)
    return r.text()


def gguf_vocab(data: bytes) -> None:
    """tokenizer.ggml.* metadata -> Tokenizer (gpt2 BPE or llama SPM), then encode and decode."""
    from tinyserve.detokenizer import IncrementalDetokenizer
    from tinyserve.tokenizer import Tokenizer

    r = Reader(data)
    n = r.byte() % 48
    tokens = [r.pick(_PIECES) if r.byte() % 3 else r.text(6) for _ in range(n)]
    meta = {
        "tokenizer.ggml.model": r.pick(["gpt2", "llama", "llama", "bert", 3]),
        "tokenizer.ggml.pre": r.pick(_PRES),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [r.byte() % 8 for _ in range(n + (r.byte() % 5 == 0))],
        "tokenizer.ggml.scores": [float(r.int(8) - 128) for _ in range(n)],
        "tokenizer.ggml.merges": [f"{r.pick(tokens or ['a'])} {r.pick(tokens or ['b'])}"
                                  if r.byte() % 4 else r.text(6) for _ in range(r.byte() % 32)],
    }  # fmt: skip
    for key, kind in [("bos_token_id", "id"), ("eos_token_id", "id"), ("eot_token_id", "id"),
                      ("add_bos_token", "bool"), ("add_eos_token", "bool"),
                      ("add_space_prefix", "bool")]:  # fmt: skip
        if r.byte() % 2:
            meta[f"tokenizer.ggml.{key}"] = _value(r, kind)
    for key in [k for k in meta if r.byte() % 16 == 0]:  # now and then a field is missing
        del meta[key]
    tok = Tokenizer.from_gguf_metadata(meta)
    text = r.text(64)
    ids = tok.encode(text)
    tok.decode(ids)
    tok.decode([r.int(16) % (tok.vocab_size + 4) for _ in range(r.byte() % 8)], False)
    det = IncrementalDetokenizer(tok)
    for i in ids:
        det.add(i)
    det.finish()


_ROLES = ["system", "user", "assistant", "tool", "", None, 3]


def _messages(r: Reader) -> list:
    out = []
    for _ in range(r.byte() % 5):
        m = {"role": r.pick(_ROLES), "content": r.pick([r.text(24), None, 7, ["x"], {"a": 1}])}
        if r.byte() % 8 == 0:
            m.pop("role")
        out.append(m if r.byte() % 16 else r.pick(["not a dict", 1, None]))
    return out


def chat_template(data: bytes) -> None:
    """A chat template (the text up to the first NUL) rendered over messages from the rest."""
    from tinyserve.chat_template import check_messages, compile_chat_template, render_chat_template

    r = Reader(data)
    source = r.until().decode("utf-8", "replace")
    messages = _messages(r)
    template = compile_chat_template(source)
    check_messages(messages)
    variables = {"bos_token": "<s>", "eos_token": "</s>", "tools": None}
    render_chat_template(template, messages, bool(r.byte() & 1), variables)


# -- the server's request parsing --------------------------------------------------------------

_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from tinyserve.tokenizer import Tokenizer

        _TOKENIZER = Tokenizer.from_dir(TINY)
    return _TOKENIZER


def protocol(data: bytes) -> None:
    """A request body -> what /v1/completions or /v1/chat/completions would submit."""
    from tinyserve.engine import token_id_list
    from tinyserve.serving import protocol as p

    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # the app answers 400: not the parsers' input
        return
    if not isinstance(body, dict):
        return
    tok = _tokenizer()
    chat = "messages" in body
    p._check_fields(body, {**p._COMMON, **p._SAMPLING, **(p._CHAT if chat else p._COMPLETION)})
    p._field(body, "model", "str")
    if chat:
        messages = p._chat_messages(body)
        top_n = p._field(body, "top_logprobs", "int", 0) if body.get("logprobs") else None
        max_tokens = p._field(
            body, "max_completion_tokens", "int", p._field(body, "max_tokens", "int")
        )
        p._sampling_params(body, max_tokens, top_n, 4096, "top_logprobs")
        tok.encode(tok.apply_chat_template(messages))
    else:
        prompts = p.completion_prompts(body, tok)
        top_n = p._field(body, "logprobs", "int")
        echo = p._field(body, "echo", "bool", False)
        max_tokens = p._field(body, "max_tokens", "int")
        p._sampling_params(body, max_tokens, top_n, 4096, prompt_logprobs=top_n if echo else None)
        for prompt in prompts:  # what the engine thread then does with each
            if isinstance(prompt, str):
                tok.encode(prompt)
            else:
                token_id_list(prompt)


def _protocol_errors() -> tuple[type[BaseException], ...]:
    from tinyserve.serving.protocol import HTTPError

    return (TinyServeError, HTTPError)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "gguf": gguf,
    "safetensors": safetensors,
    "model_config": model_config,
    "gguf_vocab": gguf_vocab,
    "chat_template": chat_template,
    "protocol": protocol,
}


def run_one(name: str, data: bytes) -> None:
    """Run target `name` on data; its typed errors are the parser's answer, anything else raises."""
    allowed = _protocol_errors() if name == "protocol" else (TinyServeError,)
    try:
        TARGETS[name](data)
    except allowed:
        pass
