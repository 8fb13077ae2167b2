"""What generation hands back: a RequestOutput per request, a CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sequence import RequestMetrics


@dataclass
class CompletionOutput:
    """One of a request's n samples. In a streamed delta, text and token_ids are the new part only."""

    index: int
    text: str
    token_ids: list[int]
    # "stop" | "length" | "abort" | "tool_calls" | "error" (the logits were NaN / Inf) | None
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = (
        None  # per token: top-n ids -> logprob (+ the chosen one)
    )
    cumulative_logprob: float | None = None
    tool_calls: list | None = None  # LLM.chat with tools: the tools.ToolCall s parsed from text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # cumulative so far
    finished: bool
    metrics: RequestMetrics
    deltas: list[CompletionOutput] = field(default_factory=list)  # what this step added
    # with SamplingParams.prompt_logprobs, once the prompt is computed: per prompt token, top-n
    # ids -> logprob (+ the prompt's own token); None for the first token
    prompt_logprobs: list[dict[int, float] | None] | None = None
