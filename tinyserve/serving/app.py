"""The ASGI app (starlette): routes, client-disconnect handling, SSE streams, error responses,
and the outermost layer that checks the API key and counts responses."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
from collections.abc import AsyncIterator

from .. import structured
from ..errors import RequestError, TinyServeError
from ..outputs import RequestOutput
from ..tools import call_syntax
from . import responses
from .engine_loop import EngineLoop, Handle, _Submit
from .metrics import Metrics
from .protocol import (
    _CHAT,
    _COMMON,
    _COMPLETION,
    _KINDS,
    _SAMPLING,
    HTTPError,
    ServerConfig,
    _chat_messages,
    _check_fields,
    _field,
    _Formatter,
    _sampling_params,
    _structured_outputs,
    _tool_plan,
    completion_prompts,
    usage_of,
)

try:  # the `serve` extra; the rest of tinyserve does without it
    from starlette.responses import JSONResponse, PlainTextResponse, Response
except ImportError as e:
    _MISSING_EXTRA: str | None = f"{e.name} is not installed: pip install 'tinyserve[serve]'"
else:
    _MISSING_EXTRA = None


async def merged(handles: list[Handle]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from the engine requests of one HTTP request, as they come."""
    streams = [h.outputs() for h in handles]
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, out
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


async def _events(
    handles: list[Handle], fmt: _Formatter, include_usage: bool
) -> AsyncIterator[str]:
    """SSE chunks of one streamed request, [DONE] last."""
    started, ended = set(), set()
    last: dict[int, RequestOutput] = {}
    try:
        async for p, out in merged(handles):
            last[p] = out
            choices = []
            for d in out.deltas:
                index = fmt.index(p, d)
                if index in ended or not (
                    d.text or d.token_ids or d.finish_reason or index not in started
                ):
                    continue
                choices.append(fmt.choice_delta(d, index not in started, p, out))
                started.add(index)
                if d.finish_reason is not None:
                    ended.add(index)
            if choices:
                yield fmt.chunk(choices, None, include_usage)
    except HTTPError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
        return
    if include_usage and last:
        yield fmt.chunk([], usage_of(list(last.values())), True)
    yield "data: [DONE]\n\n"


class _ClientGone(Exception):
    """The client disconnected before its answer was ready: nothing to send."""


class SlowReader(OSError):
    """The client did not take what was sent within the slow-reader timeout: drop it."""


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
        raise HTTPError(400, str(e), getattr(e, "param", None), "invalid_request") from None
    except Exception as e:  # noqa: BLE001 - reported to the client as a 500
        raise HTTPError(
            500, f"internal error: {type(e).__name__}: {e}", type="server_error"
        ) from None


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    async for out in outputs:
        if out.finished:
            return out
    raise HTTPError(500, "the engine ended the request without an output", type="server_error")


async def _lasts(handles: list[Handle]) -> list[RequestOutput]:
    return list(await asyncio.gather(*(_last(h.outputs()) for h in handles)))


class _Generation:
    """One admitted HTTP request (an engine request per prompt) until its end; `close` frees
    their blocks if it is cut short."""

    def __init__(self, server: _Server, request, handles: list[Handle]):
        self.server, self.request, self.handles = server, request, handles
        self.disconnect = asyncio.ensure_future(_wait_disconnect(request.receive))

    def close(self, reason: str = "abort") -> None:
        self.disconnect.cancel()
        self.server.n_in_flight -= len(self.handles)
        for handle in self.handles:
            if not handle.done:  # the client went away (or we failed) mid-request
                self.server.loop.abort(handle.request_id, reason)


