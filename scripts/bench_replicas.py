"""Throughput of `tinyserve serve` with 1 process or N replicas on Ray, seen from a client.

For each replica count the server starts as a child process (1: the plain one-process server;
N > 1: `--replicas N` on a local Ray, `--num-cpus-per-replica` = cores / N), answers two warm-up
requests, then R requests with C in flight at once: distinct seeded prompts (no shared prefix,
so the router's affinity plays no part), each generating exactly --output-len tokens. Prints one
JSON line per run: output tokens/s, requests/s, mean end-to-end latency, the load average.

    python scripts/bench_replicas.py --replicas 1,2 --requests 32 --concurrency 16
    python scripts/bench_replicas.py --model tests/fixtures/hf/smollm2 --backend numpy --repeats 1
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

import httpx
import openai

WORDS = ["river", "stone", "cloud", "lamp", "garden", "winter", "copper", "violin"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, replicas: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tinyserve.cli", "serve", "--port", str(port), "-b", args.backend]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--served-model-name", "bench", "--log-level", "warning"]
    if replicas > 1:
        cpus = max(0.1, (os.cpu_count() or 1) / replicas)
        cmd += ["--replicas", str(replicas), "--num-cpus-per-replica", f"{cpus:g}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("the server did not become healthy in 600 s")


async def load(url: str, args, prompts: list[str]) -> dict:
    gate = asyncio.Semaphore(args.concurrency)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:

        async def one(prompt: str) -> tuple[int, float]:
            async with gate:
                t0 = time.perf_counter()
                r = await client.completions.create(
                    model="bench", prompt=prompt, max_tokens=args.output_len, temperature=0,
                    extra_body={"ignore_eos": True}, timeout=600,
                )  # fmt: skip
                return r.usage.completion_tokens, time.perf_counter() - t0

        for p in prompts[:2]:  # warm-up: first-touch of weights and pools, not measured
            await one(p)
        t0 = time.perf_counter()
        done = await asyncio.gather(*[one(p) for p in prompts[2:]])
        wall = time.perf_counter() - t0
    tokens = sum(n for n, _ in done)
    return {
        "output_tok_s": round(tokens / wall, 2),
        "requests_s": round(len(done) / wall, 3),
        "mean_latency_s": round(sum(t for _, t in done) / len(done), 2),
        "wall_s": round(wall, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the default catalog model")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--replicas", default="1,2", help="comma list of replica counts")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-words", type=int, default=48)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="rounds over the replica counts")
    args = p.parse_args()
    rng = random.Random(0)
    prompts = [
        f"Note {i}: " + " ".join(rng.choice(WORDS) for _ in range(args.input_words))
        for i in range(args.requests + 2)
    ]
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both
        for replicas in [int(n) for n in args.replicas.split(",")]:
            proc, url = start(args, replicas)
            try:
                figures = asyncio.run(load(url, args, prompts))
            finally:
                proc.terminate()
                proc.wait(120)
            figures = {"replicas": replicas, **figures, "loadavg_1m": os.getloadavg()[0]}
            print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
