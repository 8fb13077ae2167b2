"""Slow readers: each request's queue of outgoing chunks is bounded and a client that stops
reading is aborted, its KV blocks freed.

Oracles: the deltas a bounded mailbox hands over join to the same text, ids and logprobs as the
unbounded stream; a few hundred requests driven straight through the ASGI app (clients that read, read
slowly, never read, hang up mid-stream or before the answer) end with 0 KV blocks in use, no
request in flight, and no mailbox ever holding more than its bound. No timing is asserted: the
deadline only stops a hang from hanging the suite.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")

from tinyserve import LLM, SamplingParams
from tinyserve.engine import Engine
from tinyserve.outputs import RequestOutput
from tinyserve.serving import ServerConfig, create_app
from tinyserve.serving.engine_loop import Handle

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "smollm2"
BOUND = 3


def _stream_outputs(n_tokens: int) -> list[RequestOutput]:
    llm = LLM(str(FIXTURE), backend="numpy")
    params = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True, logprobs=2)
    engine = llm.engine
    engine.add_request(llm.tokenizer.encode("hello world"), params, "r")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def test_a_full_mailbox_folds_outputs_and_loses_nothing():
    outs = _stream_outputs(20)
    assert len(outs) == 20

    async def run():
        handle = Handle("r", asyncio.get_running_loop(), max_pending=BOUND)
        for out in outs:  # the engine posts every step; nobody reads
            handle.post(out)
        await asyncio.sleep(0)  # let the posts land
        assert handle.queue.qsize() == BOUND + 1, "the bound, plus the end folded into one"
        return [out async for out in handle.outputs()]

    got = asyncio.run(run())
    assert got[-1].finished and got[-1].outputs == outs[-1].outputs

    def joined(xs, field):
        return [x for o in xs for x in getattr(o.deltas[0], field)]

    assert "".join(o.deltas[0].text for o in got) == "".join(o.deltas[0].text for o in outs)
    assert joined(got, "token_ids") == joined(outs, "token_ids") == outs[-1].outputs[0].token_ids
    assert joined(got, "logprobs") == joined(outs, "logprobs")


@pytest.mark.parametrize("field, value", [("max_pending_chunks", 0), ("slow_reader_timeout", 0.0)])
def test_the_bound_and_the_timeout_are_checked(field, value, capsys):
    from tinyserve.serving import main

    with pytest.raises(ValueError, match=field):
        ServerConfig(**{field: value})
    assert main(["--" + field.replace("_", "-"), str(value), "--model", str(FIXTURE)]) == 2
    assert field in capsys.readouterr().err


# -- a few hundred requests through the ASGI app ------------------------------------------------
class _Client:
    """One HTTP request driven through the ASGI app: how it reads is `kind`."""

    def __init__(self, kind: str, body: dict, rng: random.Random):
        self.kind, self.body, self.rng = kind, body, rng
        self.hang_up = asyncio.Event()
        self.chunks: list[bytes] = []
        self.status = None
        self.cut_after = rng.randint(1, 4)

    async def receive(self):
        if self.body is not None:
            body, self.body = json.dumps(self.body).encode(), None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.kind == "hangup-early":
                self.hang_up.set()
            return
        if not message.get("body"):
            return
        if self.kind == "never-reads":
            await asyncio.Event().wait()  # the socket buffer is full and stays full
        if self.kind == "slow":
            await asyncio.sleep(self.rng.random() * 0.01)
        self.chunks.append(message["body"])
        if self.kind == "hangup" and len(self.chunks) >= self.cut_after:
            self.hang_up.set()

    async def run(self, app):
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        await app(scope, self.receive, self.send)


@pytest.mark.slow
def test_hundreds_of_requests_with_slow_readers_and_hang_ups_free_every_block(monkeypatch):
    high_water = []
    post = Handle.post

    def recording_post(self, item):
        post(self, item)
        high_water.append(self.n_pending)

    monkeypatch.setattr(Handle, "post", recording_post)
    # a step of a real model takes milliseconds: without that the tiny fixture finishes a
    # never-read request within the slow-reader timeout, leaving nothing to abort
    step = Engine.step

    def real_model_step(self):
        time.sleep(0.005)
        return step(self)

    monkeypatch.setattr(Engine, "step", real_model_step)
    config = ServerConfig(
        model_name="tiny", max_tokens_limit=64, max_pending_chunks=BOUND, slow_reader_timeout=0.2
    )
    app = create_app(LLM(str(FIXTURE), backend="numpy", max_num_seqs=16), config)
    server = app.server_state
    rng = random.Random(0)
    kinds = ["reads", "slow", "never-reads", "hangup", "hangup-early"]
    clients = []
    for i in range(300):
        body = {
            "model": "tiny",
            "prompt": f"request {i}: " + " ".join(rng.choice("abcdefg") for _ in range(8)),
            "max_tokens": rng.randint(1, 48),
            "temperature": 0,
            "ignore_eos": True,
            "stream": rng.random() < 0.7,
        }
        clients.append(_Client(rng.choice(kinds), body, rng))

    async def drive():
        for k in range(0, len(clients), 30):  # 30 connections at a time
            batch = [asyncio.ensure_future(c.run(app)) for c in clients[k : k + 30]]
            done, pending = await asyncio.wait(batch, timeout=120)
            assert not pending, f"{len(pending)} requests never ended"
            for task in done:
                task.result()

    server.loop.start()
    try:
        asyncio.run(drive())
        engine = server.loop.engine
        for _ in range(1000):  # the last aborts reach the engine thread
            if not engine.has_unfinished() and not server.loop.live:
                break
            asyncio.run(asyncio.sleep(0.01))
    finally:
        server.loop.stop()
    assert engine.kv_manager.n_used_blocks == 0
    assert server.n_in_flight == 0 and not server.loop.live
    assert max(high_water) <= BOUND + 1, "a mailbox held more than its bound (+ the end)"
    readers = [c for c in clients if c.kind in ("reads", "slow") and c.body is None]
    assert all(c.status == 200 for c in readers)
    streamed = [c for c in readers if b"[DONE]" in b"".join(c.chunks)]
    assert len(streamed) > 50
    assert sum(server.metrics.finished.values()) == len(clients), "each ends once, and is counted"
    never = [c for c in clients if c.kind == "never-reads" and c.chunks == []]
    assert len(never) > 30 and server.metrics.finished.get("slow_reader", 0) > 0