class _EventStream:
    """An SSE response that stops, and aborts its request, the moment the client disconnects."""

    def __init__(self, gen: _Generation, events: AsyncIterator[str]):
        self.gen, self.events = gen, events

    async def __call__(self, scope, receive, send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        ]
        reason = "abort"  # what an unfinished request is counted as when it is cut short
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
        except SlowReader:
            reason = "slow_reader"
        except OSError:  # the socket closed under us
            pass
        finally:
            await self.events.aclose()
            self.gen.close(reason)


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
        tokenizer = self.llm.tokenizer
        prompts = completion_prompts(body, tokenizer)
        if len(prompts) > self.config.max_queue:  # would wait for a queue that never has room
            raise HTTPError(
                400,
                f"a batch of {len(prompts)} prompts is more than this server's queue of "
                f"{self.config.max_queue}",
                "prompt",
            )
        top_n = _field(body, "logprobs", "int")
        echo = _field(body, "echo", "bool", False)
        params = _sampling_params(
            body,
            _field(body, "max_tokens", "int"),
            top_n,
            self.config.max_tokens_limit,
            prompt_logprobs=top_n if echo else None,
        )
        so, so_field = _structured_outputs(body)
        if so is not None:
            params = dataclasses.replace(params, structured_outputs=so)
        submits = [
            _Submit(
                None, self._checked(_prepare(p, tokenizer), so, so_field), params, False, "prompt"
            )
            for p in prompts
        ]
        texts = None
        if echo:
            texts = [p if isinstance(p, str) else _decode(tokenizer, p) for p in prompts]
        fmt = _Formatter(False, self.config.model_name, tokenizer, top_n, params.n, texts)
        return await self._generate(request, body, submits, fmt)

    def _with_tools(self, plan, params):
        """params under the plan's tool_choice, and (plan, the model's call syntax) for the
        formatter; (params, None) without tools."""
        if plan is None:
            return params, None
        syntax = call_syntax(self.llm.tokenizer)
        try:
            return plan.sampling_params(params, syntax), (plan, syntax)
        except RequestError as e:
            raise HTTPError(400, str(e), "tool_choice") from None

    def _compile(self, so, field: str) -> None:
        """On the engine thread (it owns the compiler): a constraint it cannot serve is a 400."""
        try:
            self.llm.engine.grammar_compiler.matcher(so)
        except RequestError as e:
            raise HTTPError(400, str(e), field) from None

    def _checked(self, prepare, so, field: str | None):
        """prepare, after compiling the constraint so (if any) on the engine thread."""
        if so is None:
            return prepare

        def run():
            self._compile(so, field)
            return prepare()

        return run

    def _chat_prepare(self, messages, plan, so, so_field: str | None):
        """What the engine thread runs for a chat or a response: the output constraint and the
        tools' schemas compiled (a 400 naming the field that fails), the prompt rendered."""

        def prepare():
            if so is not None:
                self._compile(so, so_field)
            if plan is not None and structured.available():  # else: no engine to ask
                try:
                    plan.check_parameters(self.llm.engine.grammar_compiler.matcher)
                except RequestError as e:
                    raise HTTPError(400, str(e), "tools") from None
            return self.llm.chat_prompt(messages, tools=plan)

        return prepare

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
        so, so_field = _structured_outputs(body)
        if so is not None:
            params = dataclasses.replace(params, structured_outputs=so)
        plan = _tool_plan(body)
        params, tools = self._with_tools(plan, params)
        prepare = self._chat_prepare(messages, plan, so, so_field)
        submit = _Submit(None, prepare, params, max_tokens is None, "messages")
        fmt = _Formatter(
            True, self.config.model_name, self.llm.tokenizer, top_n, params.n, None, tools
        )
        return await self._generate(request, body, [submit], fmt)

    async def responses(self, request):
        body = await self._body(request)
        self._check_model(body)
        messages, params, plan = responses.parse(body, self.config.max_tokens_limit)
        if self.llm.tokenizer is None or not self.llm.tokenizer.has_chat_template:
            raise HTTPError(400, "this model has no chat template: use /v1/completions", "input")
        so = params.structured_outputs  # text.format's, before the tools' own
        params, tools = self._with_tools(plan, params)
        prepare = self._chat_prepare(messages, plan, so, "text")
        default_max = body.get("max_output_tokens") is None
        submit = _Submit(None, prepare, params, default_max, "input")
        fmt = responses.ResponseFormatter(self.config.model_name, body, params, tools)
        events = None
        if body.get("stream"):
            events = lambda handles: fmt.events(handles[0].outputs())
        return await self._run(
            request, [submit], fmt.id, events, lambda outs: fmt.response(outs[0])
        )

    async def admit(self, request, submits: list[_Submit], request_id: str) -> _Generation:
        """Queue one engine request per submit; returns once the engine has them all."""
        if self.n_in_flight + len(submits) > self.config.max_queue:
            raise HTTPError(
                503,
                f"{self.n_in_flight} requests in flight, the server's limit: try again later",
                type="server_error",
                code="queue_full",
            )
        loop = asyncio.get_running_loop()
        bound = self.config.max_pending_chunks
        handles = [Handle(f"{request_id}-{i}", loop, bound) for i in range(len(submits))]
        self.n_in_flight += len(handles)
        gen = _Generation(self, request, handles)
        try:
            for submit, handle in zip(submits, handles):
                self.loop.submit(dataclasses.replace(submit, handle=handle))
            for handle in handles:
                await _until(gen.disconnect, handle.accepted())
        except BaseException:
            gen.close()
            raise
        return gen

    async def _generate(self, request, body: dict, submits: list[_Submit], fmt: _Formatter):
        """A completions or chat request: OpenAI's SSE chunks, or its JSON."""
        events = None
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = lambda handles: _events(handles, fmt, usage)
        return await self._run(request, submits, fmt.id, events, fmt.response)

    async def _run(self, request, submits: list[_Submit], request_id: str, events, respond):
        """Admit the submits, then stream events(handles) when events is given, else answer
        with the JSON respond(final outputs)."""
        streaming = False
        try:
            gen = await self.admit(request, submits, request_id)
        except _ClientGone:
            return Response(status_code=499)
        try:
            if events is not None:
                streaming = True  # from here on the stream owns gen and closes it
                return _EventStream(gen, events(gen.handles))
            # every mailbox drained at once, so none fills while another is awaited
            finals = await _until(gen.disconnect, _lasts(gen.handles))
            return JSONResponse(respond(finals))
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it
        finally:
            if not streaming:
                gen.close()

    # vLLM's tokenizer endpoints: what lm-eval's remote tokenizer reads (no hub download) -------

    def _tokenizer(self):
        if self.llm.tokenizer is None:
            raise HTTPError(400, "this model has no tokenizer")
        return self.llm.tokenizer

    async def tokenizer_info(self, request):
        tok = self._tokenizer()
        return JSONResponse(
            {
                "tokenizer_class": "tinyserve",
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "pad_token": None,
                "chat_template": None,
                "model_max_length": self.llm.engine.model_config.context_len,
            }
        )

    async def tokenize(self, request):
        body = await self._body(request)
        text = _field(body, "prompt", "str")
        if not text:
            raise HTTPError(400, "'prompt' must be a non-empty string", "prompt")
        special = _field(body, "add_special_tokens", "bool", True)
        ids = self._tokenizer().encode(text, add_special_tokens=special)
        ctx = self.llm.engine.model_config.context_len
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": ctx})

    async def detokenize(self, request):
        body = await self._body(request)
        ids = _field(body, "tokens", "list")
        if ids is None or not all(_KINDS["int"][0](t) for t in ids):
            raise HTTPError(400, "'tokens' must be an array of token ids", "tokens")
        return JSONResponse({"prompt": self._tokenizer().decode(ids, skip_special_tokens=False)})


