"""Replicas on Ray Serve: N engine processes behind one OpenAI-compatible ingress.

    pip install 'tinyserve[serve,ray]'
    tinyserve serve --model M --replicas 2              # starts a local Ray, stops it on exit
    tinyserve serve --model M --replicas 4 --ray-address ray://head:10001
    serve run tinyserve.serving.ray:build_app model=M replicas=2 num_cpus_per_replica=1

Each replica (`EngineReplica`) is one process with its own Engine, KV cache and engine thread:
the one-process server (`create_app`) run as it is, fed the HTTP requests the ingress forwards,
so every endpoint, limit, error, the API key and disconnect-aborts are the single server's own.
The ingress (`_IngressApp`) reads a request's body, picks a replica through
`PrefixAffinityRouter` (Ray Serve's request-router API) and streams the replica's ASGI messages
back; a client that hangs up cancels the call, which the replica sees as the disconnect. GET
/metrics asks every replica and joins their texts, each sample labelled with its replica (the
ingress's own responses, its 503s and the scrapes, under replica="ingress").

A slow reader is bounded across the hop by credit: a replica sends at most --max-pending-chunks
messages of a stream that the ingress has not yet handed to its client (`Credit` says how many
it has), so its app's send waits as a socket's would; an ingress whose client takes nothing for
--slow-reader-timeout drops the client and says so, and the replica aborts the request as a
slow reader (its own timeout does the same when no credit comes). Ray Serve's HTTP proxy relays
a stream without such a bound (the ingress's send never waits behind it), so `tinyserve serve
--replicas` serves HTTP from its own process, the ingress over a handle to the replicas; the
`Ingress` deployment is for `serve run` (there, Serve's proxy holds what a slow client leaves).

Ray Serve LLM's PrefixCacheAffinityRouter was the first choice, but its module needs ray[llm]'s
dependencies (pyarrow, ...) and it reads text from vLLM's request objects, so this module keeps a
small router of its own on the public `ray.serve.request_router` interface.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .affinity import PrefixIndex, routing_text
from .app import SlowReader, path_label
from .metrics import Metrics, merge
from .protocol import HTTPError, ServerConfig

APP_NAME = "tinyserve"
# room above a replica's own --max-queue for /metrics and /health calls, so a full replica still
# answers them and itself refuses the request past its limit (a 503, as one process does)
_PROBE_ROOM = 8


@dataclass(frozen=True, slots=True)
class Forwarded:
    """One HTTP request, body read whole, as the ingress hands it to a replica."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prompt: str  # the text to route by ("" for no prompt)
    stream: str = ""  # the id that the ingress's credits for this response name

    def scope(self) -> dict:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "scheme": "http",
            "method": self.method,
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": self.headers,
            "client": None,
            "server": None,
        }


@dataclass(frozen=True, slots=True)
class Probe:
    """A question for every replica in turn: it goes to one not among `answered` while any is."""

    answered: frozenset[str]


@dataclass(frozen=True, slots=True)
class Credit:
    """To `replica`: the ingress has handed `taken` messages of `stream` to its client (room for
    that many more); `slow_reader`: the client took nothing for the timeout and is dropped."""

    replica: str
    stream: str
    taken: int
    slow_reader: bool = False


class PrefixAffinityRouter(RequestRouter):
    """Requests go to the replica that was sent the longest prefix of their prompt, unless it is
    saturated; a new prefix, or a saturated holder, gets the less loaded of two random replicas
    (power of two choices). Serve tries the ranks in order and, within one, the shortest queue.

    Serve may ship this class to the ingress by value, with module globals of its own, so the
    requests are told apart by their fields (as Serve LLM's router does), never by isinstance.
    """

    def initialize_state(self, saturated_at: int = 64, max_chunks: int = 100_000):
        self.saturated_at = saturated_at  # requests on a replica: its batch is full, more wait
        self.index = PrefixIndex(max_chunks)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        request = pending_request.args[0] if pending_request and pending_request.args else None
        target = getattr(request, "replica", None)
        if target is not None:  # a Credit: to its replica, full or not (any, when it is gone)
            mine = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            return [mine or candidate_replicas]
        answered = getattr(request, "answered", None)
        if answered is not None:  # a Probe
            fresh = [r for r in candidate_replicas if r.replica_id.unique_id not in answered]
            return [fresh or candidate_replicas]
        two = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        prompt = getattr(request, "prompt", "")  # a Forwarded request
        if prompt:
            live = {r.replica_id.unique_id: r for r in candidate_replicas}
            holders = [live[i] for i in self.index.match(prompt, live)]
            unsaturated = [r for r in holders if self._queue_len(r) < self.saturated_at]
            if unsaturated:  # only them: a slow answer to Serve's queue probe is no reason to
                return [unsaturated]  # leave; when they fill up, the next try takes two random
        return [two]

    def _queue_len(self, replica: RunningReplica) -> int:
        # unknown (not probed lately): assume it has room; Serve probes it before sending
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result):
        prompt = getattr(pending_request.args[0], "prompt", "") if pending_request.args else ""
        if prompt:
            self.index.record(prompt, replica_id.unique_id)


