"""Incremental detokenization: streamed text deltas that add up to one full decode.

Reference: vLLM detokenizer_utils.py (prefix_offset / read_offset).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

_LEFT_CONTEXT = "a"  # any text that decodes to itself and starts with no space


class IncrementalDetokenizer:
    """Streams the text of generated ids: the deltas concatenate to tokenizer.decode(output ids)
    (with keep_leading_space, to what the ids add to the decode of a left context).

    Each step decodes only a short window ids[prefix_offset:] and emits what it adds beyond the
    already-emitted ids[prefix_offset:read_offset] (vLLM's scheme). Decoding with left context
    keeps SPM's leading-space stripping, which applies only at the start of a decode, from eating
    the space of a token in mid-stream. Text ending in U+FFFD (half a UTF-8 character) is held
    back until the next ids complete it; `finish()` flushes what is left at the end.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        keep_leading_space: bool = False,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # keep_leading_space: the first window starts with a left context that is never emitted,
        # so a decode that strips its leading space (SPM's dummy prefix) keeps the first output
        # token's. A grammar matched the output's bytes, that space included (structured.py):
        # a choice of " yes" must print " yes", not "yes".
        left: list[int] = []
        if keep_leading_space:
            left = tokenizer.encode(_LEFT_CONTEXT, add_special_tokens=False)
        self._n_left = len(left)
        self._ids: list[int] = left  # the left context, then the output ids
        self.text = ""  # all text emitted so far
        self._prefix_offset = 0  # window start: context already emitted
        self._read_offset = len(left)  # ids before this are emitted
        self._prefix_text = self._decode(left)  # decode(ids[prefix_offset:read_offset])

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._n_left :]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append generated ids; return the newly stable text (may be "")."""
        self._ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing new, or a UTF-8 character still incomplete
        return self._emit(new_text)

    def finish(self) -> str:
        """Flush held-back text (e.g. a trailing incomplete character, shown as U+FFFD)."""
        new_text = self._decode(self._ids[self._prefix_offset :])
        return self._emit(new_text) if len(new_text) > len(self._prefix_text) else ""

    def _emit(self, new_text: str) -> str:
        delta = new_text[len(self._prefix_text) :]
        self.text += delta
        # The next window starts at the old read offset. Its text is decoded on its own: an SPM
        # decode strips the window's leading space, which then belongs to text already emitted.
        self._prefix_offset = self._read_offset
        self._prefix_text = self._decode(self._ids[self._prefix_offset :])
        self._read_offset = len(self._ids)
        return delta
