"""The grammar engine reads each token as the engine prints it.

Oracle: for every token id, the bytes llguidance matches against a grammar (LLTokenizer.
decode_bytes, on the LLTokenizer that GrammarCompiler builds from the tokenizer.json text) are the
text the engine prints for that token in a constrained output (IncrementalDetokenizer with
keep_leading_space, as engine.py makes it), and every token the engine skips as special is one
llguidance never lets into a grammar's text. The two read one `tokenizers.Tokenizer` by
different code (llguidance's Rust spells bytes from id_to_token; the detokenizer runs the
tokenizer's decoder, or SPMEngine's pieces), so a vocab rebuilt one way and read the other shows
here. A token that is half a UTF-8 character prints U+FFFD alone, so it is compared inside the
single-byte tokens that complete the character around it, which print exactly.

llguidance forbids a few tokens the engine prints, never the other way round; these are asserted
to be exactly:
  - the single byte 0xFF (never valid UTF-8), which llguidance uses as its special-token marker;
  - ids past the tokenizer's vocab (a model padding its embedding): llguidance names them
    "<[id]>", the engine prints "";
  - user-defined added tokens spelled like a tag (Gemma 3's "<table>" ...): llguidance holds
    an added token that reads "<...>" special even where the vocab does not (its runs of newlines
    and "[multimodal]" it keeps as text), so a grammar spells such text with other tokens.

Then the masks, against the printed texts: a choice's first step allows exactly the tokens that
print a prefix of a choice (the default model's "No", id 5230, is not one of "yes" / "no"), EOS
only once a choice is complete, and no special token even where the grammar's text is its text.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import HF_DIR, catalog_model, default_model_gguf

from tinyserve.detokenizer import IncrementalDetokenizer
from tinyserve.structured import GrammarCompiler, StructuredOutputsParams
from tinyserve.tokenizer import Tokenizer

pytest.importorskip("llguidance")

SPM_DIR = HF_DIR.parent / "tokenizer" / "spm_llama"  # a llama-style tokenizer.model


def printed(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    """The text the engine streams for these output ids under a grammar."""
    det = IncrementalDetokenizer(tokenizer, skip_special_tokens, keep_leading_space=True)
    return det.add(ids) + det.finish()


def _completions():
    """(prefix, suffix) byte pairs that may make a partial UTF-8 sequence whole."""
    prefixes = [b"", b"\xc3", b"\xe4", b"\xe4\xb8", b"\xf0", b"\xf0\x9f", b"\xf0\x9f\x98"]
    tails = itertools.chain.from_iterable(
        itertools.product((0x80, 0x90, 0xA0), repeat=n) for n in range(4)
    )
    suffixes = [bytes(t) for t in tails]
    return [(p, s) for p in prefixes for s in suffixes]


COMPLETIONS = _completions()


def _whole(b: bytes) -> tuple[bytes, bytes] | None:
    for p, s in COMPLETIONS:
        try:
            (p + b + s).decode("utf-8")
        except UnicodeDecodeError:
            continue
        return p, s
    return None  # a byte no UTF-8 holds (0xC0, 0xF5...): its token prints U+FFFD in any context


@dataclass(frozen=True)
class Printed:
    """Each token id alone as a constrained output prints it."""

    text: list[str]  # special tokens skipped, as the engine's default skip_special_tokens
    special: dict[int, str]  # the skipped ones -> their text (skip_special_tokens=False)

    @classmethod
    def of(cls, tokenizer, n_vocab: int) -> Printed:
        text = [printed(tokenizer, [i]) for i in range(n_vocab)]
        shown = {i: printed(tokenizer, [i], False) for i, t in enumerate(text) if not t}
        return cls(text, {i: t for i, t in shown.items() if t})


def vocab_differences(tokenizer, compiler: GrammarCompiler, view: Printed) -> dict[str, list]:
    """Token ids on which llguidance's bytes and the printed text disagree, by kind."""
    llg = compiler.tokenizer
    n = compiler.vocab_size
    grammar_bytes = [llg.decode_bytes([i]) for i in range(n)]
    forbidden = [llg.is_special_token(i) for i in range(n)]
    byte_token = {}  # byte -> a token of just that byte, to complete half characters with
    for i, b in enumerate(grammar_bytes):
        if len(b) == 1 and not forbidden[i]:
            byte_token.setdefault(b[0], i)
    differ, skipped_but_allowed, forbidden_but_printed = [], [], []
    for i in range(n):
        text = view.text[i]
        if i in view.special and not forbidden[i]:
            skipped_but_allowed.append(i)  # the dangerous way: special text inside a grammar
        if forbidden[i]:
            if text:
                forbidden_but_printed.append(i)
            continue
        b = grammar_bytes[i]
        if b.decode("utf-8", "replace") != text:
            differ.append((i, b, text))
            continue
        if b.decode("utf-8", "replace").encode() == b:
            continue  # whole characters: the text comparison was exact
        around = _whole(b)
        if around is None or any(x not in byte_token for x in around[0] + around[1]):
            continue
        p, s = around
        ids = [byte_token[x] for x in p] + [i] + [byte_token[x] for x in s]
        if printed(tokenizer, ids) != (p + b + s).decode("utf-8"):
            differ.append((i, b, printed(tokenizer, ids)))
    return {
        "differ": differ,
        "skipped_but_allowed": skipped_but_allowed,
        "forbidden_but_printed": forbidden_but_printed,
    }


