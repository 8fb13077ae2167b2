"""A backend's lowering against the model file op by op, on one of the conformance kit's tiny
checkpoints: prefill time and TPOT, the two routes interleaved, medians of the repeats.

    python scripts/bench_lowering.py deepseek_v3_q4_k --backend cpu --prompt 128 --tokens 64

A quick look at what a lowering buys a family (the Python-per-op cost it removes shows most on
these small shapes); the speed goals against llama.cpp live in bench_vs_llamacpp.py."""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from tinyserve import testing
from tinyserve.backends import create_backend
from tinyserve.engine import Engine, EngineConfig
from tinyserve.sampling import SamplingParams


def run_once(ckpt, backend, prompt: list[int], n_tokens: int) -> tuple[float, float]:
    """-> (prefill seconds, median decode-step seconds) of one greedy request."""
    engine = Engine(ckpt, None, backend, EngineConfig(block_size=16, kv_cache_tokens=8192))
    engine.add_request(prompt, SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True))
    steps = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    return steps[0], float(np.median(steps[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch", help="a conformance kit variant, e.g. deepseek_v3_q4_k")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ckpt = testing.tiny_checkpoint(args.arch)
    vocab = ckpt.config.vocab_size
    prompt = [2 + i % (vocab - 2) for i in range(args.prompt)]
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for lower in (True, False):  # interleaved: the box's noise falls on both alike
            backend = create_backend(args.backend, lower=lower)
            results[lower].append(run_once(ckpt, backend, prompt, args.tokens))
    print(f"{args.arch} on {args.backend}, {platform.processor() or platform.machine()}")
    for lower, label in ((True, "lowered"), (False, "op by op")):
        runs = np.array(results[lower]) * 1e3
        print(
            f"  {label:9s} prefill {args.prompt} tokens {np.median(runs[:, 0]):8.2f} ms   "
            f"TPOT {np.median(runs[:, 1]):7.3f} ms"
        )


if __name__ == "__main__":
    main()
