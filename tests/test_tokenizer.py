"""Tokenizer, IncrementalDetokenizer and chat templates, each checked against an independent route.

Oracles: a byte-level BPE trained here with `tokenizers` vs the same vocab rebuilt from GGUF
metadata; sentencepiece's own encode vs the SPM vocab rebuilt from GGUF; llama.cpp's ids for the
real SmolLM2 vocab (committed fixture, see make_tokenizer_fixtures.py); streaming vs full decode;
transformers' ids and decodes on a committed corpus (curated strings plus seeded random ones) for a
Llama-2-style tokenizer.model, SmolLM2's GGUF vocab and Gemma 3's (transformers_ids.json, written
offline by make_tokenizer_fixtures.py: transformers is not a test dependency).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyserve.detokenizer import IncrementalDetokenizer
from tinyserve.errors import RequestError, TokenizerError
from tinyserve.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"
TRICKY = json.loads((FIXTURES / "tricky_texts.json").read_text(encoding="utf-8"))["texts"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    """A small seeded corpus: words, accents, numbers, code; no emoji/CJK (left to byte fallback)."""
    rng = random.Random(0)
    words = re.findall(
        r"\S+",
        "the quick brown fox jumps over lazy dog hello world token model cache block "
        "café naïve straße über déjà vu return def class import numpy value index "
        "it's don't they'll we're I'm you've",
    )
    lines = []
    for _ in range(400):
        n = rng.randint(3, 12)
        line = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.3:
            line += f" {rng.randint(0, 10**6)}"
        if rng.random() < 0.2:
            line = "    " + line + ":"
        lines.append(line)
    return lines


def _gguf_roundtrip(tmp_path: Path, kv: dict) -> dict:
    """Write kv into a real GGUF file with gguf.GGUFWriter, read it back as a plain dict."""
    import gguf

    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(kv["model"])
    if "pre" in kv:
        w.add_tokenizer_pre(kv["pre"])
    w.add_token_list(kv["tokens"])
    w.add_token_types(kv["types"])
    if "merges" in kv:
        w.add_token_merges(kv["merges"])
    if "scores" in kv:
        w.add_token_scores(kv["scores"])
    for key, add in (
        ("bos", w.add_bos_token_id),
        ("eos", w.add_eos_token_id),
        ("eot", w.add_eot_token_id),
    ):
        if key in kv:
            add(kv[key])
    if kv.get("add_bos") is not None:
        w.add_add_bos_token(kv["add_bos"])
    if "chat_template" in kv:
        w.add_chat_template(kv["chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


# -- byte-level BPE (gpt2-style GGUF vocab) --------------------------------------------------
QWEN2_SPLIT = (  # Qwen2's tokenizer.json pre_tokenizer regex
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _hf_pre_tokenizer(pre: str):
    """The pre-tokenizer of these models' own tokenizer.json (independent of tinyserve's tables)."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt-2":
        return byte_level
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "qwen2":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise AssertionError(pre)


def _train_bpe(pre: str):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = _hf_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def _bpe_kv(hf_tok, pre: str) -> dict:
    """The trained tokenizer in the form llama.cpp's converter writes: tokens by id, types, 'a b' merges."""
    vocab = hf_tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "trained ids must be dense"
    merges = json.loads(hf_tok.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": vocab["<|im_start|>"],
        "eos": vocab["<|im_end|>"],
        "eot": vocab["<|endoftext|>"],
        "add_bos": False,
        "chat_template": CHATML,
    }


@pytest.fixture(scope="module", params=["gpt-2", "smollm>gpt-2", "qwen2"])
def bpe_pair(request, tmp_path_factory):
    """(trained tokenizers.Tokenizer, tinyserve Tokenizer rebuilt from a real GGUF file).

    "smollm>gpt-2": trained with SmolLM's digit-by-digit split, written with tokenizer.ggml.pre
    "smollm", and read as transformers' GGUF loader reads that name: with GPT-2's regex alone."""
    train_pre, _, use_pre = request.param.partition(">")
    hf_tok = _train_bpe(train_pre)
    hf_tok.pre_tokenizer = _hf_pre_tokenizer(use_pre or train_pre)
    meta = _gguf_roundtrip(tmp_path_factory.mktemp("bpe"), _bpe_kv(hf_tok, train_pre))
    return hf_tok, Tokenizer.from_gguf_metadata(meta)


