"""tinyserve (numpy, cpu) and llama.cpp side by side on one GGUF: same prompt ids, same threads,
greedy, EOS ignored. Medians over --repeats runs after a warm-up; ratios against llama.cpp.

    python scripts/bench_vs_llamacpp.py [--model M.gguf] [--threads 2] [--gen 65] [--repeats 3]

Each engine runs in its own child process (peak RSS is that child's ru_maxrss); llama.cpp runs
with the peers venv's python (/work/shared/peers, or $TINYSERVE_PEER_PYTHON) and its
llamacpp_bench.py. The children run with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (this
machine sets both); the BLAS kernel each child got is printed from threadpoolctl.

Reported: TTFT, prefill tok/s and TPOT (mean time per output token after the first) for 128- and
512-token prompts; total output tok/s for 16 concurrent requests (tinyserve batched vs
llama-cpp-python serving them one after another); peak RSS against file size x 1.5 + KV cache;
and the floor, weight bytes read per token / measured read bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# (the parent alone imports subprocess and tempfile: a child's peak RSS is what it measures, so
# it carries no more of the harness than it needs)

# the environment as the user gave it, before any import of ours: children (llama.cpp above all)
# get exactly this, less the OpenBLAS overrides below
START_ENV = dict(os.environ)
PEERS = Path(os.environ.get("TINYSERVE_PEERS_DIR", "/work/shared/peers"))
PEER_PY = Path(os.environ.get("TINYSERVE_PEER_PYTHON", Path.home() / ".cache/tinyserve-peers/venv/bin/python"))
CHILD_ENV_DROP = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
KV_BYTES_PER_TOKEN = None  # filled from the model config


def prompt_ids(tokenizer, length: int, salt: int = 0) -> list[int]:
    """A deterministic prompt of exactly `length` tokens (distinct per salt: no shared prefix)."""
    text = f"Request {salt}. " + " ".join(
        f"The {i}th report of season {salt} says the river rose by {i * 7 % 13} centimetres." for i in range(400)
    )
    ids = tokenizer.encode(text)
    assert len(ids) >= length, f"prompt text too short for {length} tokens"
    return ids[:length]


# -- children -------------------------------------------------------------------------------------


def blas_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    return [
        {k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "threading_layer")}
        for d in threadpool_info()
        if d.get("user_api") == "blas"
    ]


def tinyserve_child(a) -> dict:
    """Runs in a child: one backend, every measurement; prints JSON."""
    from tinyserve import LLM, SamplingParams

    os.environ["TINYSERVE_NUM_THREADS"] = str(a.threads)
    spec = json.loads(Path(a.spec).read_text())
    greedy = SamplingParams(max_tokens=a.gen, temperature=0, ignore_eos=True)
    kv_tokens = max(max(spec["lens"]) + a.gen, a.requests * (spec["lens"][0] + a.gen)) + 16 * a.requests
    llm = LLM(a.model, backend=a.child, kv_cache_tokens=kv_tokens, enable_prefix_caching=False,
              max_num_seqs=max(16, a.requests))
    llm.generate([spec["prompts"][str(spec["lens"][0])]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    out = {"backend": a.child, "threads": a.threads, "blas": blas_info(), "kv_tokens": kv_tokens,
           "describe": llm.backend.describe()}
    for n in spec["lens"]:
        ids = spec["prompts"][str(n)]
        runs = []
        for _ in range(a.repeats):
            r = llm.generate([ids], greedy)[0]
            runs.append((r.metrics.ttft, r.metrics.tpot, list(r.outputs[0].token_ids)))
        ttft = _median(x[0] for x in runs)
        out[f"p{n}"] = {"ttft_ms": ttft * 1e3, "prefill_tok_s": n / ttft,
                        "tpot_ms": _median(x[1] for x in runs) * 1e3, "greedy_ids": runs[0][2]}
    batch = [spec["prompts"][f"c{i}"] for i in range(a.requests)]
    walls = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        outs = llm.generate(batch, greedy)
        walls.append(time.perf_counter() - t0)
        assert all(len(o.outputs[0].token_ids) == a.gen for o in outs)
    out["concurrent_tok_s"] = a.requests * a.gen / _median(walls)
    return out


def _median(values) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def run_child(cmd: list[str], env: dict) -> tuple[dict, float]:
    """(the child's JSON, its peak RSS in MiB)."""
    import subprocess

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    stdout, stderr = p.stdout.read(), p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}): {' '.join(cmd[:4])} ...\n{stderr[-3000:]}")
    line = [x for x in stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line), usage.ru_maxrss / 1024


