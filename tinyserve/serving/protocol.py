"""The OpenAI wire format: server limits, request bodies -> prompts and SamplingParams, engine
outputs -> completion / chat JSON, and the OpenAI-style error every failure becomes."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from ..errors import RequestError
from ..outputs import CompletionOutput, RequestOutput
from ..sampling import SamplingParams
from ..structured import StructuredOutputsParams
from ..tools import ToolCallStream, ToolPlan


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Limits and identity of one server. None for max_prompt_tokens: the model's context - 1."""

    model_name: str = "tinyserve"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens_limit: int = 4096
    max_queue: int = 256  # requests accepted and not yet finished
    # a request's outputs waiting for its client (more are folded into one); a client that takes
    # nothing sent to it for slow_reader_timeout seconds is dropped and its request aborted
    max_pending_chunks: int = 64
    slow_reader_timeout: float = 30.0

    def __post_init__(self):
        for name in ("max_body_bytes", "max_tokens_limit", "max_queue", "max_pending_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.slow_reader_timeout > 0:
            raise ValueError(f"slow_reader_timeout must be > 0, got {self.slow_reader_timeout}")
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
    "min_tokens": "int",
    "best_of": "int",
    "logit_bias": "dict",
    "allowed_token_ids": "list",
    "bad_words": "list",
}
_COMMON = {
    "model": "str",
    "stream": "bool",
    "stream_options": "dict",
    "stop": None,
    "stop_token_ids": "list",
    "max_tokens": "int",
    "user": "str",
    "response_format": "dict",
    "structured_outputs": "dict",  # vLLM's extra field: json, regex, choice, grammar, json_object
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
        ("suffix", body.get("suffix")),
    ]:
        if bad:
            raise HTTPError(400, f"'{name}' is not supported by this server", name)
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
    prompt_logprobs: int | None = None,
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
            prompt_logprobs=prompt_logprobs,
            **kwargs,
        )
    except RequestError as e:
        first = str(e).split()[0]  # SamplingParams' messages start with the field's name
        param = logprobs_field if first == "logprobs" else first
        raise HTTPError(
            400, str(e), param if param in body or first == "max_tokens" else None
        ) from None


def _structured_outputs(body: dict) -> tuple[StructuredOutputsParams | None, str | None]:
    """OpenAI's response_format or vLLM's structured_outputs -> (the constraint, its field)."""
    fmt, so = body.get("response_format"), body.get("structured_outputs")
    if fmt is not None and so is not None and fmt.get("type") != "text":
        raise HTTPError(
            400,
            "give either 'response_format' or 'structured_outputs', not both",
            "response_format",
        )
    try:
        if so is not None:
            return StructuredOutputsParams.from_dict(so), "structured_outputs"
        if fmt is None or fmt.get("type") == "text":
            return None, None
        if fmt.get("type") == "json_object":
            return StructuredOutputsParams(json_object=True), "response_format"
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
                raise RequestError("response_format.json_schema.schema must be a JSON schema")
            # strict or not, the schema is enforced: the mask admits nothing else
            return StructuredOutputsParams(json=json.dumps(spec["schema"])), "response_format"
    except RequestError as e:
        field = "structured_outputs" if so is not None else "response_format"
        raise HTTPError(400, str(e), field) from None
    raise HTTPError(
        400,
        "response_format type must be 'text', 'json_object' or 'json_schema'",
        "response_format",
    )