@pytest.mark.parametrize("text", TRICKY)
def test_gguf_bpe_ids_match_trained_tokenizer(bpe_pair, text):
    hf_tok, tok = bpe_pair
    assert tok.encode(text) == hf_tok.encode(text).ids
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_gguf_bpe_special_tokens_and_ids(bpe_pair):
    hf_tok, tok = bpe_pair
    assert tok.vocab_size == hf_tok.get_vocab_size()
    assert tok.bos_token_id == hf_tok.token_to_id("<|im_start|>")
    assert tok.eos_token_ids == (
        hf_tok.token_to_id("<|im_end|>"),
        hf_tok.token_to_id("<|endoftext|>"),
    )
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # add_bos is False
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_ids[0]
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"  # kept by default, as transformers
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok.token_to_id(tok.id_to_token(300)) == 300
    # models pad their embedding past the vocab: such ids have no text (the engine may sample them)
    assert tok.decode([*ids, tok.vocab_size + 5]) == tok.decode(ids)
    with pytest.raises(TokenizerError, match="out of range"):
        tok.id_to_token(tok.vocab_size)
    with pytest.raises(TokenizerError, match="not in the vocab"):
        tok.token_to_id("no such token \u2603")


@pytest.fixture(scope="module")
def gpt2_trained():
    return _train_bpe("gpt-2")


@pytest.mark.parametrize("pre", ["default", "", "starcoder", "stablelm2"])
def test_gguf_bpe_names_without_a_split_keep_gpt2_regex(gpt2_trained, tmp_path, pre):
    """transformers' GGUF loader keeps GPT2Tokenizer's regex for every tokenizer.ggml.pre it has no
    split for (llama.cpp's "default" adds punctuation and digit splits, "stablelm2" Qwen2's)."""
    tok = Tokenizer.from_gguf_metadata(_gguf_roundtrip(tmp_path, _bpe_kv(gpt2_trained, pre)))
    for text in TRICKY:
        assert tok.encode(text) == gpt2_trained.encode(text).ids, text


def test_gguf_llama_bpe_adds_no_bos_unless_the_file_says_so(gpt2_trained, tmp_path):
    tok = Tokenizer.from_gguf_metadata(
        _gguf_roundtrip(tmp_path, _bpe_kv(gpt2_trained, "llama-bpe") | {"add_bos": None})
    )
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)


def test_gguf_add_bos_follows_metadata(tmp_path):
    kv = _bpe_kv(_train_bpe("gpt-2"), "gpt-2") | {"add_bos": True}
    tok = Tokenizer.from_gguf_metadata(_gguf_roundtrip(tmp_path, kv))
    assert tok.encode("hi")[0] == tok.bos_token_id
    assert tok.encode("hi")[1:] == tok.encode("hi", add_special_tokens=False)


def test_gguf_bad_metadata_is_a_clear_error():
    base = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a"],
        "tokenizer.ggml.merges": [],
    }
    with pytest.raises(TokenizerError, match="pre-tokenizer 'nope'"):
        Tokenizer.from_gguf_metadata(base | {"tokenizer.ggml.pre": "nope"})
    with pytest.raises(TokenizerError, match="tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata(base | {"tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})
    with pytest.raises(TokenizerError, match="token_type has 2 entries for 1 tokens"):
        Tokenizer.from_gguf_metadata(base | {"tokenizer.ggml.token_type": [1, 1]})


# -- sentencepiece (llama-style SPM GGUF vocab, tokenizer.model) ------------------------------
@pytest.fixture(scope="module")
def sp_model():
    """A tiny llama-style sentencepiece BPE: byte fallback, identity normalization, dummy prefix
    (trained by make_tokenizer_fixtures.py, committed with transformers' ids for it)."""
    import sentencepiece as spm

    path = FIXTURES / "spm_llama" / "tokenizer.model"
    return spm.SentencePieceProcessor(model_file=str(path)), path


def _sp_reference(sp, text: str) -> list[int]:
    """BOS, then sentencepiece's own encode. transformers differs from sentencepiece only after a
    special token and on text that starts with a space (no dummy prefix there): see _sp_agrees."""
    return [sp.bos_id(), *sp.encode(text)]


def _sp_agrees(text: str) -> bool:
    """Texts on which sentencepiece's encode is transformers' (the rest: transformers_ids.json)."""
    return not text.startswith(" ") and not re.search("<s>|</s>|<unk>", text)