# -- floor ----------------------------------------------------------------------------------------


def weight_bytes_per_token(model_path: str) -> int:
    """Bytes of every matrix a decode step reads: the layers' weights plus the output head."""
    from tinyserve.loading import load_checkpoint

    ck = load_checkpoint(model_path)
    total, names = 0, set(ck.tensors)
    for name, t in ck.tensors.items():
        if name == "model.embed_tokens.weight":
            continue  # one row per token, unless it doubles as the head (below)
        total += t.nbytes if hasattr(t, "nbytes") else t.bits.nbytes
    if "lm_head.weight" not in names:
        total += ck.tensors["model.embed_tokens.weight"].nbytes
    return total


def read_bandwidth(threads: int, size_mb: int = 512) -> float:
    """GB/s of summing a large array, split over `threads` threads (NumPy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.ones(size_mb * 2**20 // 8, dtype=np.int64)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


# -- main -----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the catalog's smollm2-135m-instruct)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=65, help="output tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--lens", default="128,512", help="single-stream prompt lengths")
    ap.add_argument("--backends", default="numpy,cpu")
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(tinyserve_child(a)))
        return 0

    from tinyserve import catalog
    from tinyserve.loading import load_checkpoint
    from tinyserve.tokenizer import Tokenizer

    a.model = str(a.model or catalog.model_path("smollm2-135m-instruct"))
    ck = load_checkpoint(a.model)
    cfg = ck.config
    tok = Tokenizer.from_gguf_metadata(ck.metadata)
    lens = [int(x) for x in a.lens.split(",")]
    prompts = {str(n): prompt_ids(tok, n) for n in lens}
    prompts.update({f"c{i}": prompt_ids(tok, lens[0], salt=i + 1) for i in range(a.requests)})
    env = {k: v for k, v in START_ENV.items() if k not in CHILD_ENV_DROP}
    env["TINYSERVE_NUM_THREADS"] = str(a.threads)
    results: dict = {"model": a.model, "file_mb": Path(a.model).stat().st_size / 2**20, "threads": a.threads,
                     "gen": a.gen, "requests": a.requests, "unset_in_children": list(CHILD_ENV_DROP),
                     "load_avg_start": os.getloadavg()}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"lens": lens, "prompts": prompts}))
        for backend in a.backends.split(","):
            cmd = [sys.executable, __file__, "--child", backend, "--spec", str(spec), "--model", a.model,
                   "--threads", str(a.threads), "--gen", str(a.gen), "--repeats", str(a.repeats),
                   "--requests", str(a.requests)]
            res, rss = run_child(cmd, env)
            res["peak_rss_mb"] = rss
            results[backend] = res
            print(f"[{backend}] done", file=sys.stderr)
        if not a.no_peer:
            peer = {}
            for n in lens:
                ids_file = Path(tmp) / f"ids{n}.json"
                ids_file.write_text(json.dumps(prompts[str(n)]))
                cmd = [str(PEER_PY), str(PEERS / "llamacpp_bench.py"), a.model, "--prompt-ids", str(ids_file),
                       "--gen", str(a.gen), "--threads", str(a.threads), "--repeats", str(a.repeats),
                       "--requests", str(a.requests)]
                res, rss = run_child(cmd, env)
                peer[f"p{n}"] = res
                peer["peak_rss_mb"] = max(peer.get("peak_rss_mb", 0), rss)
            # serving 16 requests one after another: the 128-token run's serial rate
            peer["concurrent_tok_s"] = peer[f"p{lens[0]}"]["serial_tok_s"]
            results["llama.cpp"] = peer
            print("[llama.cpp] done", file=sys.stderr)
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    results["weight_bytes_per_token"] = weight_bytes_per_token(a.model)
    results["read_gb_s"] = read_bandwidth(a.threads)
    results["floor_ms"] = results["weight_bytes_per_token"] / (results["read_gb_s"] * 1e9) * 1e3
    results["kv_bytes_per_token"] = kv_per_token
    results["load_avg_end"] = os.getloadavg()
    if a.json:
        print(json.dumps(results, indent=1))
    else:
        print(table(results, lens))
    return 0


def table(r: dict, lens: list[int]) -> str:
    engines = [e for e in ("numpy", "cpu", "llama.cpp") if e in r]
    peer = r.get("llama.cpp")
    rows = [(f"model {Path(r['model']).name} ({r['file_mb']:.1f} MiB), {r['threads']} threads, greedy, "
             f"EOS ignored, {r['gen']} output tokens; medians; "
             f"load avg {r['load_avg_start'][0]:.1f} -> {r['load_avg_end'][0]:.1f}"),
            f"children ran with {', '.join(r['unset_in_children'])} unset; BLAS: "
            + "; ".join(f"{e}: {r[e].get('blas')}" for e in engines if e != "llama.cpp"),
            "", f"| metric | {' | '.join(engines)} | cpu / llama.cpp |", "|---|" + "---|" * (len(engines) + 1)]

    def row(name, get, fmt, better_low):
        vals = [get(r[e]) for e in engines]
        ratio = ""
        if peer is not None and "cpu" in r:
            c, p = get(r["cpu"]), get(peer)
            ratio = f"{c / p:.2f}x" + (" (lower is better)" if better_low else "")
        rows.append(f"| {name} | {' | '.join(fmt.format(v) for v in vals)} | {ratio} |")

    for n in lens:
        row(f"TTFT, {n}-token prompt (ms)", lambda d, n=n: d[f"p{n}"]["ttft_ms"], "{:.1f}", True)
        row(f"prefill, {n}-token prompt (tok/s)", lambda d, n=n: d[f"p{n}"]["prefill_tok_s"], "{:.0f}", False)
        row(f"TPOT, {n}-token prompt (ms)", lambda d, n=n: d[f"p{n}"]["tpot_ms"], "{:.2f}", True)
    row(f"{r['requests']} concurrent requests, total output tok/s", lambda d: d["concurrent_tok_s"], "{:.0f}", False)
    row("peak RSS (MiB)", lambda d: d["peak_rss_mb"], "{:.1f}", True)
    if "cpu" in r:
        kv_mb = r["cpu"]["kv_tokens"] * r["kv_bytes_per_token"] / 2**20
        rows.append(f"\nRSS target for cpu: file x 1.5 + KV = {r['file_mb'] * 1.5:.1f} + {kv_mb:.1f} = "
                    f"{r['file_mb'] * 1.5 + kv_mb:.1f} MiB (KV pool of {r['cpu']['kv_tokens']} tokens)")
    rows.append(f"floor: {r['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token / "
                f"{r['read_gb_s']:.1f} GB/s read bandwidth = {r['floor_ms']:.2f} ms per token")
    if "cpu" in r and peer is not None:
        for n in lens:
            a, b = r["cpu"][f"p{n}"]["greedy_ids"], peer[f"p{n}"]["greedy_ids"]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            rows.append(f"greedy ids, {n}-token prompt: cpu and llama.cpp agree on the first {same} of {len(a)}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