def _tool_plan(body: dict) -> ToolPlan | None:
    """tools, tool_choice, parallel_tool_calls -> a ToolPlan (None without tools)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise HTTPError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None
    try:
        return ToolPlan(tools, choice or "auto", body.get("parallel_tool_calls", True))
    except RequestError as e:
        raise HTTPError(
            400, str(e), "tool_choice" if "tool_choice" in str(e) else "tools"
        ) from None


def _is_ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(_KINDS["int"][0](t) for t in v)


def completion_prompts(body: dict, tokenizer) -> list[str | list[int]]:
    """'prompt' as OpenAI and vLLM take it: a string, token ids, or a batch of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        prompts = []
    if len({isinstance(p, str) for p in prompts}) > 1:
        raise HTTPError(400, "a batch of prompts is all strings or all token id arrays", "prompt")
    for p in prompts:
        if isinstance(p, str) and p and tokenizer is None:
            raise HTTPError(
                400, "this model has no tokenizer: send 'prompt' as token ids", "prompt"
            )
        if not ((isinstance(p, str) and p) or _is_ids(p)):
            raise HTTPError(
                400,
                "'prompt' must be a non-empty string or array of token ids, or an array of those",
                "prompt",
            )
    return prompts


_ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's system


def _chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not messages:
        raise HTTPError(400, "'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise HTTPError(
                400, f"messages[{i}] needs a role of system, user, assistant or tool", "messages"
            )
        content = m.get("content")
        if m["role"] == "assistant" and m.get("tool_calls") is not None:
            out.append(_assistant_calls(m, i))
            continue
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
        message = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
        if m["role"] == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise HTTPError(400, f"messages[{i}].tool_call_id must be a string", "messages")
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def _assistant_calls(m: dict, i: int) -> dict:
    """An assistant message that called tools: its calls checked and kept for the template."""
    calls = m["tool_calls"]
    ok = isinstance(calls, list) and all(
        isinstance(c, dict)
        and isinstance(c.get("function"), dict)
        and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments", "{}"), (str, dict))
        for c in calls
    )
    if not ok or not isinstance(m.get("content") or "", str):
        raise HTTPError(
            400,
            f"messages[{i}].tool_calls must be [{{'id', 'type': 'function', "
            "'function': {'name', 'arguments'}}]",
            "messages",
        )
    return {"role": "assistant", "content": m.get("content") or "", "tool_calls": calls}


# -- outputs -> OpenAI JSON ---------------------------------------------------------------------


def usage_of(outs: list[RequestOutput]) -> dict:
    """OpenAI's usage over the engine requests of one HTTP request."""
    n_in = sum(len(out.prompt_token_ids) for out in outs)
    n_out = sum(len(o.token_ids) for out in outs for o in out.outputs)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _finish_reason(o: CompletionOutput) -> str | None:
    # "error": the model's logits went NaN / Inf; the client must not take the text as whole
    return o.finish_reason if o.finish_reason in (None, "stop", "length", "error") else "stop"


