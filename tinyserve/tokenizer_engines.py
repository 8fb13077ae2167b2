"""The engines under the `Tokenizer` face: text <-> ids through `tokenizers`.

Each has vocab_size, encode, decode, id_to_token and token_to_id; the face adds special tokens,
range checks and chat templates on top.

Reference: llama.cpp src/llama-vocab.cpp (SPM piece decoding).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .gguf_vocab import SPIECE_UNDERLINE


class HFEngine:
    """A `tokenizers.Tokenizer` (from tokenizer.json or rebuilt from GGUF metadata)."""

    def __init__(self, tok: Any, vocab_size: int | None = None):
        self.tok = tok
        # a GGUF names its size (a string given twice leaves tokenizers one entry short)
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), vocab_size or 0)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self.tok.token_to_id(s)


class SPMEngine(HFEngine):
    """An SPM vocab in a tokenizers BPE, decoded here piece by piece as llama.cpp does.

    tokenizers' ByteFallback decoder turns a whole run of byte pieces into U+FFFD when any of
    them is invalid, so decoding is not local; joining piece bytes and decoding with
    errors="replace" is, which the incremental detokenizer relies on.
    """

    def __init__(self, tok: Any, special_ids: Iterable[int], strip_leading_space: bool):
        super().__init__(tok)
        self.special_ids = frozenset(special_ids)
        self.strip_leading_space = strip_leading_space
        # every piece's bytes in one buffer (a vocab of 262k pieces as 262k bytes objects would
        # hold ~10 MB more): piece i is blob[ends[i - 1]:ends[i]]
        pieces = [_spm_piece_bytes(tok.id_to_token(i)) for i in range(self.vocab_size)]
        self.piece_ends = array("q", np.cumsum([len(p) for p in pieces], dtype=np.int64))
        self.piece_blob = b"".join(pieces)

    def piece(self, i: int) -> bytes:
        """The bytes token i stands for."""
        return self.piece_blob[self.piece_ends[i - 1] if i else 0 : self.piece_ends[i]]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        skip = self.special_ids if skip_special_tokens else frozenset()
        text = b"".join(self.piece(i) for i in ids if i not in skip).decode("utf-8", "replace")
        return text[1:] if self.strip_leading_space and text.startswith(" ") else text


def _spm_piece_bytes(piece: str | None) -> bytes:
    """'<0x0A>' -> b'\\n'; '▁the' -> b' the'."""
    if piece is None:
        return b""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace(SPIECE_UNDERLINE, " ").encode("utf-8")