def _prepare(prompt: str | list[int], tokenizer):
    """What the engine thread runs to get a prompt's token ids."""
    if isinstance(prompt, str):
        return lambda: tokenizer.encode(prompt)
    return lambda: list(prompt)


def _decode(tokenizer, ids: list[int]) -> str:
    """Token ids' text as echoed: special tokens included, as the prompt had them."""
    return "" if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=False)


async def _error_response(request, exc):
    if isinstance(exc, HTTPError):
        return JSONResponse(exc.body(), exc.status)
    if not hasattr(exc, "status_code"):  # a bug of ours: still an OpenAI-shaped 500
        err = HTTPError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), 500)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(HTTPError(exc.status_code, exc.detail, code=code).body(), exc.status_code)


_TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


class _Guard:
    """Outermost ASGI layer: the API key on /v1/* and the tokenizer endpoints; a count of
    responses by path and status."""

    def __init__(self, app, server: _Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            # the server's send waits while the socket's buffer is full: a client that reads
            # nothing for the timeout is dropped (a stream's request is aborted on the way out)
            try:
                await asyncio.wait_for(send(message), self.server.config.slow_reader_timeout)
            except asyncio.TimeoutError:
                raise SlowReader(f"no read for {self.server.config.slow_reader_timeout:g} s")

        try:
            key = self.server.config.api_key
            if (
                key is not None
                and (scope["path"].startswith("/v1/") or scope["path"] in _TOKENIZER_PATHS)
                and not self._authorized(scope, key)
            ):
                err = HTTPError(
                    401,
                    "invalid or missing API key (send 'Authorization: Bearer <key>')",
                    code="invalid_api_key",
                )
                return await JSONResponse(err.body(), 401)(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        except SlowReader:
            pass  # the connection is dropped: nothing more can reach this client
        finally:
            self.server.metrics.count_http(path_label(scope["path"]), status)

    @staticmethod
    def _authorized(scope, key: str) -> bool:
        got = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        token = got[7:] if got[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), key.encode())


# (path, method, _Server handler): every route the server has
_ROUTES = [
    ("/v1/completions", "POST", "completions"),
    ("/v1/chat/completions", "POST", "chat"),
    ("/v1/responses", "POST", "responses"),
    ("/v1/models", "GET", "models"),
    ("/tokenize", "POST", "tokenize"),
    ("/detokenize", "POST", "detokenize"),
    ("/tokenizer_info", "GET", "tokenizer_info"),
    ("/health", "GET", "health"),
    ("/metrics", "GET", "prometheus"),
]
PATHS = frozenset(path for path, _, _ in _ROUTES)  # a response's path label; others are "other"


def path_label(path: str) -> str:
    """The `path` label of a response to path in tinyserve_http_requests_total."""
    return path if path in PATHS else "other"


_DEFAULT_CONFIG = ServerConfig()  # frozen: one shared default is safe


def create_app(llm, config: ServerConfig = _DEFAULT_CONFIG):
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
        routes=[Route(path, getattr(server, name), methods=[m]) for path, m, name in _ROUTES],
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