class _Window:
    """One relayed response: messages the replica sent and those the ingress says it handed on."""

    def __init__(self):
        self.sent = self.taken = 0
        self.moved = asyncio.Event()  # a credit came, or the stream ended
        self.hung_up = asyncio.Event()  # what the app's receive reports as the disconnect
        self.failure: OSError | None = None  # what the app's send raises once the client is gone


class _Relay:
    """The one-process server's ASGI app, fed forwarded requests, each response held to `bound`
    messages ahead of what the ingress has handed on (a credit window). No Serve in it: the
    EngineReplica deployment wraps it."""

    def __init__(self, app, replica_id: str, bound: int):
        self.app, self.replica_id, self.bound = app, replica_id, bound
        self.windows: dict[str, _Window] = {}

    async def forward(self, request: Forwarded) -> AsyncIterator[dict]:
        """This replica's id, then the app's ASGI messages for request; cancelling this call is
        the client hanging up."""
        window = self.windows[request.stream] = _Window()
        sent: asyncio.Queue = asyncio.Queue()  # at most `bound` messages: the window holds them
        body = [{"type": "http.request", "body": request.body, "more_body": False}]

        async def receive() -> dict:
            if body:
                return body.pop()
            await window.hung_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            # as a socket's send waits while its buffer is full: the app's own slow-reader
            # timeout (around this call) drops a client whose ingress sends no credit
            while window.sent - window.taken >= self.bound and window.failure is None:
                window.moved.clear()
                await window.moved.wait()
            if window.failure is not None:
                raise window.failure
            window.sent += 1
            sent.put_nowait(message)

        app = asyncio.ensure_future(self.app(request.scope(), receive, send))
        # a failing app has already answered 500 itself: retrieve its exception, then end
        app.add_done_callback(lambda t: (t.cancelled() or t.exception(), sent.put_nowait(None)))
        try:
            yield {"type": "tinyserve.replica", "replica": self.replica_id}
            while (message := await sent.get()) is not None:
                yield message
        finally:
            self._end(window, ConnectionResetError("the client hung up"))
            await asyncio.wait({app})  # the app aborts the request and frees its blocks
            del self.windows[request.stream]

    def credit(self, credit: Credit) -> None:
        window = self.windows.get(credit.stream)
        if window is None:  # ended already
            return
        window.taken = max(window.taken, credit.taken)  # credits may overtake one another
        if credit.slow_reader:
            self._end(window, SlowReader("the client took nothing for the slow-reader timeout"))
        window.moved.set()

    @staticmethod
    def _end(window: _Window, failure: OSError) -> None:
        """The client is gone: the app's next (or waiting) send raises failure, receive says so."""
        if window.failure is None:
            window.failure = failure
        window.hung_up.set()
        window.moved.set()


@serve.deployment
class EngineReplica:
    """One engine process: the one-process server's ASGI app, called with forwarded requests."""

    def __init__(self, llm_options: dict, server_options: dict):
        from ..api import LLM
        from .app import create_app

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        config = ServerConfig(**server_options)
        app = create_app(LLM(**llm_options), config)
        self.server = app.server_state
        self.server.metrics.labels = {"replica": self.replica_id}
        self.server.loop.start()  # what the app's lifespan does; Serve sends no lifespan here
        self.relay = _Relay(app, self.replica_id, config.max_pending_chunks)

    def __del__(self):
        self.server.loop.stop()

    async def forward(self, request: Forwarded) -> AsyncIterator[dict]:
        async for message in self.relay.forward(request):
            yield message

    async def credit(self, credit: Credit) -> None:
        """The ingress has handed on more of a stream (async: on the loop that forwards it)."""
        self.relay.credit(credit)

    def metrics(self, probe: Probe) -> tuple[str, str]:
        """(replica id, its Prometheus text); the info gauge says which process it is."""
        info = (
            "# HELP tinyserve_replica_info The process serving a replica, to find it on its node.\n"
            "# TYPE tinyserve_replica_info gauge\n"
            f'tinyserve_replica_info{{replica="{self.replica_id}",pid="{os.getpid()}"}} 1\n'
        )
        return self.replica_id, self.server.metrics.render() + info


