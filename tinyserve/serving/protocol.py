"""The OpenAI wire format: server limits, request bodies -> prompts and SamplingParams, engine
outputs -> completion / chat JSON, and the OpenAI-style error every failure becomes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import RequestError
from ..outputs import CompletionOutput, RequestOutput
from ..sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Limits and identity of one server. None for max_prompt_tokens: the model's context - 1."""

    model_name: str = "tinyserve"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens_limit: int = 4096
    max_queue: int = 256  # requests accepted and not yet finished

    def __post_init__(self):
        for name in ("max_body_bytes", "max_tokens_limit", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


class HTTPError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# -- request bodies -> prompts and SamplingParams -------------------------------------------------

_KINDS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "an array"),
}
# request field -> kind, shared by both endpoints (top_k, min_p, ... as vLLM takes them)
_SAMPLING = {
    "temperature": "number",
    "top_p": "number",
    "top_k": "int",
    "min_p": "number",
    "seed": "int",
    "n": "int",
    "presence_penalty": "number",
    "frequency_penalty": "number",
    "repetition_penalty": "number",
    "ignore_eos": "bool",
    "skip_special_tokens": "bool",
}
_COMMON = {
    "model": "str",
    "stream": "bool",
    "stream_options": "dict",
    "stop": None,
    "stop_token_ids": "list",
    "max_tokens": "int",
    "user": "str",
    "best_of": "int",
    "logit_bias": "dict",
    "response_format": "dict",
    "metadata": "dict",
    "store": "bool",
    "service_tier": "str",
}
_COMPLETION = {"prompt": None, "logprobs": "int", "echo": "bool", "suffix": "str"}
_CHAT = {
    "messages": "list",
    "logprobs": "bool",
    "top_logprobs": "int",
    "max_completion_tokens": "int",
    "tools": "list",
    "tool_choice": None,
    "parallel_tool_calls": "bool",
}


def _field(body: dict, name: str, kind: str | None, default=None):
    v = body.get(name)
    if v is None:
        return default
    if kind is not None:
        ok, what = _KINDS[kind]
        if not ok(v):
            raise HTTPError(400, f"'{name}' must be {what}, got {json.dumps(v)[:40]}", name)
    return v