def _sp_kv(sp) -> dict:
    """Pieces, scores and types as llama.cpp's convert_hf_to_gguf writes them."""
    n = sp.get_piece_size()

    def piece_type(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_unused(i):
            return 5
        return 6 if sp.is_byte(i) else 1

    return {
        "model": "llama",
        "tokens": [sp.id_to_piece(i) for i in range(n)],
        "scores": [sp.get_score(i) for i in range(n)],
        "types": [piece_type(i) for i in range(n)],
        "bos": sp.bos_id(),
        "eos": sp.eos_id(),
        "add_bos": True,
    }


@pytest.fixture(scope="module")
def spm_gguf_tok(sp_model, tmp_path_factory):
    sp, _ = sp_model
    return Tokenizer.from_gguf_metadata(
        _gguf_roundtrip(tmp_path_factory.mktemp("spm_gguf"), _sp_kv(sp))
    )


@pytest.fixture(scope="module")
def spm_dir_tok(sp_model, tmp_path_factory):
    _, model_path = sp_model
    d = tmp_path_factory.mktemp("spm_dir")
    (d / "tokenizer.model").write_bytes(model_path.read_bytes())
    (d / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "chat_template": CHATML})
    )
    return Tokenizer.from_dir(d)


@pytest.mark.parametrize("text", [t for t in TRICKY if _sp_agrees(t)])
def test_gguf_spm_ids_match_sentencepiece(sp_model, spm_gguf_tok, text):
    sp, _ = sp_model
    assert spm_gguf_tok.encode(text) == _sp_reference(sp, text)
    ids = spm_gguf_tok.encode(text, add_special_tokens=False)
    assert spm_gguf_tok.decode(ids) == sp.decode(ids) == text


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_model_dir_matches_sentencepiece_and_gguf_route(
    sp_model, spm_dir_tok, spm_gguf_tok, text
):
    sp, _ = sp_model
    ids = spm_dir_tok.encode(text)
    assert ids == spm_gguf_tok.encode(text)
    if _sp_agrees(text):
        assert ids == _sp_reference(sp, text)
    assert spm_dir_tok.decode(ids) == spm_gguf_tok.decode(ids)


def test_spm_byte_fallback_is_exercised(sp_model, spm_gguf_tok):
    sp, _ = sp_model
    ids = spm_gguf_tok.encode("日本 👍", add_special_tokens=False)
    assert any(sp.is_byte(i) for i in ids), "emoji/CJK must fall back to <0x..> byte pieces"
    assert spm_gguf_tok.decode(ids) == "日本 👍"


# -- tokenizer.json directory ----------------------------------------------------------------
def test_from_dir_tokenizer_json(tmp_path):
    hf_tok = _train_bpe("gpt-2")
    hf_tok.save(str(tmp_path / "tokenizer.json"))
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHATML}]
    cfg = {
        "bos_token": {"content": "<|im_start|>", "lstrip": False, "normalized": False},
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": templates,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id == hf_tok.token_to_id("<|im_start|>") == 1
    assert tok.eos_token_ids == (2, 0)
    for text in TRICKY:
        assert tok.encode(text) == [1, *hf_tok.encode(text).ids]
        assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text).ids
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).startswith(
        "<|im_start|>user"
    )


def test_from_dir_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_dir(tmp_path / "absent")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer.from_dir(tmp_path)


# -- incremental detokenizer -----------------------------------------------------------------
def _stream(tok, ids, skip_special_tokens=True, chunk=1):
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    deltas = [det.add(ids[k : k + chunk]) for k in range(0, len(ids), chunk)]
    return deltas, det.finish(), det


@pytest.fixture(scope="module")
def all_toks(bpe_pair, spm_gguf_tok, spm_dir_tok):
    return {"byte-level": bpe_pair[1], "spm-gguf": spm_gguf_tok, "sentencepiece": spm_dir_tok}


@pytest.mark.parametrize("kind", ["byte-level", "spm-gguf", "sentencepiece"])
@pytest.mark.parametrize("skip", [True, False])
def test_stream_of_random_ids_equals_full_decode(all_toks, kind, skip):
    tok = all_toks[kind]
    rng = random.Random(1)
    for trial in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        deltas, tail, _ = _stream(tok, ids, skip, chunk=1 + trial % 3)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip), ids
        assert not any(d.endswith("\ufffd") for d in deltas)


@pytest.mark.parametrize("kind", ["byte-level", "spm-gguf", "sentencepiece"])
def test_stream_of_unicode_text_never_splits_a_character(all_toks, kind):
    tok = all_toks[kind]
    text = " ".join(TRICKY[1:6]) + " 日本語 👨‍👩‍👧‍👦 🇫🇷 the end"
    ids = tok.encode(text, add_special_tokens=False)
    deltas, tail, det = _stream(tok, ids)
    assert "".join(deltas) == text and tail == ""
    assert not any("\ufffd" in d for d in deltas), "a delta carried half a UTF-8 character"
    assert det.text == text and det.output_ids == ids