def _is_tag(text: str) -> bool:
    return text.startswith("<") and text.endswith(">")


def expected_forbidden_but_printed(tokenizer, view: Printed) -> list[int]:
    """The divergences the module docstring lists, found from tinyserve's side: user-defined
    added tokens spelled "<...>", and the byte 0xFF ("ÿ" in a byte-level vocab, "<0xFF>" in an
    SPM one)."""
    added = json.loads(tokenizer.tokenizers_json())["added_tokens"]
    tags = {a["id"] for a in added if not a["special"] and _is_tag(a["content"])}
    byte_ff = {
        i
        for i in range(tokenizer.vocab_size)
        if view.text[i] == "\ufffd" and tokenizer.id_to_token(i) in ("ÿ", "<0xFF>")
    }
    return sorted(tags | byte_ff)


def assert_vocab_agrees(tokenizer, compiler: GrammarCompiler, view: Printed) -> None:
    diff = vocab_differences(tokenizer, compiler, view)
    assert diff["differ"] == [], f"grammar bytes != printed text: {diff['differ'][:10]}"
    assert diff["skipped_but_allowed"] == [], "special tokens a grammar could emit as text"
    assert diff["forbidden_but_printed"] == expected_forbidden_but_printed(tokenizer, view)
    llg = compiler.tokenizer
    for i in range(tokenizer.vocab_size, compiler.vocab_size):  # an embedding's padding rows
        assert llg.is_special_token(i) and view.text[i] == "", i


# -- the vocabularies --------------------------------------------------------------------------


def _spm_meta(**extra) -> dict:
    """spm_llama's pieces as llama.cpp's converter writes a GGUF's tokenizer.ggml.* metadata."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SPM_DIR / "tokenizer.model"))

    def piece_type(i):  # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 6 byte
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    n = sp.get_piece_size()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [piece_type(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        **extra,
    }


def _bpe_meta() -> dict:
    """The tiny SmolLM2 fixture's tokenizer.json as a byte-level GGUF vocab with two user-defined
    tokens (added, printed as text): one of its own and an extra "<tag>"."""
    tj = json.loads((HF_DIR / "smollm2" / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get) + ["<tag>"]
    special = {a["content"] for a in tj["added_tokens"] if a["special"]}
    types = [3 if t in special else 1 for t in tokens]
    types[tokens.index("Ġwh")] = types[-1] = 4
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [" ".join(m) for m in tj["model"]["merges"]],
        "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
    }


def _tiny(name: str) -> tuple[Tokenizer, int]:
    """A tiny fixture's tokenizer and the logits width it serves."""
    if name in ("smollm2", "qwen2"):  # qwen2: the model pads its vocab past the tokenizer
        cfg = json.loads((HF_DIR / name / "config.json").read_text())
        return Tokenizer.from_dir(HF_DIR / name), cfg["vocab_size"]
    tok = {
        "spm-dir": lambda: Tokenizer.from_dir(SPM_DIR),
        "spm-gguf": lambda: Tokenizer.from_gguf_metadata(_spm_meta()),
        "spm-gguf-no-prefix": lambda: Tokenizer.from_gguf_metadata(
            _spm_meta(**{"tokenizer.ggml.add_space_prefix": False})
        ),
        "bpe-gguf": lambda: Tokenizer.from_gguf_metadata(_bpe_meta()),
    }[name]()
    return tok, tok.vocab_size


