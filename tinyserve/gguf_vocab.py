"""A GGUF vocab (tokenizer.ggml.* metadata) rebuilt as a `tokenizers.Tokenizer`.

Two vocab kinds: "gpt2", a byte-level BPE split first by llama.cpp's pre-tokenizer regexes
(chosen by tokenizer.ggml.pre), and "llama", an SPM vocab rebuilt as a BPE with byte fallback
whose merges follow the piece scores, as HF's LlamaConverter builds it (`spm_bpe`, which also
serves a bare tokenizer.model).

References: llama.cpp src/llama-vocab.cpp (pre-tokenizer regexes, SPM space prefix),
transformers convert_slow_tokenizer.py (LlamaConverter).
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


# -- llama.cpp pre-tokenizers ----------------------------------------------------------------
# llama.cpp applies its regexes one after another, each splitting the pieces the previous one
# produced (matches and the gaps between them both stay pieces): a tokenizers Split with
# behavior="isolated" per regex reproduces that. Strings copied from llama-vocab.cpp; where
# llama.cpp notes an "original regex from tokenizer.json" we use that original (onig handles
# the (?i:...) group llama.cpp had to expand).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "llama-bpe": (_LLAMA3,),
    "smollm": (r"\p{N}", _GPT2),
    "qwen2": (_QWEN2,),
}
_PRE_ALIASES = {
    "": "default",
    "gpt2": "gpt-2",
    "phi-2": "gpt-2",
    "mpt": "gpt-2",
    "olmo": "gpt-2",
    "jais": "gpt-2",
    "llama3": "llama-bpe",
    "llama-v3": "llama-bpe",
    "falcon3": "llama-bpe",
    "dbrx": "llama-bpe",
    "smaug-bpe": "llama-bpe",
    "starcoder": "smollm",
    "refact": "smollm",
    "command-r": "smollm",
    "codeshell": "smollm",
    "exaone": "smollm",
    "minerva-7b": "smollm",
    "stablelm2": "qwen2",
    "qwen35": "qwen2",
}
_IGNORE_MERGES = {"llama-bpe"}  # llama.cpp: a word already in the vocab is one token
_ADD_BOS_DEFAULT = {"llama-bpe"}


def gguf_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> tuple[Any, bool]:
    """Byte-level BPE with the pre-tokenizer llama.cpp uses for tokenizer.ggml.pre."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pre = str(meta.get("tokenizer.ggml.pre", "") or "")
    pre = _PRE_ALIASES.get(pre, pre)
    if pre not in _PRE_REGEXES:
        known = sorted(set(_PRE_REGEXES) | set(_PRE_ALIASES) - {""})
        raise TokenizerError(
            f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(known)}"
        )
    raw_merges = meta.get("tokenizer.ggml.merges")
    if raw_merges is None:
        raise TokenizerError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    merges = []
    for m in raw_merges:
        left, sep, right = str(m).partition(" ")
        if not sep:
            raise TokenizerError(f"malformed GGUF merge {m!r} (expected 'left right')")
        merges.append((left, right))
    vocab = _vocab_dict(tokens)
    for left, right in merges:  # tokenizers errs on these, or panics (a BaseException)
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise TokenizerError(
                f"GGUF vocab is inconsistent: merge {left + ' ' + right!r} names a piece that "
                "is not a token"
            )
    tok = HFTokenizer(_bpe(models, vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_REGEXES[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    _add_gguf_special_tokens(tok, tokens, types)
    return tok, pre in _ADD_BOS_DEFAULT


def gguf_spm(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> Any:
    """An SPM vocab from GGUF metadata, split as transformers' LlamaTokenizer / GemmaTokenizer do."""
    n = len(tokens)
    scores = [float(s) for s in meta.get("tokenizer.ggml.scores", [0.0] * n)]
    if len(scores) != n:
        raise TokenizerError(f"GGUF scores has {len(scores)} entries for {n} tokens")
    # transformers builds a GGUF's Llama vocab with LlamaTokenizer's default, legacy=False: the
    # space prefix goes on the start of the text only (llama.cpp puts one after every special
    # token too). Gemma's vocab has no prefix.
    prefix = "first" if bool(meta.get("tokenizer.ggml.add_space_prefix", True)) else "never"
    return spm_bpe(tokens, scores, types, prefix)


def spm_bpe(tokens: list[str], scores: list[float], types: list[int], prefix: str) -> Any:
    """SPM pieces as a BPE with byte fallback whose merges follow the piece scores (LlamaConverter).

    prefix is transformers' Metaspace prepend_scheme: "first" (a "▁" before the text unless it
    starts with a space), "always" (legacy=True: before every run of text between special tokens,
    as sentencepiece's dummy prefix does), or "never".
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    vocab = _vocab_dict(tokens)
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
    merges = [
        (tokens[a], tokens[b]) for a, b in zip(left_ids[order].tolist(), right_ids[order].tolist())
    ]
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
    _add_gguf_special_tokens(tok, tokens, types)
    return tok


def _bpe(models: Any, vocab: dict[str, int], merges: list[tuple[str, str]], **kw) -> Any:
    """tokenizers' BPE model; TokenizerError for a vocab it refuses (a merge whose pieces or
    result are not tokens: tokenizers raises a bare Exception)."""
    try:
        return models.BPE(vocab, merges, **kw)
    except Exception as e:  # noqa: BLE001 - the binding's only exception type
        raise TokenizerError(f"GGUF vocab is inconsistent: {str(e).strip()[:200]}") from None


def _add_gguf_special_tokens(tok: Any, tokens: list[str], types: list[int]) -> None:
    """Control/unknown tokens become special added tokens (skipped on decode); user-defined ones plain added tokens."""
    from tokenizers import AddedToken

    special = [i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    """token -> id; a duplicated string keeps its first id (as llama.cpp's text_to_token does)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab
