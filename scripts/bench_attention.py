"""Paged attention's kernel on Gemma-3-270M's shapes (H 4, KVH 1, Dh 256, BS 16): a prefill of
one sequence (P new tokens) and a decode step (one token after `context - 1` cached ones).

Medians of time.thread_time at one kernel thread, so another process on the machine skews the
figures less than wall time would: run it before and after a change to the attention kernels.

    PYTHONPATH=. python scripts/bench_attention.py [--repeat 15] [--kv f32 f16]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np

H, KVH, Dh, BS = 4, 1, 256, 16


def _case(rng, n_new, n_cached, dtype):
    """One sequence of n_new new tokens after n_cached, over a shuffled pool."""
    from tinyserve.batch import Batch

    n_blocks = -(-(n_new + n_cached) // BS)
    k_pool = rng.standard_normal((n_blocks, BS, KVH, Dh), dtype=np.float32).astype(dtype)
    v_pool = rng.standard_normal((n_blocks, BS, KVH, Dh), dtype=np.float32).astype(dtype)
    table = [int(b) for b in rng.permutation(n_blocks)]
    batch = Batch.build([(list(range(n_new)), n_cached, table)], BS)
    q = rng.standard_normal((n_new, H, Dh), dtype=np.float32)  # (N, H, Dh)
    return q, k_pool, v_pool, batch


def _calls(kernels, inner, layers, scale):
    for _ in range(inner):
        for q, k_pool, v_pool, batch in layers:
            kernels.paged_attention(q, k_pool, v_pool, batch, scale, 512)  # Gemma's window


def _median_ms(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--kv", nargs="+", default=["f32", "f16"], choices=["f32", "f16"])
    args = ap.parse_args(argv)
    from tinyserve._ext import kernels

    kernels.set_num_threads(1)
    rng = np.random.default_rng(0)
    scale = Dh**-0.5
    # decode after no cached key: the call's fixed cost (most of it the Python wrapper's, which
    # the decoder stack does not pay), to read the other decode rows against
    cases = [("prefill", 128, 0), ("prefill", 512, 0)]
    cases += [("decode", 1, 0), ("decode", 1, 127), ("decode", 1, 511)]
    for kv in args.kv:
        dtype = np.float32 if kv == "f32" else np.float16
        for kind, n_new, n_cached in cases:
            # decode: a call per layer's pools in turn (a layer's keys are not in cache from its
            # last step, as in the model), many times over: the clock's granularity does not count
            n_layers, inner = (1, 1) if kind == "prefill" else (18, 10)
            layers = [_case(rng, n_new, n_cached, dtype) for _ in range(n_layers)]
            run = functools.partial(_calls, kernels, inner, layers, scale)
            run()
            ms = _median_ms(run, args.repeat) / inner / n_layers
            ctx = n_new + n_cached
            print(f"{kv} {kind:7s} P={n_new:3d} context={ctx:3d}: {1e3 * ms:9.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