async def _read_body(receive, limit: int) -> bytes:
    """At most `limit` bytes of the body: enough for the replica to tell it is too large."""
    body = bytearray()
    while len(body) < limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    return bytes(body[:limit])


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _IngressApp:
    """The raw ASGI app of the ingress: /metrics from every replica, the rest forwarded.

    `engine` is a handle to the EngineReplica deployment. The responses it answers itself (a
    replica that died or failed, /metrics) it counts as one process counts every response."""

    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.stream = engine.options(stream=True)
        self.config = config
        self.credit_every = max(1, config.max_pending_chunks // 2)
        self.metrics = Metrics({"replica": "ingress"})
        self.credits: set[asyncio.Task] = set()  # in flight (a task nobody holds may vanish)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":  # nothing to start or stop: the replicas own the engines
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/metrics" and scope["method"] == "GET":
            return await self.scrape(scope, send)
        await self.forward(scope, receive, send)

    async def scrape(self, scope, send) -> None:
        try:
            texts = await self.gather_metrics()
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            err = _unavailable("no replica answered", e)
            return await self._respond(scope, send, err.status, "application/json", err.body())
        content = "text/plain; version=0.0.4"
        text = merge([*texts, self.metrics.render_http()])  # the ingress's own responses last
        await self._respond(scope, send, 200, content, text)

    async def gather_metrics(self) -> list[str]:
        """Every live replica's Prometheus text."""
        answered: dict[str, str] = {}
        while True:  # a replica answering twice means every live one has answered
            try:
                replica, text = await self.engine.metrics.remote(Probe(frozenset(answered)))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if not answered:
                    raise
                break  # one died mid-scrape: the others' samples, as a scraper misses a target
            if replica in answered:
                break
            answered[replica] = text
        return list(answered.values())

    async def forward(self, scope, receive, send) -> None:
        # one byte over the limit is all the replica needs to answer 413 as one process does
        body = await _read_body(receive, self.config.max_body_bytes + 1)
        request = Forwarded(
            scope["method"],
            scope["path"],
            scope.get("query_string", b""),
            [tuple(h) for h in scope["headers"]],
            body,
            routing_text(body),
            uuid.uuid4().hex,
        )
        response = self.stream.forward.remote(request)
        disconnect = asyncio.ensure_future(_wait_disconnect(receive))
        started: dict | None = None  # the response's start message, once sent
        replica, taken, credited = "", 0, 0
        try:
            messages = response.__aiter__()
            while True:
                nxt = asyncio.ensure_future(messages.__anext__())
                await asyncio.wait({nxt, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():  # the client hung up: cancelling reaches the replica
                    nxt.add_done_callback(lambda t: t.cancelled() or t.exception())  # Serve's
                    nxt.cancel()
                    response.cancel()
                    return
                try:
                    message = nxt.result()
                except StopAsyncIteration:
                    return
                except Exception as e:  # noqa: BLE001 - the replica failed or died: a clean 5xx
                    return await self._replica_failed(scope, send, started, e)
                if message["type"] == "tinyserve.replica":  # which replica to credit
                    replica = message["replica"]
                    continue
                if message["type"] == "http.response.start":
                    started = message
                try:  # the next message is not asked for until this one is handed on
                    await asyncio.wait_for(send(message), self.config.slow_reader_timeout)
                except asyncio.TimeoutError:  # drop the client, as one process does
                    self._credit(Credit(replica, request.stream, taken, slow_reader=True))
                    return await self._wind_down(messages, response)
                taken += 1
                if taken - credited >= self.credit_every:
                    self._credit(Credit(replica, request.stream, taken))
                    credited = taken
        finally:
            disconnect.cancel()

    def _credit(self, credit: Credit) -> None:
        async def send() -> None:
            with contextlib.suppress(Exception):  # a replica gone: its stream fails anyway
                await self.engine.credit.remote(credit)

        task = asyncio.ensure_future(send())
        self.credits.add(task)
        task.add_done_callback(self.credits.discard)

    async def _wind_down(self, messages, response) -> None:
        """After a slow reader's credit: what the replica still sends while its request aborts
        (a window at most), dropped; the call cancelled if that takes a timeout."""

        async def drain() -> None:
            async for _ in messages:
                pass

        with contextlib.suppress(Exception):
            await asyncio.wait_for(drain(), self.config.slow_reader_timeout)
        response.cancel()

    async def _replica_failed(self, scope, send, started: dict | None, e: Exception) -> None:
        died = isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))
        if died:
            err = _unavailable("the replica serving this request died", e)
        else:
            msg = _what("the replica failed", e)
            err = HTTPError(500, msg, type="server_error", code="replica_error")
        if started is None:
            return await self._respond(scope, send, err.status, "application/json", err.body())
        if (dict(started["headers"]).get(b"content-type") or b"").startswith(b"text/event-stream"):
            # mid-stream, as one process reports a failure there: an error event, no [DONE]
            chunk = f"data: {json.dumps(err.body())}\n\n".encode()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _respond(self, scope, send, status: int, content_type: str, content) -> None:
        """A response of the ingress's own, counted under its path as one process counts it."""
        body = (content if isinstance(content, str) else json.dumps(content)).encode()
        headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            self.metrics.count_http(path_label(scope["path"]), status)


def _what(what: str, e: Exception) -> str:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{what}: {type(e).__name__}: {first_line}"[:500]


def _unavailable(what: str, e: Exception) -> HTTPError:
    return HTTPError(503, _what(what, e), type="server_error", code="replica_unavailable")


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP entry for `serve run`: a light process that routes and relays (behind Serve's
    HTTP proxy); the replicas do the work."""

    def __init__(self, engine, server_options: dict):
        self.asgi = _IngressApp(engine, ServerConfig(**server_options))

    def __serve_build_asgi_app__(self):
        return self.asgi


def engines(args: argparse.Namespace):
    """The EngineReplica deployment for `tinyserve serve`'s parsed flags (see serving/cli.py)."""
    from .cli import llm_options, server_config

    config = server_config(args)
    llm = llm_options(args)
    if llm["backend"] == "cpu" and "backend_options" not in llm:
        # each replica's kernels on the cores Ray gives it, not on every core of the node
        llm["backend_options"] = {"num_threads": max(1, int(args.num_cpus_per_replica))}
    actor = {"num_cpus": args.num_cpus_per_replica, "num_gpus": args.num_gpus_per_replica}
    return EngineReplica.options(
        num_replicas=args.replicas,
        ray_actor_options=actor,
        max_ongoing_requests=config.max_queue + _PROBE_ROOM,
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            # saturated: a full batch, more would wait (or the most Serve sends it at once)
            request_router_kwargs={
                "saturated_at": min(args.max_num_seqs, config.max_queue + _PROBE_ROOM)
            },
        ),
    ).bind(llm, asdict(config))