TINY = ["smollm2", "qwen2", "spm-dir", "spm-gguf", "spm-gguf-no-prefix", "bpe-gguf"]


def _compiler(tok: Tokenizer, n_vocab: int) -> GrammarCompiler:
    return GrammarCompiler(tok, n_vocab, tok.eos_token_ids)


@pytest.fixture(scope="module", params=TINY)
def tiny(request) -> tuple[Tokenizer, GrammarCompiler, Printed]:
    tok, n_vocab = _tiny(request.param)
    return tok, _compiler(tok, n_vocab), Printed.of(tok, n_vocab)


def test_tiny_vocab_bytes_are_the_printed_text(tiny):
    assert_vocab_agrees(*tiny)


def test_the_check_sees_a_dropped_leading_space():
    """Without keep_leading_space an SPM vocab's "▁the" prints "the" while llguidance matches
    " the" (how a constrained output printed before engine.py kept the space)."""
    tok, n_vocab = _tiny("spm-gguf")
    the = tok.token_to_id("▁the")
    assert _compiler(tok, n_vocab).tokenizer.decode_bytes([the]) == b" the"
    assert printed(tok, [the]) == " the"
    det = IncrementalDetokenizer(tok)  # an unconstrained output keeps decode()'s stripping
    assert det.add([the]) + det.finish() == "the" == tok.decode([the])


def test_the_check_sees_a_special_token_a_grammar_could_emit(monkeypatch):
    """Not vacuous: tokenizer.json text that hides a special token from llguidance is caught."""
    tok, n_vocab = _tiny("smollm2")
    im_start = tok.token_to_id("<|im_start|>")
    text = json.loads(tok.tokenizers_json())
    text["added_tokens"] = [a for a in text["added_tokens"] if a["id"] != im_start]
    monkeypatch.setattr(tok, "tokenizers_json", lambda: json.dumps(text))
    diff = vocab_differences(tok, _compiler(tok, n_vocab), Printed.of(tok, n_vocab))
    assert diff["skipped_but_allowed"] == [im_start]


# -- masks -------------------------------------------------------------------------------------


def first_mask(compiler: GrammarCompiler, spec: StructuredOutputsParams) -> np.ndarray:
    return compiler.masks([compiler.matcher(spec)])[0]


def allowed_ids(mask: np.ndarray) -> set[int]:
    return set(np.flatnonzero(mask).tolist())


def prefix_tokens(view: Printed, choices) -> set[int]:
    """Tokens that print a non-empty prefix of one of the choices (ASCII choices: exact)."""
    return {i for i, t in enumerate(view.text) if t and any(c.startswith(t) for c in choices)}


def _tokens_of(compiler: GrammarCompiler, matcher, text: str) -> list[int]:
    """Tokens spelling text that the grammar takes one by one (the longest allowed first)."""
    llg, out, rest = compiler.tokenizer, [], text.encode()
    probe = matcher.fork()
    while rest:
        fits = [i for i in allowed_ids(compiler.masks([probe])[0]) if llg.decode_bytes([i])]
        fits = [i for i in fits if rest.startswith(llg.decode_bytes([i]))]
        best = max(fits, key=lambda i: len(llg.decode_bytes([i])))
        probe.accept(best)
        out.append(best)
        rest = rest[len(llg.decode_bytes([best])) :]
    return out


