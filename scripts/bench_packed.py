"""The cpu backend's packed int8 kernels against its row kernels, same model, same run, interleaved.

    python scripts/bench_packed.py [--model NAME_OR_PATH] [--repeats 3]

Two engines on one GGUF, `backend_options={"pack_weights": True}` and `False` (every other
setting alike, prefix cache off), alternating: prefill of a 128-token prompt (tok/s), TPOT of one
greedy request after a 16-token prompt, and 16 requests of 16-128 prompt tokens x 64 greedy
tokens batched (output tok/s, prefill included: decode steps of 16 rows, which never reached
the fp32 sgemm route, so the row kernels are that workload's earlier speed). Medians of the
repeats, and their ratios; prints the CPU's ISA and the measured read bandwidth."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_llamacpp import cpu_isa, read_bandwidth

from tinyserve import LLM, SamplingParams


def measure(llm: LLM, prompt: list[int], batch: list[list[int]]) -> tuple[float, float, float]:
    """(prefill tok/s, TPOT s, batched output tok/s) of one pass."""
    t = time.perf_counter()
    llm.logits(prompt)
    prefill = len(prompt) / (time.perf_counter() - t)
    one = SamplingParams(max_tokens=65, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    llm.generate([prompt[:16]], one)
    tpot = (time.perf_counter() - t) / 65
    many = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(batch, many)
    return prefill, tpot, len(batch) * 64 / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    isa = cpu_isa()
    print(
        f"{isa['cpu']}, {isa['cores']} cores, AVX2 {isa['AVX2']}, AVX-512 {isa['AVX-512']}, "
        f"VNNI {isa['VNNI']}; read bandwidth {read_bandwidth(isa['cores'] or 1):.1f} GB/s"
    )
    llms = {
        pack: LLM(args.model, enable_prefix_caching=False, backend_options={"pack_weights": pack})
        for pack in (False, True)
    }
    rng = np.random.default_rng(1)
    prompt = rng.integers(100, 20000, 128).tolist()
    batch = [rng.integers(100, 20000, int(n)).tolist() for n in rng.integers(16, 128, 16)]
    runs = {pack: [] for pack in llms}
    for r in range(args.repeats):
        for pack in llms if r % 2 == 0 else reversed(list(llms)):
            runs[pack].append(measure(llms[pack], prompt, batch))
    med = {p: [statistics.median(x[i] for x in runs[p]) for i in range(3)] for p in runs}
    rows, packed = med[False], med[True]
    print(f"{'':28s} {'row kernels':>12s} {'packed':>10s} {'ratio':>7s}")
    print(
        f"{'prefill, 128 tokens (tok/s)':28s} {rows[0]:12.0f} {packed[0]:10.0f} {packed[0] / rows[0]:6.2f}x"
    )
    print(
        f"{'TPOT, 1 request (ms)':28s} {rows[1] * 1e3:12.2f} {packed[1] * 1e3:10.2f} {packed[1] / rows[1]:6.2f}x"
    )
    print(
        f"{'16 requests (output tok/s)':28s} {rows[2]:12.0f} {packed[2]:10.0f} {packed[2] / rows[2]:6.2f}x"
    )


if __name__ == "__main__":
    main()
