"""A GGUF vocab (tokenizer.ggml.* metadata) rebuilt as a `tokenizers.Tokenizer`, as transformers'
GGUF loader builds it (`AutoTokenizer.from_pretrained(dir, gguf_file=...)` is the reference).

Two vocab kinds: "gpt2", a byte-level BPE split by the regex transformers picks for
tokenizer.ggml.pre (GPT-2's own for every name it has no split for), and "llama", an SPM vocab as a
BPE with byte fallback whose merges come from the pieces and their scores (Gemma: their order).
`spm_bpe` also serves a bare tokenizer.model, with merges as HF's LlamaConverter extracts them.

References: transformers integrations/gguf/gguf_tokenizer_mapping.py (splits, respelling, special
tokens, gemma_tokenizer), tokenization_utils_base.generate_merges, convert_slow_tokenizer.py
(LlamaConverter).
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import TokenizerError

SPIECE_UNDERLINE = "\u2581"  # "▁": sentencepiece's visible space

# GGUF tokenizer.ggml.token_type values (llama.cpp llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(
    1, 7
)


# -- byte-level pre-tokenizers ------------------------------------------------------------------
# transformers' GGUF loader (GGUF_PRE_TOKENIZER_SPLITS) replaces GPT-2's regex only for these
# names; every other tokenizer.ggml.pre keeps GPT2Tokenizer's ByteLevel regex. That includes
# "smollm" and "starcoder", whose tokenizer.json splits digits one by one first (llama.cpp does
# too): transformers does not, so "a  1" is a, Ġ, Ġ, 1 and not a, ĠĠ, 1. The strings are copied
# from transformers.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
        + ("jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}
# Names that get GPT-2's regex in transformers and that we accept: llama.cpp's GPT-2-like and
# StarCoder-like pre-tokenizers. Another name is refused rather than split in a way no one checked.
_GPT2_NAMES = {"", "default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "stablelm2"} | {
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of a byte-level vocab)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    extra = (b for b in range(256) if b not in keep)
    return {b: chr(b) for b in keep} | {b: chr(256 + k) for k, b in enumerate(extra)}


def gguf_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> tuple[Any, bool]:
    """Byte-level BPE with the pre-tokenizer transformers uses for tokenizer.ggml.pre."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pre = str(meta.get("tokenizer.ggml.pre", "") or "")
    if pre not in _SPLITS and pre not in _GPT2_NAMES:
        known = sorted((set(_SPLITS) | _GPT2_NAMES) - {""})
        raise TokenizerError(
            f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(known)}"
        )
    raw_merges = meta.get("tokenizer.ggml.merges")
    if raw_merges is None:
        raise TokenizerError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    # A token outside the byte alphabet (a control token spelled in plain Unicode, llama.cpp's
    # mislabel) is respelled in it, as transformers does: it stays a vocab entry, never special.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    spelled = [
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens
    ]
    vocab = {t: i for i, t in enumerate(spelled)}  # a duplicate keeps its last id (transformers)
    tok = HFTokenizer(_bpe(models, vocab, _file_merges(raw_merges, vocab)))
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    kept = [t if t == s else None for t, s in zip(tokens, spelled)]  # respelled: not added
    _add_gguf_special_tokens(tok, kept, types, special_types=(TOKEN_CONTROL,))
    return tok, False