def test_stream_keeps_spm_spaces_after_skipped_specials(spm_gguf_tok):
    tok = spm_gguf_tok
    ids = [*tok.encode("hello world", add_special_tokens=False), tok.eos_token_ids[0]]
    ids += tok.encode(" the end", add_special_tokens=False)
    deltas, tail, _ = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=True) == "hello world the end"


def test_stream_decodes_a_bounded_window(bpe_pair, monkeypatch):
    tok = bpe_pair[1]
    ids = tok.encode(" ".join(TRICKY) * 3, add_special_tokens=False)
    windows = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda i, **kw: windows.append(len(i)) or decode(i, **kw))
    deltas, tail, _ = _stream(tok, ids)
    assert "".join(deltas) + tail == decode(ids, skip_special_tokens=True)
    assert len(ids) > 300 and max(windows) <= 8, (
        "each step must decode a short window, not the whole output"
    )


# -- chat templates --------------------------------------------------------------------------
def test_chat_template_render_and_helpers(bpe_pair):
    tok = bpe_pair[1]
    assert tok.has_chat_template
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(msgs) == expected + "<|im_start|>assistant\n"
    tok2 = Tokenizer(
        tok._engine,
        bos_token_id=tok.bos_token_id,
        chat_template=(
            "{% if x %}\n  {% if x %}{{ bos_token }}|{{ messages | tojson }}|{{ strftime_now('%Y') | length }}"
            "{% endif %}\n{% endif %}"
        ),
    )
    out = tok2.apply_chat_template([{"role": "user", "content": "é"}], x=True)
    assert (
        out == '<|im_start|>|[{"role": "user", "content": "é"}]|4'
    )  # trim/lstrip blocks, no \u escapes


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{% set _ = messages.append(1) %}",
        "{{ raise_exception.__globals__ }}",
    ],
)
def test_chat_template_sandbox_blocks_escapes(bpe_pair, template):
    tok = Tokenizer(bpe_pair[1]._engine, chat_template=template)
    with pytest.raises(
        TokenizerError, match="unsafe|not safely callable|chat template error"
    ) as info:
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    import jinja2.exceptions

    assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)


def test_chat_template_errors(bpe_pair):
    engine = bpe_pair[1]._engine
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(engine).apply_chat_template([{"role": "user", "content": "x"}])
    raising = Tokenizer(engine, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="roles must alternate"):
        raising.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="does not compile"):
        Tokenizer(engine, chat_template="{% for %}").apply_chat_template([{"role": "user"}])
    with pytest.raises(RequestError, match="messages must be"):
        raising.apply_chat_template(["just a string"])


# -- the real SmolLM2 vocab ------------------------------------------------------------------
def _smollm2_gguf() -> Path:
    from conftest import default_model_gguf

    return default_model_gguf()


@pytest.fixture(scope="module")
def smollm2_tok():
    from tinyserve.loading.gguf_file import read_gguf  # the metadata the engine hands over

    return Tokenizer.from_gguf_metadata(read_gguf(_smollm2_gguf()).metadata)


@pytest.mark.real_model
def test_smollm2_ids_match_llama_cpp(smollm2_tok):
    """llama.cpp, a second opinion, splits SmolLM2's digits one by one first (as the model's
    tokenizer.json does) where transformers' GGUF loader, the reference, does not: they differ
    only where spaces run into a digit ("a  1"), which tricky_texts.json leaves to corpus.json."""
    ref = json.loads((FIXTURES / "smollm2_llamacpp_ids.json").read_text(encoding="utf-8"))
    assert ref["texts"] == TRICKY, (
        "rerun tests/make_tokenizer_fixtures.py after editing tricky_texts.json"
    )
    for text, ids in zip(ref["texts"], ref["ids"]):
        assert smollm2_tok.encode(text) == ids, text
        assert smollm2_tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.real_model
def test_smollm2_chat_template(smollm2_tok):
    tok = smollm2_tok
    assert tok.eos_token_ids == (tok.token_to_id("<|im_end|>"),)
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert tok.apply_chat_template(msgs) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(tok.apply_chat_template(msgs[:1]))
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids.count(tok.eos_token_ids[0]) == 2


# -- transformers' ids on the committed corpus -------------------------------------------------
CORPUS = json.loads((FIXTURES / "corpus.json").read_text(encoding="utf-8"))["texts"]