def assert_choice_masks(compiler: GrammarCompiler, view: Printed, eos_ids) -> None:
    choices = ("yes", "yes please", " maybe", "No way")
    spec = StructuredOutputsParams(choice=choices)
    allowed = first_mask(compiler, spec)
    assert allowed_ids(allowed) == prefix_tokens(view, choices)
    assert not allowed[sorted(eos_ids)].any(), "EOS allowed before a choice is complete"
    m = compiler.matcher(spec)
    for t in _tokens_of(compiler, m, "yes"):
        m.accept(t)
    allowed = compiler.masks([m])[0]  # complete: EOS, or on to " please"
    assert allowed[sorted(eos_ids)].all()
    assert allowed_ids(allowed) - set(eos_ids) == prefix_tokens(view, [" please"])


def assert_no_special_token_allowed(compiler: GrammarCompiler, view: Printed) -> None:
    """A grammar whose text is the special tokens' own text still never allows them."""
    special = sorted(view.special)
    texts = [view.special[i] for i in special[:64]]
    allowed = first_mask(compiler, StructuredOutputsParams(choice=texts))
    assert allowed.any() and not allowed[special].any()


def test_tiny_choice_masks_are_the_prefix_tokens(tiny):
    tok, compiler, view = tiny
    assert_choice_masks(compiler, view, tok.eos_token_ids)
    assert_no_special_token_allowed(compiler, view)


@pytest.mark.parametrize("name", ["smollm2", "qwen2", "llama_mqa"])
def test_the_compiler_spans_the_logits_and_knows_every_eos(make_llm, name):
    llm = make_llm(HF_DIR / name)
    compiler = llm.engine.grammar_compiler
    width = llm.logits([5, 6, 7]).shape[-1]
    assert width == compiler.vocab_size == compiler.tokenizer.vocab_size
    assert sorted(compiler.tokenizer.eos_tokens) == sorted(llm.engine.eos_ids)


# -- the real models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model():
    from tinyserve import LLM

    llm = LLM(str(default_model_gguf()))
    compiler = llm.engine.grammar_compiler
    return llm, compiler, Printed.of(llm.tokenizer, compiler.vocab_size)


@pytest.mark.real_model
def test_default_model_vocab_bytes_are_the_printed_text(default_model):
    llm, compiler, view = default_model
    assert llm.logits([1, 2, 3]).shape[-1] == compiler.vocab_size == 49152
    assert compiler.tokenizer.vocab_size == compiler.vocab_size
    assert sorted(compiler.tokenizer.eos_tokens) == sorted(llm.engine.eos_ids) == [2]
    assert_vocab_agrees(llm.tokenizer, compiler, view)


@pytest.mark.real_model
def test_default_model_yes_no_choice(default_model):
    """Issue 14: `--choice yes --choice no` once seemed to print "No" (id 5230)."""
    llm, compiler, view = default_model
    spec = StructuredOutputsParams(choice=["yes", "no"])
    allowed = first_mask(compiler, spec)
    assert (
        allowed_ids(allowed) == prefix_tokens(view, ("yes", "no")) == {94, 105, 4607, 6602, 10407}
    )
    assert view.text[5230] == "No" and not allowed[5230]
    assert not allowed[sorted(llm.engine.eos_ids)].any()
    m = compiler.matcher(spec)
    m.accept(4607)  # "no": complete, and nothing may follow
    assert m.done
    assert_choice_masks(compiler, view, llm.engine.eos_ids)
    assert_no_special_token_allowed(compiler, view)


@pytest.mark.real_model
@pytest.mark.slow  # 262k tokens: the tokenizer, llguidance's and the printed view take ~20 s
def test_gemma3_vocab_bytes_are_the_printed_text():
    from tinyserve.loading.gguf_file import read_gguf

    meta = read_gguf(catalog_model("gemma3-270m")).metadata
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.vocab_size == len(meta["tokenizer.ggml.tokens"]) == 262144
    compiler = _compiler(tok, tok.vocab_size)
    view = Printed.of(tok, tok.vocab_size)
    assert_vocab_agrees(tok, compiler, view)
    assert len(expected_forbidden_but_printed(tok, view)) > 1  # its user-defined tokens
    assert_choice_masks(compiler, view, tok.eos_token_ids)
    assert_no_special_token_allowed(compiler, view)
