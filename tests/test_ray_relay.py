"""The Ray path's pieces without a Ray cluster: the router's choice, the credit-bounded relay
from a replica to a slow client, and the responses the ingress answers itself.

Oracles: Ray Serve's own pick within the ranks the router returns (its shortest-queue choice
over the queue lengths replicas report); the one-process server's own text, finish reasons and
KV blocks for a request relayed through `_Relay` and `_IngressApp`, with a fake hop that runs
the replica's stream ahead of the ingress as Ray's does (nothing makes it wait); the ingress's
/metrics counting what it answered. Timeouts only stop a hang from hanging the suite.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
ray = pytest.importorskip("ray")

from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve.request_router import PendingRequest

from tinyserve import LLM, SamplingParams
from tinyserve.serving import ServerConfig, create_app
from tinyserve.serving import ray as ts_ray
from tinyserve.serving.ray import Credit, Forwarded, PrefixAffinityRouter, _IngressApp, _Relay

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "smollm2"
DEPLOYMENT = DeploymentID(name="EngineReplica", app_name="tinyserve")
DOC = "Harbour log: " + "".join(f"pier {i} holds {3 * i} boats. " for i in range(5))


# -- the router ---------------------------------------------------------------------------------
class FakeReplica:
    """What the router sees of a replica: its id, its limit, the queue length it reports."""

    def __init__(self, name: str, queue_len: int, max_ongoing: int = 72):
        self.replica_id = ReplicaID(name, DEPLOYMENT)
        self.queue_len, self.max_ongoing_requests = queue_len, max_ongoing

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


def _forwarded(prompt: str) -> Forwarded:
    return Forwarded("POST", "/v1/completions", b"", [], b"{}", prompt, "s")


async def _route(router: PrefixAffinityRouter, request) -> str:
    """The replica Serve sends request to: the first rank with one that has room, within it the
    shortest queue (Serve's `_select_from_candidate_replicas`)."""
    pending = PendingRequest(args=[request], kwargs={}, metadata=RequestMetadata("r", "r"))
    for rank in await router.choose_replicas(list(router.curr_replicas.values()), pending):
        if rank and (chosen := await router._select_from_candidate_replicas(rank, 0)):
            router.on_request_routed(pending, chosen.replica_id, None)
            return chosen.replica_id.unique_id
    raise AssertionError("no replica chosen")


def _router(loads: dict[str, int], saturated_at: int = 4) -> PrefixAffinityRouter:
    router = PrefixAffinityRouter(
        DEPLOYMENT, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True
    )
    router.initialize_state(saturated_at=saturated_at)
    replicas = [FakeReplica(name, n) for name, n in loads.items()]
    router.update_replicas(replicas)
    for r in replicas:  # as replicas report their queues to the router
        router.on_new_queue_len_info(r.replica_id, r.queue_len)
    return router


def _set_load(router, name: str, n: int) -> None:
    replica = router.curr_replicas[ReplicaID(name, DEPLOYMENT)]
    replica.queue_len = n
    router.on_new_queue_len_info(replica.replica_id, n)


def test_a_saturated_holder_of_the_prefix_loses_the_request_to_the_less_loaded_of_two(
    monkeypatch,
):
    sampled: list[list[str]] = []
    sample = random.sample

    def recording_sample(population, k):
        picked = sample(population, k)
        sampled.append([r.replica_id.unique_id for r in picked])
        return picked

    monkeypatch.setattr(ts_ray.random, "sample", recording_sample)

    async def run() -> None:
        router = _router({"a": 0, "b": 0, "c": 0})
        holder = await _route(router, _forwarded(DOC + "q0"))  # new prefix: two random, tied
        for i in range(1, 4):  # busy but below saturation: the holder keeps the prefix
            _set_load(router, holder, 3)
            assert await _route(router, _forwarded(DOC + f"q{i}")) == holder
        others = sorted({"a", "b", "c"} - {holder})
        _set_load(router, holder, 4)  # saturated (still below Serve's own limit of 72)
        _set_load(router, others[0], 2)
        _set_load(router, others[1], 1)
        for i in range(30):
            sampled.clear()
            chosen = await _route(router, _forwarded(DOC + f"r{i}"))
            loads = {holder: 4, others[0]: 2, others[1]: 1}
            assert chosen != holder
            assert chosen == min(sampled[-1], key=loads.get), (sampled[-1], chosen)
            # the chosen replica now holds the prefix too: keep the loads as set
            router.index.holders.clear()
            router.index.record(DOC, holder)
        # unsaturated again: back to the holder, whatever the others' loads
        _set_load(router, holder, 3)
        _set_load(router, others[1], 0)
        assert await _route(router, _forwarded(DOC + "back")) == holder

    asyncio.run(run())


def test_a_new_prefix_goes_to_the_less_loaded_of_two_and_a_credit_to_its_replica():
    async def run() -> None:
        router = _router({"a": 3, "b": 1})
        assert await _route(router, _forwarded("a prompt with no chunk held anywhere " * 3)) == "b"
        for target in ("a", "b"):  # a credit goes to its stream's replica, loaded or not
            assert await _route(router, Credit(target, "s", 1)) == target
        assert await _route(router, Credit("gone", "s", 1)) in ("a", "b")  # ignored there

    asyncio.run(run())


# -- the relay ----------------------------------------------------------------------------------
class _Hop:
    """A replica's stream as Ray relays it: pumped into the ingress's queue as fast as the
    replica yields (no backpressure), cancelled as Serve cancels a call."""

    def __init__(self, messages):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.produced = 0  # ASGI messages the replica yielded
        self.pump = asyncio.ensure_future(self._pump(messages))

    async def _pump(self, messages) -> None:
        try:
            async for message in messages:
                self.produced += message["type"].startswith("http.")
                self.queue.put_nowait(("message", message))
            self.queue.put_nowait(("end", None))
        except Exception as e:  # noqa: BLE001 - handed to the ingress as Ray does
            self.queue.put_nowait(("error", e))
        finally:
            await messages.aclose()

    def __aiter__(self):
        return self

    async def __anext__(self):
        kind, value = await self.queue.get()
        if kind == "end":
            raise StopAsyncIteration
        if kind == "error":
            raise value
        return value

    def cancel(self) -> None:
        self.pump.cancel()


class _Method:
    def __init__(self, fn):
        self.remote = fn


class FakeEngine:
    """The EngineReplica deployment's handle, over one in-process replica."""

    def __init__(self, relay: _Relay | None, replica_metrics=None):
        self.relay, self.hops = relay, []

        def forward(request):
            self.hops.append(_Hop(self.relay.forward(request)))
            return self.hops[-1]

        async def credit(c: Credit):
            await asyncio.sleep(0.001)  # a hop away
            self.relay.credit(c)

        async def metrics(probe):
            return replica_metrics(probe)

        self.forward, self.credit, self.metrics = (
            _Method(forward),
            _Method(credit),
            _Method(metrics),
        )

    def options(self, stream: bool):
        return self


class Client:
    """One HTTP request through the ingress's ASGI app; `reads`: whether it takes what is sent."""

    def __init__(self, body: dict, reads: bool, path: str = "/v1/completions"):
        self.body, self.reads, self.path = body, reads, path
        self.chunks: list[bytes] = []
        self.status = None
        self.delivered = 0  # messages this client took

    async def receive(self):
        if self.body is not None:
            body, self.body = json.dumps(self.body).encode(), None
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # it never hangs up

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message.get("body"):
            if not self.reads and self.chunks:  # took the first chunk, then nothing
                await asyncio.Event().wait()
            self.chunks.append(message["body"])
        self.delivered += 1

    async def run(self, app):
        scope = {
            "type": "http",
            "method": "POST" if self.path != "/metrics" else "GET",
            "path": self.path,
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
        }
        await app(scope, self.receive, self.send)


BOUND = 4


@pytest.fixture(scope="module")
def llm():
    return LLM(str(FIXTURE), backend="numpy")


def test_a_slow_reader_is_bounded_and_aborted_through_the_relay(llm, monkeypatch):
    step = llm.engine.step

    def slow_step():  # a step of a real model: the request still runs when the client stalls
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(llm.engine, "step", slow_step)
    # the replica's own timeout is the backstop: here the ingress's drop is what ends it
    config = ServerConfig(model_name="tiny", max_pending_chunks=BOUND, slow_reader_timeout=30)
    replica_app = create_app(llm, config)
    server = replica_app.server_state
    engine = FakeEngine(_Relay(replica_app, "r0", BOUND))
    ingress = _IngressApp(engine, dataclasses.replace(config, slow_reader_timeout=0.2))
    body = {"prompt": "Story 3: the", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    readers = [Client({**body, "stream": True}, reads=True), Client(body, reads=True)]
    slow = Client({**body, "stream": True, "n": 2}, reads=False)
    ahead: list[int] = []  # messages the replica sent and the slow client has not taken

    async def watch():
        while True:
            if engine.hops and slow.status is not None:
                ahead.append(engine.hops[-1].produced - slow.delivered)
            await asyncio.sleep(0.002)

    async def drive():
        watcher = asyncio.ensure_future(watch())
        await asyncio.wait_for(slow.run(ingress), 60)  # the ingress drops it
        watcher.cancel()
        await asyncio.wait_for(asyncio.gather(*(c.run(ingress) for c in readers)), 60)
        for _ in range(500):  # the abort reaches the engine thread
            if not server.loop.engine.has_unfinished() and not server.loop.live:
                break
            await asyncio.sleep(0.01)

    server.loop.start()
    try:
        asyncio.run(drive())
    finally:
        server.loop.stop()
    assert slow.status == 200 and len(slow.chunks) == 1
    assert server.metrics.finished.get("slow_reader") == 1, server.metrics.finished
    assert len(ahead) > 10 and max(ahead) <= BOUND, max(ahead)
    assert server.loop.engine.kv_manager.n_used_blocks == 0 and server.n_in_flight == 0
    assert not engine.relay.windows
    # a client that reads gets what one process sends, relayed in full
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    text = llm.generate("Story 3: the", params)[0].outputs[0].text
    events = [e.removeprefix(b"data: ") for e in b"".join(readers[0].chunks).split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    streamed = [c["text"] for e in events[:-1] for c in json.loads(e)["choices"]]
    assert "".join(streamed) == text
    assert json.loads(b"".join(readers[1].chunks))["choices"][0]["text"] == text
    assert server.metrics.finished.get("length") == 2


def test_the_ingress_counts_the_responses_it_answers_itself():
    died = ray.exceptions.ActorUnavailableError("gone", None)

    def dead_stream(request):
        async def fail():
            raise died
            yield

        return _Hop(fail())

    replica_text = (
        "# HELP tinyserve_http_requests_total HTTP responses by path and status.\n"
        "# TYPE tinyserve_http_requests_total counter\n"
        'tinyserve_http_requests_total{replica="r0",path="/v1/completions",status="200"} 5\n'
    )
    up = [True]

    def replica_metrics(probe):
        if not up[0]:
            raise died
        return "r0", replica_text

    engine = FakeEngine(None, replica_metrics)
    engine.forward = _Method(dead_stream)
    ingress = _IngressApp(engine, ServerConfig())

    def sample(text: str, path: str, status: int) -> float | None:
        want = f'tinyserve_http_requests_total{{replica="ingress",path="{path}",status="{status}"}}'
        lines = [line for line in text.splitlines() if line.startswith(want + " ")]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else None

    async def drive():
        clients = [Client({"prompt": "x"}, reads=True) for _ in range(3)]
        for c in clients:
            await c.run(ingress)
        assert [c.status for c in clients] == [503] * 3
        err = json.loads(clients[0].chunks[0])["error"]
        assert err["code"] == "replica_unavailable" and err["type"] == "server_error"
        first, second = Client(None, True, "/metrics"), Client(None, True, "/metrics")
        await first.run(ingress)
        await second.run(ingress)
        up[0] = False
        down = Client(None, True, "/metrics")
        await down.run(ingress)
        up[0] = True
        third = Client(None, True, "/metrics")
        await third.run(ingress)
        return [b"".join(c.chunks).decode() for c in (first, second, third)], down

    (first, second, third), down = asyncio.run(drive())
    assert sample(first, "/v1/completions", 503) == 3
    assert sample(first, "/metrics", 200) is None  # counted once it is sent, as one process does
    assert sample(second, "/metrics", 200) == 1
    assert down.status == 503
    assert sample(third, "/metrics", 503) == 1 and sample(third, "/metrics", 200) == 2
    # one HELP / TYPE for the family, the replica's samples and the ingress's
    assert third.count("# TYPE tinyserve_http_requests_total") == 1
    assert 'replica="r0",path="/v1/completions",status="200"} 5' in third
