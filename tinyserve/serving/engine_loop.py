"""The engine thread: the only one that touches the Engine, fed through a lock-guarded queue.

HTTP handlers `submit` and `abort`; the thread adds, aborts and steps while work remains, and
posts each request's outputs (or error) to its Handle, an asyncio queue on the handler's loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..outputs import RequestOutput
from ..sampling import SamplingParams
from .metrics import Metrics
from .protocol import HTTPError, ServerConfig


class Handle:
    """One request's mailbox: the engine thread posts, the handler's event loop awaits.

    At most `max_pending` outputs wait in it: past that the engine thread folds each new output
    into one held back (streamed deltas concatenate, so nothing is lost and the held one stays the
    size of the answer so far), and hands it over once the reader has taken one. So a client that
    stops reading costs one answer's worth of memory until the server's send times out on it.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, max_pending: int = 64):
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = False  # set by the handler once it has seen the end
        self.max_pending = max_pending
        self.lock = threading.Lock()  # n_pending moves on both threads
        self.n_pending = 0  # posted and not yet taken by the reader
        self.held: RequestOutput | None = None  # engine thread only: folded outputs

    def post(self, item) -> None:
        """From the engine thread: a list of prompt ids (accepted), a RequestOutput or an error."""
        if isinstance(item, RequestOutput):
            if self.held is not None:
                item, self.held = _fold(self.held, item), None
            with self.lock:
                full = self.n_pending >= self.max_pending
            if full and not item.finished:  # the end (and errors) always go through: one more
                self.held = item
                return
        with self.lock:
            self.n_pending += 1
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def _next(self):
        item = await self.queue.get()
        with self.lock:
            self.n_pending -= 1
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    async def accepted(self) -> list[int]:
        """The prompt's token ids once the engine has queued the request; raises its error."""
        return await self._next()

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        while True:
            item = await self._next()
            yield item
            if item.finished:
                self.done = True
                return


def _fold(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one: newer's totals, both steps' deltas."""
    deltas = {d.index: d for d in older.deltas}
    for d in newer.deltas:
        if (o := deltas.get(d.index)) is None:
            deltas[d.index] = d
            continue
        deltas[d.index] = dataclasses.replace(
            d,
            text=o.text + d.text,
            token_ids=[*o.token_ids, *d.token_ids],
            logprobs=None if o.logprobs is None else [*o.logprobs, *(d.logprobs or [])],
            tool_calls=d.tool_calls if d.tool_calls is not None else o.tool_calls,
        )
    prompt_logprobs = newer.prompt_logprobs
    if prompt_logprobs is None:
        prompt_logprobs = older.prompt_logprobs
    return dataclasses.replace(
        newer,
        deltas=sorted(deltas.values(), key=lambda d: d.index),
        prompt_logprobs=prompt_logprobs,
    )


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

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Stop a request and free its blocks; reason is what /metrics counts it as."""
        self._command((request_id, reason))

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
                    self._abort(*cmd)
            if self.engine.has_unfinished():
                self._step()
            self._publish()
        self._fail_all(
            HTTPError(503, "the server is shutting down", type="server_error", code="shutdown")
        )

    def _fail_all(self, err: HTTPError) -> None:
        """Post err to every live request and abort it in the engine."""
        for rid, handle in list(self.live.items()):
            handle.post(err)
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

    def _abort(self, rid: str, reason: str = "abort") -> None:
        if self.live.pop(rid, None) is not None:
            self.engine.abort(rid)
            self.metrics.count_finished(None, reason)

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a backend failure fails the requests in flight only
            self._fail_all(
                HTTPError(
                    500,
                    f"engine failure: {type(e).__name__}: {e}",
                    type="server_error",
                    code="engine_error",
                )
            )
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
        kv, scheduler = self.engine.kv_manager, self.engine.scheduler
        with self.metrics.lock:
            self.metrics.gauges.update(
                kv_blocks_in_use=kv.n_used_blocks,
                kv_blocks_total=kv.num_blocks,
                sequences_running=len(scheduler.running),
                sequences_waiting=len(scheduler.waiting),
                # what routers score (vLLM's names): requests, not sequences (n > 1 forks)
                num_requests_running=len({s.request_id for s in scheduler.running}),
                num_requests_waiting=len({s.request_id for s in scheduler.waiting}),
                kv_cache_usage_perc=kv.n_used_blocks / kv.num_blocks,
            )
            self.metrics.counters.update(
                prefix_cache_queries_total=kv.n_prefix_queries,
                prefix_cache_hits_total=kv.n_prefix_hits,
                spec_decode_num_draft_tokens_total=self.engine.n_draft_tokens,
                spec_decode_num_accepted_tokens_total=self.engine.n_accepted_tokens,
            )