def _check_fields(body: dict, allowed: dict) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise HTTPError(400, f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    for name, kind in allowed.items():
        _field(body, name, kind)
    for name, bad in [
        ("echo", body.get("echo")),
        ("suffix", body.get("suffix")),
        ("logit_bias", body.get("logit_bias")),
        ("tools", body.get("tools")),
        ("tool_choice", body.get("tool_choice") not in (None, "none")),
    ]:
        if bad:
            raise HTTPError(400, f"'{name}' is not supported by this server", name)
    fmt = body.get("response_format")
    if fmt is not None and fmt.get("type") != "text":
        raise HTTPError(
            400, "only response_format {'type': 'text'} is supported", "response_format"
        )
    if body.get("best_of") not in (None, body.get("n", 1)):
        raise HTTPError(400, "'best_of' other than n is not supported", "best_of")
    if body.get("stream_options") is not None and not body.get("stream"):
        raise HTTPError(
            400, "'stream_options' is only allowed when 'stream' is true", "stream_options"
        )


def _sampling_params(
    body: dict,
    max_tokens: int | None,
    logprobs: int | None,
    limit: int,
    logprobs_field: str = "logprobs",
) -> SamplingParams:
    if max_tokens == 0 and not body.get("echo"):
        raise HTTPError(400, "max_tokens must be >= 1 (0 only with 'echo')", "max_tokens")
    if max_tokens is not None and max_tokens > limit:
        raise HTTPError(
            400, f"max_tokens {max_tokens} is above this server's limit of {limit}", "max_tokens"
        )
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise HTTPError(400, "'stop' must be a string or an array of strings", "stop")
    if stop is not None and len(stop) > 16:
        raise HTTPError(400, f"at most 16 stop strings, got {len(stop)}", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not all(_KINDS["int"][0](t) for t in stop_ids):
        raise HTTPError(400, "'stop_token_ids' must be an array of integers", "stop_token_ids")
    kwargs = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
    try:
        return SamplingParams(
            max_tokens=16 if max_tokens is None else max_tokens,
            stop=tuple(stop or ()),
            stop_token_ids=tuple(stop_ids),
            logprobs=logprobs,
            **kwargs,
        )
    except RequestError as e:
        first = str(e).split()[0]  # SamplingParams' messages start with the field's name
        param = logprobs_field if first == "logprobs" else first
        raise HTTPError(
            400, str(e), param if param in body or first == "max_tokens" else None
        ) from None


def _completion_prompt(body: dict, tokenizer) -> Callable[[], list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        if tokenizer is None:
            raise HTTPError(
                400, "this model has no tokenizer: send 'prompt' as token ids", "prompt"
            )
        return lambda: tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(_KINDS["int"][0](t) for t in prompt):
        return lambda: list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise HTTPError(
            400, "batched prompts are not supported: send one request per prompt", "prompt"
        )
    raise HTTPError(400, "'prompt' must be a non-empty string or array of token ids", "prompt")


_ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's new name for system


def _chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not messages:
        raise HTTPError(400, "'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise HTTPError(
                400, f"messages[{i}] needs a role of system, user or assistant", "messages"
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise HTTPError(
                    400, f"messages[{i}].content: only text parts are supported", "messages"
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise HTTPError(400, f"messages[{i}].content must be a string", "messages")
        out.append(
            {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
        )
    return out


# -- outputs -> OpenAI JSON ---------------------------------------------------------------------


def _usage(prompt_ids: list[int], outputs: list[CompletionOutput]) -> dict:
    n_out = sum(len(o.token_ids) for o in outputs)
    return {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": n_out,
        "total_tokens": len(prompt_ids) + n_out,
    }


def _finish_reason(o: CompletionOutput) -> str | None:
    return o.finish_reason if o.finish_reason in (None, "stop", "length") else "stop"


class _Formatter:
    """Turns engine outputs into OpenAI completion / chat JSON for one request."""

    def __init__(self, chat: bool, model: str, tokenizer, top_n: int | None):
        self.chat, self.model, self.tokenizer, self.top_n = chat, model, tokenizer, top_n
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text_offset: dict[int, int] = {}  # completions logprobs: where each choice's text is

    def _token(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False) if self.tokenizer else str(t)

    def logprobs(self, o: CompletionOutput) -> dict | None:
        if self.top_n is None or o.logprobs is None:
            return None
        chosen = o.token_ids
        if self.chat:
            content = []
            for t, lp in zip(chosen, o.logprobs):
                top = sorted(lp.items(), key=lambda kv: -kv[1])[: self.top_n]
                content.append(
                    {**self._lp(t, lp[t]), "top_logprobs": [self._lp(i, v) for i, v in top]}
                )
            return {"content": content}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp in zip(chosen, o.logprobs):
            s = self._token(t)
            offset = self.text_offset.get(o.index, 0)
            self.text_offset[o.index] = offset + len(s)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp[t])
            top: dict[str, float] = {}
            for i, v in sorted(lp.items(), key=lambda kv: -kv[1]):
                top.setdefault(self._token(i), v)  # tokens that print alike: keep the likelier one
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
        return out

    def _lp(self, t: int, v: float) -> dict:
        s = self._token(t)
        return {"token": s, "logprob": v, "bytes": list(s.encode())}

    def response(self, out: RequestOutput) -> dict:
        choices = []
        for o in out.outputs:
            c = {"index": o.index, "logprobs": self.logprobs(o), "finish_reason": _finish_reason(o)}
            if self.chat:
                c["message"] = {"role": "assistant", "content": o.text}
            else:
                c["text"] = o.text
            choices.append(c)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": _usage(out.prompt_token_ids, out.outputs),
        }

    def chunk(
        self, choices: list[dict], usage: dict | None = None, with_usage: bool = False
    ) -> str:
        c = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if with_usage:
            c["usage"] = usage
        return f"data: {json.dumps(c)}\n\n"

    def choice_delta(self, d: CompletionOutput, first: bool) -> dict:
        c = {"index": d.index, "logprobs": self.logprobs(d), "finish_reason": _finish_reason(d)}
        if self.chat:
            c["delta"] = {"role": "assistant", "content": d.text} if first else {"content": d.text}
        else:
            c["text"] = d.text
        return c
