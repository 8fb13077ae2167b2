"""`tinyserve serve`: an OpenAI-compatible HTTP server on the batching engine.

One thread owns the Engine and runs its step loop; HTTP handlers (asyncio, starlette + uvicorn)
hand it commands through a lock-guarded queue and get RequestOutputs back through per-request
asyncio queues. Requests from many connections therefore join the same engine step (continuous
batching), and only the loop thread ever touches the engine, its tokenizer or its KV cache.

Endpoints: POST /v1/completions, POST /v1/chat/completions (stream false / true, SSE chunks in
OpenAI's format ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics
(Prometheus text). Errors are OpenAI-style JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .errors import RequestError, TinyServeError
from .outputs import CompletionOutput, RequestOutput
from .sampling import SamplingParams

try:  # the `serve` extra; the rest of tinyserve does without it
    from starlette.responses import JSONResponse, PlainTextResponse, Response
except ImportError as e:
    _MISSING_EXTRA: str | None = f"{e.name} is not installed: pip install 'tinyserve[serve]'"
else:
    _MISSING_EXTRA = None


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


# -- metrics ------------------------------------------------------------------------------------


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for b, c in zip((*self.buckets, float("inf")), self.counts):
            total += c
            le = "+Inf" if b == float("inf") else repr(b)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        return lines + [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]


_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters the engine thread and the HTTP handlers update; rendered as Prometheus text."""

    def __init__(self):
        self.lock = threading.Lock()
        self.http: dict[tuple[str, int], int] = {}  # (path, status) -> responses
        self.finished: dict[str, int] = {}  # finish reason of each request's first sample -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(
            "tinyserve_time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS
        )
        self.tpot = Histogram(
            "tinyserve_time_per_output_token_seconds",
            "Time per output token after the first.",
            _LATENCY_BUCKETS,
        )
        self.e2e = Histogram(
            "tinyserve_e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS
        )
        self.gauges = dict.fromkeys(
            ["kv_blocks_in_use", "kv_blocks_total", "sequences_running", "sequences_waiting"], 0
        )

    def count_http(self, path: str, status: int) -> None:
        with self.lock:
            self.http[path, status] = self.http.get((path, status), 0) + 1

    def count_finished(self, out: RequestOutput | None, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            if out is None:
                return
            m = out.metrics
            self.prompt_tokens += len(out.prompt_token_ids)
            self.generation_tokens += sum(len(o.token_ids) for o in out.outputs)
            for hist, v in ((self.ttft, m.ttft), (self.tpot, m.tpot), (self.e2e, m.e2e)):
                if v is not None:
                    hist.observe(v)

    def render(self) -> str:
        with self.lock:
            lines = [
                "# HELP tinyserve_http_requests_total HTTP responses by path and status.",
                "# TYPE tinyserve_http_requests_total counter",
            ]
            lines += [
                f'tinyserve_http_requests_total{{path="{p}",status="{s}"}} {n}'
                for (p, s), n in sorted(self.http.items())
            ]
            lines += [
                "# HELP tinyserve_requests_total Generation requests ended, by finish reason.",
                "# TYPE tinyserve_requests_total counter",
            ]
            lines += [
                f'tinyserve_requests_total{{finish_reason="{r}"}} {n}'
                for r, n in sorted(self.finished.items())
            ]
            for name, v, help in [
                ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished requests."),
                ("generation_tokens_total", self.generation_tokens, "Tokens generated."),
            ]:
                lines += [
                    f"# HELP tinyserve_{name} {help}",
                    f"# TYPE tinyserve_{name} counter",
                    f"tinyserve_{name} {v}",
                ]
            for name, v in self.gauges.items():
                lines += [f"# TYPE tinyserve_{name} gauge", f"tinyserve_{name} {v}"]
            for hist in (self.ttft, self.tpot, self.e2e):
                lines += hist.render()
        return "\n".join(lines) + "\n"


# -- the engine loop ----------------------------------------------------------------------------


class Handle:
    """One request's mailbox: the engine thread posts, the handler's event loop awaits."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = False  # set by the handler once it has seen the end

    def post(self, item) -> None:
        """From the engine thread: a list of prompt ids (accepted), a RequestOutput or an error."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def accepted(self) -> list[int]:
        """The prompt's token ids once the engine has queued the request; raises its error."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.done = True
                raise item
            yield item
            if item.finished:
                self.done = True
                return


@dataclass(frozen=True, slots=True)
class _Submit:
    handle: Handle | None  # set when the request is admitted
    prepare: Callable[[], list[int]]  # runs on the engine thread: render / tokenize the prompt
    params: SamplingParams
    default_max_tokens: bool  # max_tokens not given: as many as the context and limit allow
    prompt_field: str  # "prompt" or "messages", named in errors


class EngineLoop:
    """The only thread that touches the Engine: adds, aborts, and steps while work remains."""

    def __init__(self, llm, config: ServerConfig, metrics: Metrics):
        self.llm, self.engine, self.config, self.metrics = llm, llm.engine, config, metrics
        ctx = self.engine.model_config.context_len
        self.max_prompt_tokens = min(config.max_prompt_tokens or ctx - 1, ctx - 1)
        self.cond = threading.Condition()
        self.commands: list = []
        self.live: dict[str, Handle] = {}  # engine thread only
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="tinyserve-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()

    def submit(self, cmd: _Submit) -> None:
        self._command(cmd)

    def abort(self, request_id: str) -> None:
        self._command(request_id)

    def _command(self, cmd) -> None:
        with self.cond:
            self.commands.append(cmd)
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.commands or self.stopping or self.engine.has_unfinished()):
                    self.cond.wait()
                if self.stopping:
                    break
                commands, self.commands = self.commands, []
            for cmd in commands:  # in order: an abort never overtakes its request's add
                if isinstance(cmd, _Submit):
                    self._add(cmd)
                else:
                    self._abort(cmd)
            if self.engine.has_unfinished():
                self._step()
            self._publish()
        gone = HTTPError(503, "the server is shutting down", type="server_error", code="shutdown")
        for rid, handle in list(self.live.items()):
            handle.post(gone)
            self._abort(rid)

    def _add(self, cmd: _Submit) -> None:
        rid = cmd.handle.request_id
        try:
            ids = cmd.prepare()
            if len(ids) > self.max_prompt_tokens:
                raise HTTPError(
                    400,
                    f"the prompt has {len(ids)} tokens, more than this server's "
                    f"limit of {self.max_prompt_tokens}",
                    cmd.prompt_field,
                    "prompt_too_long",
                )
            params = cmd.params
            if cmd.default_max_tokens:
                room = self.engine.model_config.context_len - len(ids)
                params = dataclasses.replace(
                    params, max_tokens=max(1, min(room, self.config.max_tokens_limit))
                )
            self.engine.add_request(ids, params, rid)
        except Exception as e:  # noqa: BLE001 - any failure goes to its client, not the loop
            cmd.handle.post(e)
            return
        self.live[rid] = cmd.handle
        cmd.handle.post(ids)

    def _abort(self, rid: str) -> None:
        if self.live.pop(rid, None) is not None:
            self.engine.abort(rid)
            self.metrics.count_finished(None, "abort")

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a backend failure fails the requests in flight only
            err = HTTPError(
                500,
                f"engine failure: {type(e).__name__}: {e}",
                type="server_error",
                code="engine_error",
            )
            for rid, handle in list(self.live.items()):
                handle.post(err)
                self._abort(rid)
            return
        for out in outs:
            handle = self.live.get(out.request_id)
            if handle is None:
                continue
            if out.finished:
                del self.live[out.request_id]
                self.metrics.count_finished(out, out.outputs[0].finish_reason or "stop")
            handle.post(out)

    def _publish(self) -> None:
        kv = self.engine.kv_manager
        with self.metrics.lock:
            self.metrics.gauges.update(
                kv_blocks_in_use=kv.n_used_blocks,
                kv_blocks_total=kv.num_blocks,
                sequences_running=len(self.engine.scheduler.running),
                sequences_waiting=len(self.engine.scheduler.waiting),
            )


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


async def _events(handle: Handle, fmt: _Formatter, include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks of one streamed request, [DONE] last."""
    started, ended = set(), set()
    last = None
    try:
        async for out in handle.outputs():
            last = out
            choices = []
            for d in out.deltas:
                if d.index in ended or not (
                    d.text or d.token_ids or d.finish_reason or d.index not in started
                ):
                    continue
                choices.append(fmt.choice_delta(d, d.index not in started))
                started.add(d.index)
                if d.finish_reason is not None:
                    ended.add(d.index)
            if choices:
                yield fmt.chunk(choices, None, include_usage)
    except HTTPError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
        return
    if include_usage and last is not None:
        yield fmt.chunk([], _usage(last.prompt_token_ids, last.outputs), True)
    yield "data: [DONE]\n\n"


# -- the ASGI app (starlette) -------------------------------------------------------------------


class _ClientGone(Exception):
    """The client disconnected before its answer was ready: nothing to send."""


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until(disconnect: asyncio.Future, coro):
    """Await coro unless the client disconnects first; errors come back as HTTPError."""
    task = asyncio.ensure_future(coro)
    await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        await asyncio.wait({task})  # let it unwind before anyone touches what it was awaiting
        raise _ClientGone()
    try:
        return task.result()
    except (HTTPError, StopAsyncIteration):
        raise
    except TinyServeError as e:  # RequestError, TokenizerError: this request cannot be served
        raise HTTPError(400, str(e), code="invalid_request") from None
    except Exception as e:  # noqa: BLE001 - reported to the client as a 500
        raise HTTPError(
            500, f"internal error: {type(e).__name__}: {e}", type="server_error"
        ) from None


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    async for out in outputs:
        if out.finished:
            return out
    raise HTTPError(500, "the engine ended the request without an output", type="server_error")


class _Generation:
    """One admitted request until its end; `close` frees its blocks if it is cut short."""

    def __init__(self, server: _Server, request, handle: Handle):
        self.server, self.request, self.handle = server, request, handle
        self.disconnect = asyncio.ensure_future(_wait_disconnect(request.receive))

    def close(self) -> None:
        self.disconnect.cancel()
        self.server.n_in_flight -= 1
        if not self.handle.done:  # the client went away (or we failed) mid-request
            self.server.loop.abort(self.handle.request_id)


class _EventStream:
    """An SSE response that stops, and aborts its request, the moment the client disconnects."""

    def __init__(self, gen: _Generation, events: AsyncIterator[str]):
        self.gen, self.events = gen, events

    async def __call__(self, scope, receive, send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        ]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            while True:
                try:
                    chunk = await _until(self.gen.disconnect, self.events.__anext__())
                except (StopAsyncIteration, _ClientGone):
                    break
                await send(
                    {"type": "http.response.body", "body": chunk.encode(), "more_body": True}
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the socket closed under us
            pass
        finally:
            await self.events.aclose()
            self.gen.close()


class _Server:
    """Route handlers over one EngineLoop."""

    def __init__(self, llm, config: ServerConfig):
        self.llm, self.config = llm, config
        self.metrics = Metrics()
        self.loop = EngineLoop(llm, config, self.metrics)
        self.n_in_flight = 0  # event-loop thread only

    async def _body(self, request) -> dict:
        limit = self.config.max_body_bytes
        too_big = HTTPError(
            413, f"request body is larger than {limit} bytes", code="request_too_large"
        )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise HTTPError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise HTTPError(400, "request body must be a JSON object")
        return obj

    def _check_model(self, body: dict) -> None:
        model = _field(body, "model", "str")
        if model is not None and model != self.config.model_name:
            raise HTTPError(
                404,
                f"the model '{model}' does not exist; this server serves "
                f"'{self.config.model_name}'",
                "model",
                "model_not_found",
            )

    # routes --------------------------------------------------------------------------------------

    async def health(self, request):
        alive = self.loop.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, 200 if alive else 503)

    async def models(self, request):
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.config.model_name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "tinyserve",
                        "max_model_len": self.llm.engine.model_config.context_len,
                    }
                ],
            }
        )

    async def prometheus(self, request):
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def completions(self, request):
        body = await self._body(request)
        _check_fields(body, {**_COMMON, **_SAMPLING, **_COMPLETION})
        self._check_model(body)
        prepare = _completion_prompt(body, self.llm.tokenizer)
        top_n = _field(body, "logprobs", "int")
        params = _sampling_params(
            body, _field(body, "max_tokens", "int"), top_n, self.config.max_tokens_limit
        )
        return await self._generate(
            request, body, _Submit(None, prepare, params, False, "prompt"), False, top_n
        )

    async def chat(self, request):
        body = await self._body(request)
        _check_fields(body, {**_COMMON, **_SAMPLING, **_CHAT})
        self._check_model(body)
        messages = _chat_messages(body)
        if self.llm.tokenizer is None or not self.llm.tokenizer.has_chat_template:
            raise HTTPError(400, "this model has no chat template: use /v1/completions", "messages")
        top_n = None
        if _field(body, "logprobs", "bool", False):
            top_n = _field(body, "top_logprobs", "int", 0)
        elif body.get("top_logprobs") is not None:
            raise HTTPError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        max_tokens = _field(body, "max_completion_tokens", "int", _field(body, "max_tokens", "int"))
        params = _sampling_params(
            body, max_tokens, top_n, self.config.max_tokens_limit, "top_logprobs"
        )
        prepare = lambda: self.llm.chat_prompt(messages)
        submit = _Submit(None, prepare, params, max_tokens is None, "messages")
        return await self._generate(request, body, submit, True, top_n)

    async def _generate(self, request, body: dict, submit: _Submit, chat: bool, top_n: int | None):
        if self.n_in_flight >= self.config.max_queue:
            raise HTTPError(
                503,
                f"{self.n_in_flight} requests in flight, the server's limit: try again later",
                type="server_error",
                code="queue_full",
            )
        fmt = _Formatter(chat, self.config.model_name, self.llm.tokenizer, top_n)
        handle = Handle(fmt.id, asyncio.get_running_loop())
        self.n_in_flight += 1
        gen = _Generation(self, request, handle)
        streaming = False
        try:
            self.loop.submit(dataclasses.replace(submit, handle=handle))
            await _until(gen.disconnect, handle.accepted())
            if body.get("stream"):
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                streaming = True  # from here on the stream owns gen and closes it
                return _EventStream(gen, _events(handle, fmt, usage))
            final = await _until(gen.disconnect, _last(handle.outputs()))
            return JSONResponse(fmt.response(final))
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it
        finally:
            if not streaming:
                gen.close()


