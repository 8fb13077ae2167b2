"""Per-request state: the tokens, how many are in the KV cache, the block table, sampling state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from .sampling import NO_RULES, SamplingParams, TokenRules


class Status(enum.Enum):
    WAITING = "waiting"  # not yet scheduled, or preempted (blocks freed, to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Times (time.perf_counter) the engine records for one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per output token of sequence 0
    n_prompt_tokens: int = 0
    n_prefilled_tokens: int = 0  # prompt tokens computed (not served by the prefix cache)
    n_preemptions: int = 0
    n_draft_tokens: int = 0  # speculative decoding: tokens proposed, proposals kept, verify steps
    n_accepted_tokens: int = 0
    n_spec_steps: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Share of the proposed tokens that were kept."""
        return self.n_accepted_tokens / self.n_draft_tokens if self.n_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens a verifying step yields on average: the proposals kept plus the one sampled."""
        if not self.n_spec_steps:
            return None
        return (self.n_accepted_tokens + self.n_spec_steps) / self.n_spec_steps

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1), seconds."""
        n = len(self.token_times)
        if n < 2 or self.finish_time is None:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (n - 1)

    @property
    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


class Sequence:
    """One stream of tokens: a request has n of them (they share the prompt's KV blocks)."""

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        index: int,
        prompt_ids: list[int],
        params: SamplingParams,
        seed: int | None,
        max_len: int,
        rules: TokenRules = NO_RULES,
    ):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.token_ids = list(prompt_ids)  # prompt then output
        self.prompt_len = len(prompt_ids)
        self.params = params
        self.rules = rules  # logit_bias, allowed ids, min_tokens, bad words: resolved once
        self.seed = seed  # samples from default_rng([seed, index])
        self._rng: np.random.Generator | None = None
        self.max_len = max_len  # prompt + output may not exceed this (context / max_tokens)
        self.status = Status.WAITING
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # the first sequence computes the prompt (its siblings fork after it): entry t scores
        # prompt token t given the ones before it, so the first is None
        wants = params.prompt_logprobs is not None and index == 0
        self.prompt_logprobs: list[dict[int, float] | None] | None = [None] if wants else None
        self.cumulative_logprob = 0.0
        self.detokenizer = None
        self.matcher = None  # structured output: where the grammar stands (structured.Matcher)
        self.draft: list[int] = []  # speculative decoding: tokens proposed to follow token_ids
        self.spec_cap: int | None = None  # the most to propose next (None: the config's k)
        self.text = ""  # output text so far (stop strings cut out)
        self.sent_text_len = 0  # how much of text has been handed out as deltas
        self.sent_token_len = 0

    @property
    def rng(self) -> np.random.Generator:
        """This sequence's generator, made on first use (greedy decoding never needs one)."""
        if self._rng is None:
            assert self.seed is not None, f"{self!r} was made without a seed"
            self._rng = np.random.default_rng([self.seed, self.index])
        return self._rng

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def n_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt logprobs still to compute: every prompt row must run (no prefix-cache hits)."""
        pl = self.prompt_logprobs
        return pl is not None and len(pl) < self.prompt_len

    def prompt_rows(self, start: int, n: int) -> range:
        """Positions among [start, start + n) whose logits score the next, still unscored prompt
        token."""
        if not self.needs_prompt_logits:
            return range(0)
        first = len(self.prompt_logprobs) - 1  # the position that scores the first unscored token
        assert start <= first, f"{self} skipped the rows that score prompt tokens {start}..{first}"
        return range(first, min(start + n, self.prompt_len - 1))

    @property
    def is_prefill(self) -> bool:
        """More than the one newest token still lacks K/V: the prompt (or a recompute) is pending."""
        return self.n_uncomputed > 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, {self.status.value}, "
            f"{self.num_computed}/{len(self.token_ids)} computed, blocks={self.block_table})"
        )


class Request:
    """A prompt and its n sequences (all but the first are forked once the prompt is computed)."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        seed: int,
    ):
        self.request_id = request_id
        self.seed = seed  # sequence i samples from default_rng([seed, i])
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.seqs: list[Sequence] = []
        self.metrics = RequestMetrics(
            arrival_time=time.perf_counter(), n_prompt_tokens=len(prompt_ids)
        )
        self.forked = params.n_samples == 1  # siblings exist once the prompt's logits are in

    @property
    def finished(self) -> bool:
        return self.forked and all(s.finished for s in self.seqs)