class _Formatter:
    """Turns engine outputs into OpenAI completion / chat JSON for one HTTP request: one engine
    request per prompt, choice index = prompt index * n + sample index (as OpenAI numbers them).

    echo (completions): each choice starts with its prompt's text, and with logprobs its prompt
    tokens' logprobs (the first one's null), as lm-eval's loglikelihood requests read them."""

    def __init__(
        self,
        chat: bool,
        model: str,
        tokenizer,
        top_n: int | None,
        n: int = 1,
        echo: list[str] | None = None,
        tools: tuple[ToolPlan, str] | None = None,  # the plan and the model's call syntax
    ):
        self.chat, self.model, self.tokenizer, self.top_n = chat, model, tokenizer, top_n
        self.n, self.echo = n, echo
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text_offset: dict[int, int] = {}  # completions logprobs: where each choice's text is
        self.tools = tools
        self.streams: dict[int, ToolCallStream] = {}  # choice index -> its streamed calls
        self.n_calls: dict[int, int] = {}  # choice index -> tool calls streamed so far

    def _token(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False) if self.tokenizer else str(t)

    def index(self, prompt_index: int, o: CompletionOutput) -> int:
        return prompt_index * self.n + o.index

    def logprobs(self, o: CompletionOutput, index: int = 0) -> dict | None:
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
        return self._completion_logprobs(index, chosen, o.logprobs)

    def _completion_logprobs(self, index: int, ids: list[int], lps: list) -> dict:
        """OpenAI's completions logprobs of tokens ids; lps[i] None: no logprob (the prompt's
        first token)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp in zip(ids, lps):
            s = self._token(t)
            offset = self.text_offset.get(index, 0)
            self.text_offset[index] = offset + len(s)
            out["tokens"].append(s)
            out["token_logprobs"].append(None if lp is None else lp[t])
            top: dict[str, float] | None = None
            if lp is not None:
                top = {}
                for i, v in sorted(lp.items(), key=lambda kv: -kv[1]):
                    top.setdefault(self._token(i), v)  # tokens that print alike: the likelier
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
        return out

    def _echoed(self, c: dict, prompt_index: int, out: RequestOutput, index: int) -> dict:
        """The choice c with its prompt in front (text, and logprobs when asked for)."""
        c["text"] = self.echo[prompt_index] + c["text"]
        if self.top_n is not None:
            pl = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            tail_end = self.text_offset.get(index, 0)  # the completion's text so far
            self.text_offset[index] = 0
            head = self._completion_logprobs(index, out.prompt_token_ids, pl)
            prompt_end = self.text_offset[index]
            tail = c["logprobs"] or {k: [] for k in head}
            tail["text_offset"] = [o + prompt_end for o in tail["text_offset"]]
            c["logprobs"] = {k: head[k] + tail[k] for k in head}
            self.text_offset[index] = prompt_end + tail_end
        return c

    def _lp(self, t: int, v: float) -> dict:
        s = self._token(t)
        return {"token": s, "logprob": v, "bytes": list(s.encode())}

    def response(self, outs: list[RequestOutput]) -> dict:
        choices = []
        for p, out in enumerate(outs):
            for o in out.outputs:
                index = self.index(p, o)
                c = {
                    "index": index,
                    "logprobs": self.logprobs(o, index),
                    "finish_reason": _finish_reason(o),
                }
                if self.chat:
                    c["message"] = self._message(o, c)
                else:
                    c["text"] = o.text
                    if self.echo is not None:
                        c = self._echoed(c, p, out, index)
                choices.append(c)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_of(outs),
        }

    def _message(self, o: CompletionOutput, choice: dict) -> dict:
        content, calls = self.tools[0].parse(o.text, self.tools[1]) if self.tools else (o.text, [])
        if not calls:
            return {"role": "assistant", "content": o.text}
        if o.finish_reason == "stop":
            choice["finish_reason"] = "tool_calls"
        return {
            "role": "assistant",
            "content": content,
            "tool_calls": [t.to_openai() for t in calls],
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

    def choice_delta(
        self, d: CompletionOutput, first: bool, prompt_index: int = 0, out=None
    ) -> dict:
        index = self.index(prompt_index, d)
        c = {
            "index": index,
            "logprobs": self.logprobs(d, index),
            "finish_reason": _finish_reason(d),
        }
        if self.chat:
            c["delta"] = {"role": "assistant", "content": d.text} if first else {"content": d.text}
            if self.tools:
                self._tool_delta(c, d)
        else:
            c["text"] = d.text
            if first and self.echo is not None:
                c = self._echoed(c, prompt_index, out, index)
        return c

    def _tool_delta(self, c: dict, d: CompletionOutput) -> None:
        """Hold back call syntax; hand out each call once it is whole (OpenAI's delta.tool_calls)."""
        stream = self.streams.setdefault(c["index"], ToolCallStream(*self.tools))
        content, calls = stream.feed(d.text)
        if d.finish_reason is not None:
            rest, more = stream.finish()
            content, calls = content + rest, calls + more
        c["delta"]["content"] = content
        if calls:
            start = self.n_calls.get(c["index"], 0)
            c["delta"]["tool_calls"] = [
                {"index": start + k, **t.to_openai()} for k, t in enumerate(calls)
            ]
            self.n_calls[c["index"]] = start + len(calls)
        if d.finish_reason == "stop" and self.n_calls.get(c["index"]):
            c["finish_reason"] = "tool_calls"
