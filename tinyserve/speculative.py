"""Speculative decoding: propose a few tokens cheaply, verify them in one forward of the model.

A decoding sequence's step normally computes one token. With speculation it computes its newest
token plus k proposed ones (k + 1 query rows in the flat batch, like a prefill chunk) and gets
logits after each; the engine then samples row 0 as it would anyway, and keeps going to row
i + 1 only while the token it sampled at row i equals the proposal the model already saw there.
Every kept token was sampled from the target model's own distribution given exactly the tokens
before it, so greedy output equals plain decoding token for token, and sampled output follows
the model's distribution: for a proposal d made without a distribution of its own (a point mass
q = 1[d], as prompt lookup makes), accepting d with probability min(1, p(d) / q(d)) = p(d) and
otherwise drawing from the residual (p - q)+ (Leviathan et al. 2023; Chen et al. 2023) is the
same as drawing x ~ p and accepting iff x == d, with x the output on rejection. The KV written
for rejected proposals is rolled back (tokens uncounted, trailing blocks freed, no prefix-cache
hash published for them).

Proposers: "ngram" (prompt lookup, as vLLM's: the continuation of the latest earlier occurrence
of the sequence's last n tokens with k tokens after it, n from prompt_lookup_max down to
prompt_lookup_min).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .errors import RequestError

METHODS = ("ngram",)


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """vLLM's speculative_config: {"method": "ngram", "num_speculative_tokens": k,
    "prompt_lookup_max": m, "prompt_lookup_min": n}."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    def __post_init__(self):
        if self.method not in METHODS:
            raise RequestError(
                f"speculative_config method {self.method!r} is not supported ({', '.join(METHODS)})"
            )
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RequestError(f"speculative_config {name} must be an int >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise RequestError(
                "speculative_config prompt_lookup_min must be <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min} > {self.prompt_lookup_max}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SpeculativeConfig | None:
        if d is None:
            return None
        if isinstance(d, SpeculativeConfig):
            return d
        if not isinstance(d, dict):
            raise RequestError(f"speculative_config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RequestError(f"unknown speculative_config field(s): {', '.join(unknown)}")
        return cls(**d)

    def proposer(self) -> NgramProposer:
        return NgramProposer(
            self.num_speculative_tokens, self.prompt_lookup_min, self.prompt_lookup_max
        )


class NgramProposer:
    """Prompt lookup: what followed the latest earlier occurrence of the last n tokens."""

    def __init__(self, k: int, min_n: int, max_n: int):
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        """Up to min(k, limit) tokens to try after token_ids; [] when no n-gram recurs."""
        k = min(self.k, limit)
        if k < 1 or len(token_ids) <= self.min_n:
            return []
        ids = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            # windows of n tokens that end before the last token, so each has a continuation
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # (L-n, n)
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if len(hits):
                # the latest occurrence that still has k tokens after it (a match right before
                # the end, as in a run of one token, has only a short continuation)
                full = hits[hits + n + k <= len(ids)]
                start = int(full[-1] if len(full) else hits[-1]) + n
                return ids[start : start + k].tolist()
        return []
