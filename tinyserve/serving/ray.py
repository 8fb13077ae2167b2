"""Replicas on Ray Serve: N engine processes behind one OpenAI-compatible ingress.

    pip install 'tinyserve[serve,ray]'
    tinyserve serve --model M --replicas 2              # starts a local Ray, stops it on exit
    tinyserve serve --model M --replicas 4 --ray-address ray://head:10001
    serve run tinyserve.serving.ray:build_app model=M replicas=2 num_cpus_per_replica=1

Each replica (`EngineReplica`) is one process with its own Engine, KV cache and engine thread:
the one-process server (`create_app`) run as it is, fed the HTTP requests the ingress forwards,
so every endpoint, limit, error, the API key and disconnect-aborts are the single server's own.
The ingress (`Ingress`) reads a request's body, picks a replica through `PrefixAffinityRouter`
(Ray Serve's request-router API) and streams the replica's ASGI messages back; a client that
hangs up cancels the call, which the replica sees as the disconnect. GET /metrics asks every
replica and joins their texts, each sample labelled with its replica.

Ray Serve LLM's PrefixCacheAffinityRouter was the first choice, but its module needs ray[llm]'s
dependencies (pyarrow, ...) and it reads text from vLLM's request objects, so this module keeps a
small router of its own on the public `ray.serve.request_router` interface.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .affinity import PrefixIndex, routing_text
from .metrics import merge
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


@serve.deployment
class EngineReplica:
    """One engine process: the one-process server's ASGI app, called with forwarded requests."""

    def __init__(self, llm_options: dict, server_options: dict):
        from ..api import LLM
        from .app import create_app

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.app = create_app(LLM(**llm_options), ServerConfig(**server_options))
        self.server = self.app.server_state
        self.server.metrics.labels = {"replica": self.replica_id}
        self.server.loop.start()  # what the app's lifespan does; Serve sends no lifespan here

    def __del__(self):
        self.server.loop.stop()

    async def forward(self, request: Forwarded) -> AsyncIterator[dict]:
        """The app's ASGI messages for request; cancelling this call is the client hanging up."""
        sent: asyncio.Queue = asyncio.Queue()
        hung_up = asyncio.Event()
        body = [{"type": "http.request", "body": request.body, "more_body": False}]

        async def receive() -> dict:
            if body:
                return body.pop()
            await hung_up.wait()
            return {"type": "http.disconnect"}

        app = asyncio.ensure_future(self.app(request.scope(), receive, sent.put))
        # a failing app has already answered 500 itself: retrieve its exception, then end
        app.add_done_callback(lambda t: (t.cancelled() or t.exception(), sent.put_nowait(None)))
        try:
            while (message := await sent.get()) is not None:
                yield message
        finally:
            hung_up.set()
            await asyncio.wait({app})  # the app aborts the request and frees its blocks

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
    """The raw ASGI app of the ingress: /metrics from every replica, the rest forwarded."""

    def __init__(self, engine, max_body_bytes: int):
        self.engine = engine
        self.stream = engine.options(stream=True)
        self.max_body_bytes = max_body_bytes

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
            return await self._respond(send, 200, "text/plain; version=0.0.4", await self.metrics())
        await self.forward(scope, receive, send)

    async def metrics(self) -> str:
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
        return merge(list(answered.values()))

    async def forward(self, scope, receive, send) -> None:
        # one byte over the limit is all the replica needs to answer 413 as one process does
        body = await _read_body(receive, self.max_body_bytes + 1)
        request = Forwarded(
            scope["method"],
            scope["path"],
            scope.get("query_string", b""),
            [tuple(h) for h in scope["headers"]],
            body,
            routing_text(body),
        )
        response = self.stream.forward.remote(request)
        disconnect = asyncio.ensure_future(_wait_disconnect(receive))
        started: dict | None = None  # the response's start message, once sent
        try:
            messages = response.__aiter__()
            while True:
                nxt = asyncio.ensure_future(messages.__anext__())
                await asyncio.wait({nxt, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():  # the client hung up: cancelling reaches the replica
                    nxt.cancel()
                    response.cancel()
                    return
                try:
                    message = nxt.result()
                except StopAsyncIteration:
                    return
                except Exception as e:  # noqa: BLE001 - the replica failed or died: a clean 5xx
                    return await self._replica_failed(send, started, e)
                if message["type"] == "http.response.start":
                    started = message
                await send(message)
        finally:
            disconnect.cancel()

    async def _replica_failed(self, send, started: dict | None, e: Exception) -> None:
        died = isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))
        what = "the replica serving this request died" if died else "the replica failed"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err = HTTPError(
            503 if died else 500,
            f"{what}: {type(e).__name__}: {first_line}"[:500],
            type="server_error",
            code="replica_unavailable" if died else "replica_error",
        )
        if started is None:
            return await self._respond(send, err.status, "application/json", err.body())
        if (dict(started["headers"]).get(b"content-type") or b"").startswith(b"text/event-stream"):
            # mid-stream, as one process reports a failure there: an error event, no [DONE]
            chunk = f"data: {json.dumps(err.body())}\n\n".encode()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _respond(send, status: int, content_type: str, content) -> None:
        body = (content if isinstance(content, str) else json.dumps(content)).encode()
        headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP entry: a light process that routes and relays; the replicas do the work."""

    def __init__(self, engine, max_body_bytes: int):
        self.asgi = _IngressApp(engine, max_body_bytes)

    def __serve_build_asgi_app__(self):
        return self.asgi


def application(args: argparse.Namespace):
    """The Serve application for `tinyserve serve`'s parsed flags (see serving/cli.py)."""
    from .cli import llm_options, server_config

    config = server_config(args)
    llm = llm_options(args)
    if llm["backend"] == "cpu" and "backend_options" not in llm:
        # each replica's kernels on the cores Ray gives it, not on every core of the node
        llm["backend_options"] = {"num_threads": max(1, int(args.num_cpus_per_replica))}
    actor = {"num_cpus": args.num_cpus_per_replica, "num_gpus": args.num_gpus_per_replica}
    engine = EngineReplica.options(
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
    # the ingress only waits on sockets: a CPU reservation would keep a replica off a core
    return Ingress.options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=args.replicas * (config.max_queue + _PROBE_ROOM),
    ).bind(engine, config.max_body_bytes)


def build_app(args: dict):
    """`serve run tinyserve.serving.ray:build_app model=M replicas=2 ...`: the flags of
    `tinyserve serve` by name (dashes or underscores), validated by its own parser."""
    from .cli import build_parser

    argv = []
    for name, value in args.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return application(build_parser().parse_args(argv))


def serve_replicas(args: argparse.Namespace) -> int:
    """`tinyserve serve --replicas N`: deploy on Ray (local unless --ray-address), serve until
    Ctrl-C or SIGTERM, then take the application down (and the local Ray with it)."""
    app = application(args)
    local = args.ray_address is None
    # a local Ray for this command only ("local": never one that `ray start` left running here,
    # whose Serve the shutdown below would take down): no dashboard, and it dies with us
    ray.init(address=args.ray_address or "local", include_dashboard=False if local else None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"log_level": "WARNING"})
        print(
            f"tinyserve: serving on http://{args.host}:{args.port}/v1 "
            f"({args.replicas} replicas on Ray{'' if local else ' at ' + args.ray_address})",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
    finally:
        if local:
            serve.shutdown()
        else:  # a shared cluster keeps its other applications
            serve.delete(APP_NAME)
        ray.shutdown()
    return 0
