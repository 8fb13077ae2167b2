"""`tinyserve serve --replicas 2` on a local Ray, driven by the official client and raw HTTP.

Oracles: the replicas' greedy text equals one LLM's; prefix-cache hits, read per replica from
/metrics, equal the tokens a request shares with the one that warmed its prefix (what one
replica holding each prefix saves, and a second replica would prefill again); the processes
the command started, found by an environment mark they inherit, are gone after SIGTERM.

One server serves the whole module (a local Ray takes most of a minute to start on 2 cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

try:
    import ray  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":  # CI installs the ray extra: its absence is a failure
        raise
    pytest.skip(
        "ray is not installed: pip install -e '.[ray]' (scripts/test.sh does)",
        allow_module_level=True,
    )
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tinyserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "smollm2"
MODEL, KEY = "tiny", "sekret"
AUTH = {"authorization": f"Bearer {KEY}"}
BLOCK = 16  # the engine's default KV block size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries mark: everything the server command started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if mark.encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
    return pids


class Server:
    """The command in a subprocess; its stderr drained by a thread (Ray logs a lot there)."""

    def __init__(self):
        self.mark = f"replica-test-{uuid.uuid4().hex}"
        self.url = f"http://127.0.0.1:{_free_port()}"
        cmd = [sys.executable, "-m", "tinyserve.cli", "serve", "--model", str(FIXTURE)]
        cmd += ["-b", "numpy", "--replicas", "2", "--num-cpus-per-replica", "0.5"]
        cmd += ["--port", self.url.rsplit(":", 1)[1], "--served-model-name", MODEL]
        cmd += ["--api-key", KEY, "--max-pending-chunks", "8", "--slow-reader-timeout", "5"]
        env = {**os.environ, "TS_REPLICA_TEST_MARK": self.mark}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        self.log: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            if line.startswith("tinyserve: serving on"):
                self.ready.set()

    def metrics(self) -> dict[str, dict[str, float]]:
        """/metrics as {sample name with its other labels: {replica: value}}."""
        out: dict[str, dict[str, float]] = {}
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith("#") or not line:
                continue
            sample, value = line.rsplit(" ", 1)
            name, _, labels = sample.partition("{")
            replica, *rest = labels.rstrip("}").split(",")
            assert replica.startswith("replica="), line
            key = name + ("{" + ",".join(rest) + "}" if rest else "")
            out.setdefault(key, {})[replica.split('"')[1]] = float(value)
        return out


@pytest.fixture(scope="module")
def server():
    s = Server()
    try:
        if not s.ready.wait(300):
            pytest.fail("the server did not start:\n" + "".join(s.log[-40:]))
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(30)


@pytest.fixture(scope="module")
def ref() -> LLM:
    return LLM(str(FIXTURE), backend="numpy")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=60)


def stream(server, body: dict):
    """The raw SSE response of a streamed completion (a context manager)."""
    body = {**body, "stream": True}
    return httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60)


def poll(fn, timeout: float):
    """fn's first truthy value within timeout, else None."""
    deadline = time.monotonic() + timeout
    while not (value := fn()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value or None


def wait_until(cond, timeout: float) -> bool:
    return poll(cond, timeout) is not None


def test_replicas_answer_as_one_llm_does(server, client, ref):
    for i in range(4):
        prompt = f"Story {i}: the"
        r = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert r.choices[0].text == ref.generate(prompt, greedy(12))[0].outputs[0].text
    streamed = client.completions.create(
        model=MODEL, prompt="Story 9: the", max_tokens=20, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = [c.choices[0].text for c in streamed if c.choices]
    assert len(chunks) > 1
    assert "".join(chunks) == ref.generate("Story 9: the", greedy(20))[0].outputs[0].text
    messages = [{"role": "user", "content": "Tell me a story"}]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].message.content == ref.chat(messages, greedy(10))[0].outputs[0].text
    # the API key and the limits are each replica's own, as in one process
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    big = post(server, {"prompt": "x", "max_tokens": 5000})
    assert big.status_code == 400 and big.json()["error"]["param"] == "max_tokens"


def test_a_client_that_hangs_up_aborts_its_request_on_the_replica(server):
    def aborted() -> float:
        samples = server.metrics().get('tinyserve_requests_total{finish_reason="abort"}', {})
        return sum(samples.values())

    def kv_in_use() -> bool:
        return any(server.metrics()["tinyserve_kv_cache_usage_perc"].values())

    before = aborted()
    with stream(
        server, {"prompt": "Story 3: the", "max_tokens": 200, "n": 8, "ignore_eos": True}
    ) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
    assert wait_until(lambda: aborted() == before + 1, 30)
    assert wait_until(lambda: not kv_in_use(), 30)


def test_a_client_that_stops_reading_is_dropped_and_its_request_aborted_on_the_replica(server):
    def ended() -> dict[str, float]:
        metrics = server.metrics()
        return {
            reason: sum(
                metrics.get(f'tinyserve_requests_total{{finish_reason="{reason}"}}', {}).values()
            )
            for reason in ("length", "slow_reader")
        }

    before = ended()
    # 32 prompts x 8 choices x 200 tokens with logprobs: ~16 MB of events, more than the socket
    # buffers between a client and a server hold (the kernel grows a sender's to 4 MB), and
    # more sequences than one replica's KV cache: the last still run when the client stalls
    prompts = [f"Story {i}: the" for i in range(32)]
    body = {"prompt": prompts, "max_tokens": 200, "n": 8, "logprobs": 5, "ignore_eos": True}
    body = json.dumps({**body, "stream": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        s.connect((host, int(port)))
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {KEY}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert s.recv(12) == b"HTTP/1.1 200"  # then nothing read

        def all_ended() -> bool:
            now = ended()
            return sum(now.values()) - sum(before.values()) == len(prompts)

        # what the replica may send ahead is bounded, so it waits for the client and the ingress
        # drops the client; the engine requests still running are aborted as slow readers (those
        # done by then count as done, as in one process)
        assert wait_until(all_ended, 180), "".join(server.log[-30:])
        assert ended()["slow_reader"] > before["slow_reader"]
        assert wait_until(
            lambda: not any(server.metrics()["tinyserve_kv_cache_usage_perc"].values()), 30
        )
        s.settimeout(30)
        received = b""
        while chunk := s.recv(1 << 16):  # what was in the buffers, then the server's close
            received += chunk
    assert b"data: " in received and b"[DONE]" not in received


PREFIXES = [  # two long, distinct documents: each many KV blocks
    "Harbour log: " + "".join(f"pier {i} holds {3 * i} boats. " for i in range(5)),
    "Recipe book: " + "".join(f"step {i} adds {i} eggs. " for i in range(6)),
]


def test_shared_prefixes_are_prefilled_once_per_replica_that_serves_them(server, ref):
    def prompt(p: int, i: int) -> str:
        return f"{PREFIXES[p]}Question {i}: why?"

    def hits() -> float:
        return sum(server.metrics()["tinyserve_prefix_cache_hits_total"].values())

    before = hits()
    for p in (0, 1):  # one request warms each prefix on the replica the router picks
        assert post(server, {"prompt": prompt(p, 0), "max_tokens": 2}).status_code == 200

    async def rest() -> None:
        url = server.url + "/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0) as ac:
            requests = [
                ac.completions.create(model=MODEL, prompt=prompt(i % 2, i), max_tokens=2)
                for i in range(2, 16)
            ]
            await asyncio.gather(*requests)

    asyncio.run(rest())
    # what each later request shares with its warm-up, in whole blocks, is all it can reuse
    expected = 0
    for i in range(2, 16):
        warm, ids = ref.tokenizer.encode(prompt(i % 2, 0)), ref.tokenizer.encode(prompt(i % 2, i))
        shared = next(k for k, (a, b) in enumerate(zip(warm + [-1], ids)) if a != b)
        expected += min(shared // BLOCK, (len(ids) - 1) // BLOCK) * BLOCK
    assert expected >= 14 * 3 * BLOCK  # long prefixes: a miss would show
    assert hits() - before == expected
    assert len(server.metrics()["tinyserve_prefix_cache_hits_total"]) == 2  # one sample per replica


def test_a_killed_replica_fails_its_requests_cleanly_and_ray_restarts_it(server):
    doc = "Ship manifest: " + "".join(f"crate {i} weighs {7 * i} kg. " for i in range(3))
    assert post(server, {"prompt": doc + "warm", "max_tokens": 2}).status_code == 200
    assert len(_replica_pids(server)) == 2

    results: list = [None] * 12

    def send(i: int) -> None:  # the warmed prefix: all go to the replica that holds it
        body = {"prompt": f"{doc}q{i}", "max_tokens": 180, "ignore_eos": True}  # to the context
        if i >= 8:
            r = post(server, body)
            results[i] = (r.status_code, [r.text])
            return
        with stream(server, body) as r:
            results[i] = (r.status_code, [line for line in r.iter_lines() if line])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()

    def busy_replica() -> str | None:
        running = server.metrics()["tinyserve_num_requests_running"]
        return next((replica for replica, n in running.items() if n), None)

    victim = poll(busy_replica, 30)
    killed_pid = int(dict(_replica_pids(server))[victim])
    os.kill(killed_pid, signal.SIGKILL)
    for t in threads:
        t.join(60)

    failed = 0
    for status, lines in results:
        last = lines[-1].removeprefix("data: ")  # a stream's last event, or a JSON body
        if last == "[DONE]" or (status == 200 and "error" not in json.loads(last)):
            continue  # finished before the kill, or served by the other replica
        # refused with a 503, or its stream had begun: an error event ends it, without [DONE]
        assert status in (200, 503), (status, lines)
        err = json.loads(last)["error"]
        assert err["type"] == "server_error" and err["code"] == "replica_unavailable", err
        assert "\n" not in err["message"]
        failed += 1
    assert failed >= 1, "every request finished before the kill: the test proves nothing"
    # the 503s the ingress answered itself are counted, as one process counts each response
    refused = sum(status == 503 for status, _ in results)
    counted = server.metrics().get(
        'tinyserve_http_requests_total{path="/v1/completions",status="503"}', {}
    )
    assert counted.get("ingress", 0) == refused, (counted, refused)

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    for i in range(4):  # the other replica serves, the prefix's holder gone or not
        r = client.completions.create(model=MODEL, prompt=f"{doc}after {i}", max_tokens=3)
        assert r.usage.completion_tokens == 3

    def replaced() -> bool:  # Ray starts a new replica in its place
        pids = [int(pid) for _, pid in _replica_pids(server)]
        return len(pids) == 2 and killed_pid not in pids

    assert wait_until(replaced, 180), "".join(server.log[-30:])


def _replica_pids(server) -> list[tuple[str, str]]:
    """(replica, pid) of each live replica, from its info gauge."""
    out = []
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("tinyserve_replica_info{"):
            labels = dict(kv.split("=") for kv in line.split("{")[1].split("}")[0].split(","))
            out.append((labels["replica"].strip('"'), labels["pid"].strip('"')))
    return out


def test_sigterm_stops_the_replicas_and_ray_with_them(server):
    assert len(_marked_pids(server.mark)) > 4  # the command, Ray's daemons, 3 replicas
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(120) == 0, "".join(server.log[-30:])
    assert wait_until(lambda: not _marked_pids(server.mark), 30), _marked_pids(server.mark)
