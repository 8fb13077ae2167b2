"""SamplingParams and the sampler: logits (R, V) -> one token per row, with optional top-n logprobs.

Order of operations (as vLLM and transformers do): penalties, then temperature, then the top-k /
top-p / min-p filters, then one draw from each sequence's own seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .errors import RequestError
from .settings import settings
from .structured import StructuredOutputsParams


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next tokens of one request.

    Args:
        max_tokens: tokens to generate at most (>= 1).
        temperature: 0 for greedy (exact argmax), otherwise divides the logits.
        top_k: keep the k most likely tokens (None: all).
        top_p: keep the smallest set whose probability reaches p, in (0, 1].
        min_p: drop tokens less likely than min_p x the most likely one, in [0, 1].
        repetition_penalty: > 0; divides positive (multiplies negative) logits of seen tokens.
        presence_penalty, frequency_penalty: OpenAI's, in [-2, 2], over generated tokens.
        seed: per-request seed; the same seed gives the same text.
        stop: strings that end generation (not included in the text).
        stop_token_ids: token ids that end generation.
        ignore_eos: keep generating past EOS (benchmarks).
        logprobs: return the log-probabilities of the top-n tokens at each step (None: none).
        n: number of completions sampled from one prompt.
        skip_special_tokens: leave special tokens out of the text.
        structured_outputs: constrain the output to a JSON schema, regex, choice or grammar
            (StructuredOutputsParams; needs the `structured` extra).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        # lists from JSON / callers become tuples so the params stay hashable and immutable
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        if isinstance(self.structured_outputs, dict):
            so = StructuredOutputsParams.from_dict(self.structured_outputs)
            object.__setattr__(self, "structured_outputs", so)
        checks = [
            (
                isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                f"max_tokens must be >= 1, got {self.max_tokens}",
            ),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (
                self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1),
                f"top_k must be >= 1 or None, got {self.top_k}",
            ),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                self.repetition_penalty > 0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= 20,
                f"logprobs must be in [0, 20], got {self.logprobs}",
            ),
            (isinstance(self.n, int) and 1 <= self.n <= 64, f"n must be in [1, 64], got {self.n}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (
                self.structured_outputs is None
                or isinstance(self.structured_outputs, StructuredOutputsParams),
                "structured_outputs must be a StructuredOutputsParams",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """From user input (CLI / server JSON): unknown fields are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RequestError(f"unknown sampling field(s): {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise RequestError(f"invalid sampling parameters: {e}") from None


@dataclass(frozen=True, slots=True)
class Sample:
    token_id: int
    logprob: float  # of the chosen token under the model's distribution
    top_logprobs: dict[int, float] | None  # top-n token -> logprob, when asked for


def log_softmax(x: np.ndarray) -> np.ndarray:
    """(..., V) -> (..., V)."""
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def apply_penalties(logits: np.ndarray, p: SamplingParams, prompt_ids, output_ids) -> np.ndarray:
    """(V,) -> (V,): repetition penalty over prompt + output, presence / frequency over output."""
    if p.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(list(prompt_ids) + list(output_ids), dtype=np.int64))
        vals = logits[seen]
        logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and len(output_ids):
        ids, counts = np.unique(np.asarray(output_ids, dtype=np.int64), return_counts=True)
        logits[ids] -= p.frequency_penalty * counts + p.presence_penalty
    return logits


def filtered_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """(V,) -> (V,) probabilities after temperature, top-k, top-p and min-p (zeros elsewhere)."""
    z = logits / p.temperature
    if p.top_k is not None and p.top_k < z.shape[0]:
        kth = np.partition(z, -p.top_k)[-p.top_k]
        z = np.where(z >= kth, z, -np.inf)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = cum - probs[order] < p.top_p  # a token stays if the mass before it is below p
        probs[order[~keep]] = 0.0
    if p.min_p > 0.0:
        probs[probs < p.min_p * probs.max()] = 0.0
    return probs / probs.sum()


filtered_probs_reference = filtered_probs  # the NumPy specification of the compiled twin
if not settings().pure_python:
    try:  # same contract, in C (ext/kernels.pyx); tests/test_cpu_kernels.py runs both
        from ._ext.kernels import filtered_probs
    except ImportError:
        pass


def sample_row(
    logits: np.ndarray,
    p: SamplingParams,
    rng: np.random.Generator | None,
    prompt_ids,
    output_ids,
    allowed: np.ndarray | None = None,
) -> Sample:
    """One token from one row of logits (V,); rng may be None when p is greedy.

    allowed (V,) bool, a grammar's mask: only those tokens can be drawn. Logprobs stay the
    model's own (as vLLM returns them), not the masked distribution's."""
    logits = np.array(logits, dtype=np.float32)  # our copy: penalties edit it
    raw_logprobs = log_softmax(logits) if p.logprobs is not None else None
    logits = apply_penalties(logits, p, prompt_ids, output_ids)
    if allowed is not None:
        logits[~allowed] = -np.inf
    if p.greedy:
        token = int(np.argmax(logits))
    else:
        probs = filtered_probs(logits.astype(np.float64), p)
        cdf = np.cumsum(probs)
        token = int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))
    if raw_logprobs is None:
        return Sample(token, float("nan"), None)
    top = {}
    if p.logprobs:
        idx = np.argpartition(-raw_logprobs, p.logprobs - 1)[: p.logprobs]
        idx = idx[np.argsort(-raw_logprobs[idx], kind="stable")]
        top = {int(i): float(raw_logprobs[i]) for i in idx}
    return Sample(token, float(raw_logprobs[token]), top)
