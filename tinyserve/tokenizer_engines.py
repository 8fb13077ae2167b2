"""The engines under the `Tokenizer` face: text <-> ids through `tokenizers` or `sentencepiece`.

Each has vocab_size, encode, decode, id_to_token and token_to_id; the face adds special tokens,
range checks and chat templates on top.

Reference: llama.cpp src/llama-vocab.cpp (SPM piece decoding).
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .gguf_vocab import SPIECE_UNDERLINE


class HFEngine:
    """A `tokenizers.Tokenizer` (from tokenizer.json or rebuilt from GGUF metadata)."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

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


class SPEngine:
    """A sentencepiece model; control-token strings in text become their ids, as in HF's slow tokenizer."""

    def __init__(self, sp: Any, add_bos: bool, add_eos: bool):
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.add_bos, self.add_eos = add_bos, add_eos
        specials = [
            sp.id_to_piece(i)
            for i in range(self.vocab_size)
            if sp.is_control(i) or sp.is_unknown(i)
        ]
        specials = sorted({s for s in specials if s}, key=len, reverse=True)
        self.special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        if add_special_tokens and self.add_bos and self.sp.bos_id() >= 0:
            ids.append(self.sp.bos_id())
        pos = 0
        for m in self.special_re.finditer(text) if self.special_re else ():
            if m.start() > pos:
                ids += self.sp.encode(text[pos : m.start()])
            ids.append(self.sp.piece_to_id(m.group()))
            pos = m.end()
        if pos < len(text):
            ids += self.sp.encode(text[pos:])
        if add_special_tokens and self.add_eos and self.sp.eos_id() >= 0:
            ids.append(self.sp.eos_id())
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        ids = list(ids)
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if not self._is_special(i)])
        # Render control/unknown tokens as their text; the run after one keeps its leading space.
        out, run, start = [], [], 0
        for k, i in enumerate(ids + [None]):
            if i is None or self._is_special(i):
                if run:
                    text = self.sp.decode(run)
                    if start > 0 and self.sp.id_to_piece(run[0]).startswith(SPIECE_UNDERLINE):
                        text = " " + text
                    out.append(text)
                if i is not None:
                    out.append(self.sp.id_to_piece(i))
                run, start = [], k + 1
            else:
                run.append(i)
        return "".join(out)

    def _is_special(self, i: int) -> bool:
        return self.sp.is_control(i) or self.sp.is_unknown(i)

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None

    def token_to_id(self, s: str) -> int | None:
        i = self.sp.piece_to_id(s)
        return None if i == self.sp.unk_id() and s != self.sp.id_to_piece(i) else i