async def _error_response(request, exc):
    if isinstance(exc, HTTPError):
        return JSONResponse(exc.body(), exc.status)
    if not hasattr(exc, "status_code"):  # a bug of ours: still an OpenAI-shaped 500
        err = HTTPError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), 500)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(HTTPError(exc.status_code, exc.detail, code=code).body(), exc.status_code)


class _Guard:
    """Outermost ASGI layer: the API key on /v1/*; a count of responses by path and status."""

    def __init__(self, app, server: _Server):
        self.app, self.server = app, server
        self.paths = {r.path for r in app.routes}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            key = self.server.config.api_key
            if (
                key is not None
                and scope["path"].startswith("/v1/")
                and not self._authorized(scope, key)
            ):
                err = HTTPError(
                    401,
                    "invalid or missing API key (send 'Authorization: Bearer <key>')",
                    code="invalid_api_key",
                )
                return await JSONResponse(err.body(), 401)(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.server.metrics.count_http(path, status)

    @staticmethod
    def _authorized(scope, key: str) -> bool:
        got = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        token = got[7:] if got[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), key.encode())


def create_app(llm, config: ServerConfig = ServerConfig()):
    """The ASGI app serving `llm`; its engine thread starts and stops with the app's lifespan."""
    if _MISSING_EXTRA is not None:
        raise ImportError(_MISSING_EXTRA)
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    server = _Server(llm, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    app = Starlette(
        routes=[
            Route("/v1/completions", server.completions, methods=["POST"]),
            Route("/v1/chat/completions", server.chat, methods=["POST"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
            Route("/metrics", server.prometheus, methods=["GET"]),
        ],
        exception_handlers={
            HTTPError: _error_response,
            HTTPException: _error_response,
            Exception: _error_response,
        },
        lifespan=lifespan,
    )
    guarded = _Guard(app, server)
    guarded.server_state = server  # for tests and embedding: the engine loop, metrics, limits
    return guarded


# -- the command --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinyserve serve", description="OpenAI-compatible HTTP server."
    )
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="catalog name, HF directory or .gguf file (default: the catalog's default model)",
    )
    p.add_argument("--backend", "-b", default="cpu", help="backend name (see `tinyserve backends`)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("TINYSERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $TINYSERVE_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send (default: the model's name)",
    )
    defaults = ServerConfig()
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the context - 1")
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=defaults.max_tokens_limit,
        help="largest max_tokens a request may ask for",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=defaults.max_queue,
        help="requests in flight at most; more get 503",
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step")
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    """`tinyserve serve ...`: load the model, then serve until Ctrl-C. Returns the exit code."""
    args = build_parser().parse_args(argv)
    if _MISSING_EXTRA is not None:
        print(f"tinyserve: error: {_MISSING_EXTRA}", file=sys.stderr)
        return 1
    try:
        import uvicorn
    except ImportError:
        print(
            "tinyserve: error: uvicorn is not installed: pip install 'tinyserve[serve]'",
            file=sys.stderr,
        )
        return 1
    from pathlib import Path

    from . import catalog
    from .api import LLM

    try:
        config = ServerConfig(
            model_name=args.served_model_name or Path(args.model or catalog.DEFAULT_MODEL).stem,
            api_key=args.api_key,
            max_body_bytes=args.max_body_bytes,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens_limit=args.max_tokens_limit,
            max_queue=args.max_queue,
        )
    except ValueError as e:
        print(f"tinyserve: error: {e}", file=sys.stderr)
        return 2
    llm = LLM(
        args.model,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        kv_cache_tokens=args.kv_cache_tokens,
    )
    print(
        f"tinyserve: serving '{config.model_name}' on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    uvicorn.run(create_app(llm, config), host=args.host, port=args.port, log_level=args.log_level)
    return 0