@pytest.fixture(scope="module")
def transformers_ref():
    return json.loads((FIXTURES / "transformers_ids.json").read_text(encoding="utf-8"))["models"]


def _mismatches(tok, ref: dict) -> list[str]:
    """Every corpus string on which tok's ids or decodes differ from transformers'."""
    bad = []
    for k, text in enumerate(CORPUS):
        plain = tok.encode(text, add_special_tokens=False)
        if tok.encode(text) != ref["ids"][k]:
            bad.append(f"encode {text!r}: {tok.encode(text)} != {ref['ids'][k]}")
        elif tok.decode(plain) != ref["decode"][k]:
            bad.append(f"decode {text!r}: {tok.decode(plain)!r} != {ref['decode'][k]!r}")
        elif tok.decode(plain, skip_special_tokens=True) != ref["decode_skip"][k]:
            bad.append(f"decode skip {text!r}: {tok.decode(plain, skip_special_tokens=True)!r}")
    return bad


def test_corpus_covers_the_classes(transformers_ref):
    assert len(CORPUS) > 400 and all(
        len(r["ids"]) == len(CORPUS) for r in transformers_ref.values()
    )
    for needle in (
        "    1",
        "\t\t",
        "\n\n1",
        "日本語",
        "שלום",
        "👨\u200d👩",
        "<s> </s>",
        "    return",
    ):
        assert any(needle in t for t in CORPUS), needle


def test_tokenizer_model_equals_transformers_llama_tokenizer(transformers_ref):
    """A Llama-2-style tokenizer.model: no extra space after a special token (<s> </s> <unk>)."""
    ref = transformers_ref["spm_llama"]
    tok = Tokenizer.from_dir(FIXTURES / "spm_llama")
    assert _mismatches(tok, ref) == []
    k = CORPUS.index("<s> </s> <unk>")
    assert [tok.id_to_token(i) for i in tok.encode(CORPUS[k])] == [
        "<s>",
        "<s>",
        "\u2581",
        "</s>",
        "\u2581",
        "<unk>",
    ]


@pytest.mark.parametrize("legacy", [True, False])
def test_tokenizer_model_legacy_flag(tmp_path, legacy):
    """transformers' legacy=True puts the dummy prefix on every run of text, also after a special
    token; legacy=False (its default) only at the start of the text."""
    (tmp_path / "tokenizer.model").write_bytes(
        (FIXTURES / "spm_llama" / "tokenizer.model").read_bytes()
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": legacy}))
    tok = Tokenizer.from_dir(tmp_path)
    pieces = [tok.id_to_token(i) for i in tok.encode("</s>hi", add_special_tokens=False)]
    assert pieces[0] == "</s>" and pieces[1].startswith("\u2581") == legacy, pieces


@pytest.mark.real_model
def test_smollm2_gguf_equals_transformers(smollm2_tok, transformers_ref):
    ref = transformers_ref["smollm2"]
    assert ref["sha256"] == hashlib.sha256(_smollm2_gguf().read_bytes()).hexdigest()
    assert _mismatches(smollm2_tok, ref) == []
    ids = smollm2_tok.encode("x    =     1;")  # the case: 4444 (ĠĠĠĠĠ) was wrong
    assert [smollm2_tok.id_to_token(i) for i in ids] == ["x", "ĠĠĠ", "Ġ=", "ĠĠĠĠ", "Ġ", "1", ";"]
    assert ids[3:5] == [289, 216]


@pytest.mark.real_model
def test_gemma3_gguf_equals_transformers(transformers_ref):
    from conftest import catalog_model

    from tinyserve.loading.gguf_file import read_gguf

    path = catalog_model("gemma3-270m")
    tok = Tokenizer.from_gguf_metadata(read_gguf(path).metadata)
    assert _mismatches(tok, transformers_ref["gemma3"]) == []


@pytest.mark.real_model
@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.text(
        st.characters(
            max_codepoint=0x3FFFF,
            exclude_categories=("Cs", "Cc", "Co", "Cn"),
            include_characters="\t\n\r",
        ),
        max_size=40,
    )
)
def test_smollm2_decode_inverts_encode(smollm2_tok, text):
    """Byte-level BPE loses nothing: decode(encode(s)) == s, special tokens kept. (Bytes the vocab
    has no token for are dropped, by transformers too: most C0 controls and the lead byte 0xF1 of
    planes 4 and up.)"""
    assert smollm2_tok.decode(smollm2_tok.encode(text)) == text