def application(args: argparse.Namespace):
    """The Serve application, replicas and an HTTP ingress, for `tinyserve serve`'s flags."""
    from .cli import server_config

    config = server_config(args)
    # the ingress only waits on sockets: a CPU reservation would keep a replica off a core
    return Ingress.options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=args.replicas * (config.max_queue + _PROBE_ROOM),
    ).bind(engines(args), asdict(config))


def build_app(args: dict):
    """`serve run tinyserve.serving.ray:build_app model=M replicas=2 ...`: the flags of
    `tinyserve serve` by name (dashes or underscores), validated by its own parser."""
    from .cli import build_parser

    argv = []
    for name, value in args.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return application(build_parser().parse_args(argv))


def serve_replicas(args: argparse.Namespace) -> int:
    """`tinyserve serve --replicas N`: deploy the replicas on Ray (local unless --ray-address),
    serve HTTP here (the ingress, over a handle to them) until Ctrl-C or SIGTERM, then take the
    application down (and the local Ray with it)."""
    import uvicorn

    from .cli import server_config

    config = server_config(args)
    local = args.ray_address is None
    # a local Ray for this command only ("local": never one that `ray start` left running here,
    # whose Serve the shutdown below would take down): no dashboard, and it dies with us
    ray.init(address=args.ray_address or "local", include_dashboard=False if local else None)
    stopped = []  # a signal before uvicorn runs; uvicorn raises its own again once it is done
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.append(True))
    try:
        serve.start(proxy_location="Disabled")  # no Serve proxy: this process is the ingress
        handle = serve.run(
            engines(args), name=APP_NAME, route_prefix=None, logging_config={"log_level": "WARNING"}
        )
        app = _IngressApp(handle, config)
        server = uvicorn.Server(
            uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
        )

        async def run() -> None:
            serving = asyncio.ensure_future(server.serve())
            while not server.started and not serving.done():
                server.should_exit = server.should_exit or bool(stopped)
                await asyncio.sleep(0.05)
            if server.started:  # listening: the line tells scripts it is ready
                where = "" if local else " at " + args.ray_address
                print(
                    f"tinyserve: serving on http://{args.host}:{args.port}/v1 "
                    f"({args.replicas} replicas on Ray{where})",
                    file=sys.stderr,
                    flush=True,
                )
            await serving

        if not stopped:
            asyncio.run(run())
    finally:
        if local:
            serve.shutdown()
        else:  # a shared cluster keeps its other applications
            serve.delete(APP_NAME)
        ray.shutdown()
    return 0