def gguf_spm(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> Any:
    """An SPM vocab from GGUF metadata, as transformers' GGUF loader builds LlamaTokenizer /
    GemmaTokenizer: merges from the file, else from every split of a piece into two pieces."""
    n = len(tokens)
    scores = [float(s) for s in meta.get("tokenizer.ggml.scores", [0.0] * n)]
    if len(scores) != n:
        raise TokenizerError(f"GGUF scores has {len(scores)} entries for {n} tokens")
    spelled, ranks = tokens, dict(zip(tokens, scores))
    if str(meta.get("general.architecture", "")) in ("gemma", "gemma2", "gemma3"):
        # Gemma stores its whitespace pieces with real spaces ("  ") and its merges follow the
        # pieces' order, not their scores (transformers' gemma_tokenizer): "▁▁" pieces, ranked
        # by position, so a run of 32 spaces is two 16-space pieces, not 31 + 1.
        spelled = [SPIECE_UNDERLINE * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks = {t: -i for i, t in enumerate(spelled)}
    vocab = {t: i for i, t in enumerate(spelled)}  # a duplicate keeps its last id (transformers)
    raw_merges = meta.get("tokenizer.ggml.merges")
    if raw_merges is not None:
        merges = _file_merges(raw_merges, vocab)
    else:
        merges = _generate_merges(spelled, vocab, ranks)
    # transformers builds a GGUF's Llama vocab with LlamaTokenizer's default, legacy=False: the
    # space prefix goes on the start of the text only (llama.cpp puts one after every special
    # token too). Gemma's vocab has no prefix.
    prefix = "first" if bool(meta.get("tokenizer.ggml.add_space_prefix", True)) else "never"
    kept = [t if t == s else None for t, s in zip(tokens, spelled)]  # respelled: not added
    return spm_bpe(spelled, scores, types, prefix, merges=merges, vocab=vocab, added=kept)


def _file_merges(raw_merges: Any, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges ("left right") as pairs; TokenizerError for one whose pieces or
    union are not tokens (tokenizers errs on these, or panics: a BaseException)."""
    merges = []
    for m in raw_merges:
        left, sep, right = str(m).partition(" ")
        if not sep:
            raise TokenizerError(f"malformed GGUF merge {m!r} (expected 'left right')")
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise TokenizerError(
                f"GGUF vocab is inconsistent: merge {left + ' ' + right!r} names a piece that "
                "is not a token"
            )
        merges.append((left, right))
    return merges


def _generate_merges(
    tokens: list[str], vocab: dict[str, int], ranks: dict[str, float]
) -> list[tuple[str, str]]:
    """transformers' generate_merges: every split of a piece into two vocab pieces, best rank
    first, then the longer left piece, the longer right one, then the order found (pieces in
    ranks' order, each piece's splits by the ids of left then right)."""
    rank, len_left, len_right = array("d"), array("q"), array("q")
    left_ids, right_ids = array("q"), array("q")
    for piece, r in ranks.items():
        local = []
        for k in range(1, len(piece)):
            left, right = vocab.get(piece[:k]), vocab.get(piece[k:])
            if left is not None and right is not None:
                local.append((left, right, k))
        for left, right, k in sorted(local):
            rank.append(-r)
            len_left.append(-k)
            len_right.append(k - len(piece))
            left_ids.append(left)
            right_ids.append(right)
    found = np.arange(len(rank))
    order = np.lexsort(
        (
            found,
            np.frombuffer(len_right, np.int64),
            np.frombuffer(len_left, np.int64),
            np.frombuffer(rank, np.float64),
        )
    )
    left_ids, right_ids = np.frombuffer(left_ids, np.int64), np.frombuffer(right_ids, np.int64)
    return [
        (tokens[a], tokens[b]) for a, b in zip(left_ids[order].tolist(), right_ids[order].tolist())
    ]


def spm_bpe(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    prefix: str,
    merges: list[tuple[str, str]] | None = None,
    vocab: dict[str, int] | None = None,
    added: list[str | None] | None = None,
) -> Any:
    """SPM pieces as a BPE with byte fallback; merges, when not given, follow the piece scores
    (LlamaConverter).

    prefix is transformers' Metaspace prepend_scheme: "first" (a "▁" before the text unless it
    starts with a space), "always" (legacy=True: before every run of text between special tokens,
    as sentencepiece's dummy prefix does), or "never". added: the strings to add as special /
    user-defined tokens (None: skip that one), default tokens.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    if vocab is None:
        vocab = _vocab_dict(tokens)
    if merges is None:
        merges = _score_merges(tokens, scores, types, vocab)
    unk_id = next((i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
    bpe = _bpe(
        models,
        vocab,
        merges,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        byte_fallback=True,
        fuse_unk=True,
    )
    tok = HFTokenizer(bpe)
    steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix == "never":
        tok.normalizer = normalizers.Replace(" ", SPIECE_UNDERLINE)
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPIECE_UNDERLINE, prepend_scheme=prefix, split=False
        )
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    _add_gguf_special_tokens(tok, tokens if added is None else added, types)
    return tok


def _score_merges(
    tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """Merges of normal pieces, best union score first (LlamaConverter's order)."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == TOKEN_NORMAL and vocab[t] == i}
    # sentencepiece BPE merges the adjacent pair whose union scores highest; a merge list sorted
    # by the union's score gives the same order (ties: lower ids first, as in HF's extractor).
    # A vocab of 262k pieces has ~500k such pairs: kept as three flat arrays, not as tuples.
    union_score, left_ids, right_ids = array("d"), array("q"), array("q")
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = normal.get(piece[:k]), normal.get(piece[k:])
            if left is not None and right is not None:
                union_score.append(-scores[i])
                left_ids.append(left)
                right_ids.append(right)
    left_ids, right_ids = np.frombuffer(left_ids, np.int64), np.frombuffer(right_ids, np.int64)
    order = np.lexsort((right_ids, left_ids, np.frombuffer(union_score, np.float64)))
    return [
        (tokens[a], tokens[b]) for a, b in zip(left_ids[order].tolist(), right_ids[order].tolist())
    ]


def _bpe(models: Any, vocab: dict[str, int], merges: list[tuple[str, str]], **kw) -> Any:
    """tokenizers' BPE model; TokenizerError for a vocab it refuses (a merge whose pieces or
    result are not tokens: tokenizers raises a bare Exception)."""
    try:
        return models.BPE(vocab, merges, **kw)
    except Exception as e:  # noqa: BLE001 - the binding's only exception type
        raise TokenizerError(f"GGUF vocab is inconsistent: {str(e).strip()[:200]}") from None


def _add_gguf_special_tokens(
    tok: Any,
    tokens: list[str | None],
    types: list[int],
    special_types: tuple[int, ...] = (TOKEN_CONTROL, TOKEN_UNKNOWN),
) -> None:
    """special_types become special added tokens (skipped on decode), user-defined ones plain added
    tokens; a None in tokens is not added."""
    from tokenizers import AddedToken

    special = [i for i, t in enumerate(types) if t in special_types and tokens[i] is not None]
    user = [i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED and tokens[i] is not None]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    """token -> id; a duplicated string keeps its first id (as llama.cpp's text_to_token does)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab
