"""SamplingParams and the sampler: logits (R, V) -> one token per row, with optional top-n logprobs.

Order of operations (as vLLM and transformers do): penalties, then the token rules (logit_bias,
allowed_token_ids, min_tokens, bad_words), then temperature, then the top-k / top-p / min-p
filters, then one draw from each sequence's own seeded generator. Logprobs are the model's own
distribution, taken before any of these.
"""

from __future__ import annotations

from collections.abc import Callable
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
        max_tokens: tokens to generate at most (>= 0; 0 only scores the prompt: prompt_logprobs).
        min_tokens: EOS and stop_token_ids are masked until this many tokens are out.
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
        prompt_logprobs: the log-probability of each prompt token given the ones before it, and
            the top-n at each position (RequestOutput.prompt_logprobs; the first is None).
        n: number of completions returned for one prompt.
        best_of: sample this many (>= n) and return the n with the highest cumulative logprob.
        logit_bias: {token id: bias in [-100, 100]} added to the logits (OpenAI's); kept as
            sorted (id, bias) pairs.
        allowed_token_ids: sample only among these ids.
        bad_words: words whose token sequences may never be generated (multi-token aware).
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
    prompt_logprobs: int | None = None
    n: int = 1
    best_of: int | None = None
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
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
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if isinstance(self.bad_words, str):
            object.__setattr__(self, "bad_words", (self.bad_words,))
        object.__setattr__(self, "bad_words", tuple(self.bad_words or ()))
        allowed = self.allowed_token_ids
        checks = [
            (
                isinstance(self.max_tokens, int) and self.max_tokens >= 0,
                f"max_tokens must be >= 0, got {self.max_tokens}",
            ),
            (
                isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
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
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}",
            ),
            (isinstance(self.n, int) and 1 <= self.n <= 64, f"n must be in [1, 64], got {self.n}"),
            (
                self.best_of is None
                or (isinstance(self.best_of, int) and self.n <= self.best_of <= 64),
                f"best_of must be in [n={self.n}, 64], got {self.best_of}",
            ),
            (
                all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
                f"logit_bias must map token ids >= 0 to biases in [-100, 100], got {self.logit_bias}",
            ),
            (
                allowed is None or (bool(allowed) and all(_is_id(t) for t in allowed)),
                f"allowed_token_ids must be a non-empty list of token ids, got {allowed}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (
                self.structured_outputs is None
                or isinstance(self.structured_outputs, StructuredOutputsParams),
                "structured_outputs must be a StructuredOutputsParams",
            ),
            (
                all(isinstance(w, str) and w.strip() for w in self.bad_words),
                "bad_words must be non-empty strings",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def n_samples(self) -> int:
        """Sequences sampled: best_of when given, else n."""
        return self.best_of or self.n

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


def _is_id(t) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0


def _bias_pairs(bias) -> tuple[tuple[int, float], ...]:
    """{id: bias} (JSON's string keys too) or pairs -> sorted (id, bias) pairs."""
    items = bias.items() if isinstance(bias, dict) else (bias or ())
    try:
        return tuple(sorted((int(t), float(b)) for t, b in items))
    except (TypeError, ValueError):
        raise RequestError(f"logit_bias must map token ids to numbers, got {bias}") from None


@dataclass(frozen=True, slots=True)
class TokenRules:
    """A request's rules about token ids, resolved once against the vocab and the tokenizer:
    logit_bias, allowed_token_ids, min_tokens (over EOS and stop ids), bad_words."""

    bias_ids: np.ndarray  # (B,) int64
    bias: np.ndarray  # (B,) float32
    allowed: np.ndarray | None  # (A,) int64
    min_tokens: int
    stop_ids: np.ndarray  # (E,) int64: masked while fewer than min_tokens are out
    bad_words: tuple[tuple[int, ...], ...]  # token sequences that may not appear

    @classmethod
    def build(
        cls,
        p: SamplingParams,
        vocab_size: int,
        eos_ids,
        encode: Callable[[str], list[int]] | None,
    ) -> TokenRules:
        for name, ids in (
            ("logit_bias", [t for t, _ in p.logit_bias]),
            ("allowed_token_ids", p.allowed_token_ids or ()),
        ):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise RequestError(
                    f"{name}: token ids must be in [0, {vocab_size}), got {bad[:5]}", name
                )
        if p.bad_words and encode is None:
            raise RequestError("bad_words needs a tokenizer", "bad_words")
        stop = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
        return cls(
            bias_ids=np.array([t for t, _ in p.logit_bias], dtype=np.int64),
            bias=np.array([b for _, b in p.logit_bias], dtype=np.float32),
            allowed=None if p.allowed_token_ids is None else np.array(p.allowed_token_ids),
            min_tokens=p.min_tokens,
            stop_ids=np.array(sorted(stop), dtype=np.int64),
            bad_words=tuple(ids for w in p.bad_words for ids in _bad_word_ids(w, encode)),
        )

    @property
    def active(self) -> bool:
        """Whether these rules can change a row's logits at all."""
        return bool(
            len(self.bias_ids) or self.allowed is not None or self.min_tokens or self.bad_words
        )

    def apply(self, logits: np.ndarray, output_ids) -> np.ndarray:
        """(V,) -> (V,), in place: biases added, forbidden tokens at -inf."""
        logits[self.bias_ids] += self.bias
        if self.allowed is not None:
            keep = logits[self.allowed]
            logits[:] = -np.inf
            logits[self.allowed] = keep
        if len(output_ids) < self.min_tokens:
            logits[self.stop_ids] = -np.inf
        for word in self.bad_words:
            # the last token is banned when the output already ends with the ones before it
            head = word[:-1]
            if not head or tuple(output_ids[-len(head) :]) == head:
                logits[word[-1]] = -np.inf
        return logits


def _bad_word_ids(word: str, encode) -> list[tuple[int, ...]]:
    """A bad word's token sequences, as vLLM makes them: the word alone, and after a space when
    that tokenizes to as many tokens with a new first one (the word inside a text)."""
    alone = tuple(encode(word.lstrip()))
    spaced = tuple(encode(" " + word.lstrip()))
    out = [alone] if alone else []
    if spaced and len(spaced) == len(alone) and spaced[0] != alone[0]:
        out.append(spaced)
    return out


NO_RULES = TokenRules(
    np.zeros(0, np.int64), np.zeros(0, np.float32), None, 0, np.zeros(0, np.int64), ()
)


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
    rules: TokenRules = NO_RULES,
) -> Sample:
    """One token from one row of logits (V,); rng may be None when p is greedy.

    allowed (V,) bool, a grammar's mask: only those tokens can be drawn. Logprobs stay the
    model's own (as vLLM returns them), not the masked distribution's."""
    logits = np.array(logits, dtype=np.float32)  # our copy: penalties edit it
    # best_of ranks its samples by their cumulative logprob, so it needs the chosen one's too
    wants_logprob = p.logprobs is not None or p.n_samples > p.n
    raw_logprobs = log_softmax(logits) if wants_logprob else None
    logits = rules.apply(apply_penalties(logits, p, prompt_ids, output_ids), output_ids)
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
    if p.logprobs is None:
        return Sample(token, float(raw_logprobs[token]), None)
    top = {}
    if p.logprobs:
        idx = np.argpartition(-raw_logprobs, p.logprobs - 1)[: p.logprobs]
        idx = idx[np.argsort(-raw_logprobs[idx], kind="stable")]
        top = {int(i): float(raw_logprobs[i]) for i in idx}
    return Sample(token, float(raw_logprobs[token]), top)
