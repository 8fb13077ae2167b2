"""Soak `tinyserve serve` with clients that read, read slowly, stop reading, or hang up.

Starts the server as a child process, runs N requests over raw sockets with C at a time (a seeded
mix: streaming or not, reading everything, reading slowly through a small receive buffer, never
reading after the headers, hanging up mid-stream or before the answer), then prints the server's
RSS after each tenth of the requests, the KV blocks in use once it is idle, and what /metrics
counts by finish reason. A flat RSS and 0 blocks in use are what a slow reader must not break.

The KV pool is allocated up front but its pages become resident only when a block is first
written, so RSS would climb by up to the pool's size until every block has been used once. A
warm-up phase first writes every block: distinct prompts (max_tokens 1) whose full blocks stay in
the prefix cache, so each takes fresh blocks, until the prompt tokens sent fill the pool 1.25
times over. RSS is measured from there. The exit status is 1 when blocks are left in use or RSS
grew by more than --max-growth-mib after the warm-up.

    python scripts/soak_server.py --requests 3000 --concurrency 32
    python scripts/soak_server.py --model tests/fixtures/hf/smollm2 --backend numpy --requests 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("reads", "slow", "never-reads", "hangup", "hangup-early")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data.split(b"\r\n\r\n", 1)[1].decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def one_request(port: int, kind: str, body: dict, rng: random.Random, timeout: float):
    """One client; returns True when it read a complete answer."""
    sock = socket.socket()
    if kind in ("slow", "never-reads"):  # a small window, so unread bytes back up to the server
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    payload = json.dumps(body).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    complete = False
    try:
        if kind == "hangup-early":
            await asyncio.sleep(rng.random() * 0.05)
            return False
        head = await reader.readuntil(b"\r\n\r\n")
        if kind == "never-reads":  # read nothing past the timeout, then go away
            await asyncio.sleep(timeout + 1)
            return False
        n_cut = rng.randint(1, 6)
        got = b""
        while True:
            chunk = await reader.read(256 if kind == "slow" else 65536)
            if not chunk:
                break
            got += chunk
            if kind == "slow":
                await asyncio.sleep(0.005)
            if kind == "hangup" and got.count(b"\n\n") >= n_cut:
                return False
        complete = head.startswith(b"HTTP/1.1 200") and (b"[DONE]" in got or not body.get("stream"))
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()
    return complete


async def post_json(port: int, path: str, body: dict) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n".encode()
        + f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode()
        + payload
    )
    data = await reader.read()
    writer.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


async def warm_up(args, port: int) -> dict:
    """Write every KV block once: distinct prompts whose full blocks stay cached (so the next
    prompt takes fresh ones) until the prompt tokens sent are 1.25 times the pool's capacity."""
    await post_json(port, "/v1/completions", {"model": "soak", "prompt": "hi", "max_tokens": 1})
    total = int(
        metric(await http_get(port, "/metrics"), "tinyserve_kv_blocks_total")
    )  # set by a step
    target = int(total * args.block_size * 1.25)
    rng = random.Random(args.seed + 1)
    words = ("alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "ember", "maple")
    sent, n = 0, 0
    sem = asyncio.Semaphore(4)

    async def one(i: int) -> int:
        text = f"Warm-up {i}: " + " ".join(
            f"{rng.choice(words)}{rng.randint(0, 999)}" for _ in range(args.warmup_words)
        )
        async with sem:
            out = await post_json(
                port, "/v1/completions", {"model": "soak", "prompt": text, "max_tokens": 1}
            )
        if "usage" not in out:
            raise RuntimeError(f"soak: a warm-up request failed: {out}")
        return int(out["usage"]["prompt_tokens"])

    while sent < target:
        batch = await asyncio.gather(*(one(n + k) for k in range(8)))
        sent, n = sent + sum(batch), n + len(batch)
    return {"requests": n, "prompt_tokens": sent, "pool_tokens": total * args.block_size}


async def soak(args, port: int, pid: int) -> dict:
    rng = random.Random(args.seed)
    rss = {"start": rss_mib(pid)}
    warm = await warm_up(args, port) if args.block_size > 0 else None
    rss["after_warm_up"] = rss_mib(pid)
    every_tenth: list[float] = []  # RSS after each tenth of the requests
    kinds = {k: 0 for k in KINDS}
    complete = 0
    sem = asyncio.Semaphore(args.concurrency)
    done = 0

    async def run(i: int):
        nonlocal complete, done
        kind = rng.choice(KINDS)
        kinds[kind] += 1
        body = {
            "model": "soak",
            "prompt": f"Request {i}. " + rng.choice(["Tell me a story.", "List ten fruits.", "Hi"]),
            "max_tokens": rng.randint(1, args.max_tokens),
            "temperature": 0.8,
            "seed": i,
            "stream": rng.random() < 0.7,
            "ignore_eos": True,
        }
        if rng.random() < 0.3:
            body["logprobs"] = 5
        if kind in ("slow", "never-reads"):  # long answers in big chunks: unread bytes back up
            body.update(stream=True, logprobs=5, max_tokens=args.long_tokens)
        async with sem:
            ok = await one_request(port, kind, body, random.Random(i), args.timeout)
            complete, done = complete + ok, done + 1  # after the await: no update is lost
            if done == args.requests // 2:
                rss["middle"] = rss_mib(pid)
            if done % max(1, args.requests // 10) == 0:
                every_tenth.append(round(rss_mib(pid), 1))

    await asyncio.gather(*(run(i) for i in range(args.requests)))
    for _ in range(600):  # idle: the last aborts have reached the engine
        text = await http_get(port, "/metrics")
        if (
            metric(text, "tinyserve_sequences_running") == 0
            and metric(text, "tinyserve_sequences_waiting") == 0
        ):
            break
        await asyncio.sleep(0.1)
    rss["end"] = rss_mib(pid)
    finished = {
        line.split('"')[1]: int(float(line.split()[-1]))
        for line in text.splitlines()
        if line.startswith("tinyserve_requests_total{")
    }
    return {
        "requests": args.requests,
        "warm_up": warm,
        "clients": kinds,
        "complete_answers": complete,
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "rss_mib_every_tenth": every_tenth,
        "kv_blocks_total": int(metric(text, "tinyserve_kv_blocks_total")),
        "kv_blocks_in_use": int(metric(text, "tinyserve_kv_blocks_in_use")),
        "finished_by_reason": finished,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="default: the default catalog model")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--long-tokens", type=int, default=128, help="max_tokens of the slow readers")
    p.add_argument("--timeout", type=float, default=2.0, help="the server's --slow-reader-timeout")
    p.add_argument("--pending", type=int, default=16, help="the server's --max-pending-chunks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--block-size", type=int, default=16, help="the engine's KV block size; 0: no warm-up"
    )
    p.add_argument("--warmup-words", type=int, default=120, help="words per warm-up prompt")
    p.add_argument(
        "--max-growth-mib", type=float, default=32.0, help="RSS growth after the warm-up that fails"
    )
    args = p.parse_args(argv)
    port = free_port()
    cmd = [sys.executable, "-m", "tinyserve.cli", "serve", "--port", str(port)]
    cmd += ["--backend", args.backend, "--served-model-name", "soak", "--log-level", "critical"]
    cmd += ["--slow-reader-timeout", str(args.timeout), "--max-pending-chunks", str(args.pending)]
    cmd += ["--max-queue", str(max(256, args.concurrency * 2))]
    cmd += ["--model", args.model] if args.model else []
    server = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                asyncio.run(http_get(port, "/health"))
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print("soak: the server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        t0 = time.monotonic()
        report = asyncio.run(soak(args, port, server.pid))
        report["seconds"] = round(time.monotonic() - t0, 1)
        report["command"] = " ".join(cmd)
        growth = report["rss_mib"]["end"] - report["rss_mib"]["after_warm_up"]
        report["rss_growth_after_warm_up_mib"] = round(growth, 1)
        tenths = report["rss_mib_every_tenth"]
        report["rss_spread_over_tenths_mib"] = round(max(tenths) - min(tenths), 1)
        print(json.dumps(report, indent=1))
        if report["kv_blocks_in_use"] != 0:
            print(f"soak: {report['kv_blocks_in_use']} KV blocks left in use", file=sys.stderr)
            return 1
        if growth > args.max_growth_mib:
            print(f"soak: RSS grew {growth:.1f} MiB after the warm-up", file=sys.stderr)
            return 1
        return 0
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
