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
prompt_lookup_min), and "draft_model": a smaller model of the same vocabulary, run by the same
backend with its own KV cache, proposes its k greedy tokens (a point mass again, so the same rule
holds), all speculating sequences batched in each of its k forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .batch import Batch
from .errors import OutOfBlocks, RequestError
from .kv_cache import KVCacheManager
from .sequence import Sequence

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """vLLM's speculative_config: {"method": "ngram", "num_speculative_tokens": k,
    "prompt_lookup_max": m, "prompt_lookup_min": n}, or {"method": "draft_model", "model":
    PATH_OR_NAME, "num_speculative_tokens": k}."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    model: str | None = None  # draft_model: a catalog name, HF directory or .gguf file

    def __post_init__(self):
        if self.method not in METHODS:
            raise RequestError(
                f"speculative_config method {self.method!r} is not supported ({', '.join(METHODS)})"
            )
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RequestError(f"speculative_config {name} must be an int >= 1, got {value!r}")
        if (self.method == "draft_model") != (self.model is not None):
            raise RequestError(
                'speculative_config "model" names the draft model of method "draft_model" (only)'
            )
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

    def proposer(self, backend, vocab_size: int, block_size: int, num_blocks: int):
        """The proposer for an engine: its backend, vocabulary and KV geometry (a draft model
        keeps a cache of the target's number of blocks)."""
        if self.method == "draft_model":
            return DraftModelProposer(
                self.model,
                self.num_speculative_tokens,
                backend,
                vocab_size,
                block_size,
                num_blocks,
            )
        return NgramProposer(
            self.num_speculative_tokens, self.prompt_lookup_min, self.prompt_lookup_max
        )


class NgramProposer:
    """Prompt lookup: what followed the latest earlier occurrence of the last n tokens."""

    def __init__(self, k: int, min_n: int, max_n: int):
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose_all(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        return [self.propose(seq.token_ids, limit) for seq, limit in zip(seqs, limits)]

    def forget(self, seq: Sequence) -> None:
        """Nothing kept per sequence."""

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


class DraftModelProposer:
    """A smaller model of the target's vocabulary proposes its greedy continuation.

    Each speculating sequence has a mirror here (a Sequence over the draft's own KV cache). Per
    engine step the mirror takes the target's tokens, keeping its computed KV only up to the
    first token that differs (proposals the target rejected), computes what it lacks in one
    chunk and then one proposal per forward, k forwards in all, every sequence in the same
    batch."""

    def __init__(self, model, k, backend, vocab_size, block_size, num_blocks):
        from . import catalog
        from .loading import load_checkpoint
        from .models import build_model

        checkpoint = load_checkpoint(catalog.resolve(str(model)))
        cfg = checkpoint.config
        if cfg.vocab_size != vocab_size:
            raise RequestError(
                f"draft model {model!r} has a vocabulary of {cfg.vocab_size}, the target "
                f"{vocab_size}: their token ids must mean the same"
            )
        self.k, self.backend, self.max_len = k, backend, cfg.context_len
        self.model = build_model(cfg, checkpoint.tensors, backend.ops)
        self.kv = backend.allocate_kv(self.model.kv_layout(), num_blocks, block_size)
        self.kv_manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        self.mirrors: dict[int, Sequence] = {}  # target seq_id -> the draft's copy

    def forget(self, seq: Sequence) -> None:
        """The target sequence finished (or was aborted): free its mirror."""
        mirror = self.mirrors.pop(seq.seq_id, None)
        if mirror is not None:
            self.kv_manager.free(mirror)

    def _sync(self, seq: Sequence) -> Sequence:
        mirror = self.mirrors.get(seq.seq_id)
        if mirror is None:
            mirror = Sequence(seq.seq_id, seq.request_id, 0, [], seq.params, None, self.max_len)
            self.mirrors[seq.seq_id] = mirror
        same = 0  # the mirror's computed tokens the target kept
        limit = min(mirror.num_computed, len(seq.token_ids))
        while same < limit and mirror.token_ids[same] == seq.token_ids[same]:
            same += 1
        mirror.token_ids = list(seq.token_ids)
        mirror.num_computed = same
        self.kv_manager.trim(mirror)
        return mirror

    def propose_all(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        mirrors = {}
        for seq, limit in zip(seqs, limits):
            k = min(self.k, limit, self.max_len - len(seq.token_ids) - 1)
            if k >= 1:
                mirrors[seq.seq_id] = (self._sync(seq), len(seq.token_ids), k)
        for _ in range(self.k):
            live = [
                (m, start, k) for m, start, k in mirrors.values() if len(m.token_ids) - start < k
            ]
            chunks, rows, stepped = [], [], []
            for mirror, _, _ in live:
                n = mirror.n_uncomputed
                try:
                    self.kv_manager.reserve(mirror, n)
                except OutOfBlocks:  # the draft's cache is full: this sequence waits a step
                    continue
                chunks.append(
                    (
                        mirror.token_ids[mirror.num_computed :],
                        mirror.num_computed,
                        mirror.block_table,
                    )
                )
                rows.append(sum(len(c[0]) for c in chunks) - 1)
                stepped.append((mirror, n))
            if not stepped:
                break
            batch = Batch.build(chunks, self.kv_manager.block_size, rows)
            greedy = np.ones(len(rows), dtype=bool)
            ids = self.backend.forward_greedy(self.model, batch, self.kv, greedy)[0]
            for (mirror, n), token in zip(stepped, ids):
                mirror.num_computed += n
                mirror.token_ids.append(int(token))
        return [
            mirrors[seq.seq_id][0].token_ids[len(seq.token_ids) :] if seq.seq_id in mirrors else []
            for seq in seqs
        ]
