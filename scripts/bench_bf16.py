"""bf16-weight matmuls on the kernels' vnni level (bf16 widened, f32 FMA) against the bf16 level
(activations rounded to bf16, vdpbf16ps), same process, interleaved.

    python scripts/bench_bf16.py [--repeats 21] [--model NAME_OR_GGUF] [--no-model]

Kernels: kernels.matmul_bf16 on random bf16 weights of 1536 x 576 and 576 x 1536 (SmolLM2-135M's
FFN up and down: 1.8 MB, cache-resident between calls) at 1, 8 and 128 activation rows, on 1 and
2 threads, and one row against a 49152 x 576 matrix (56 MB: the weights stream from memory, as a
decode step's do): the median of --repeats timed samples per level, the levels alternating; and
the bf16 level's accuracy against the f32-activation path, max |diff| / max |output| and the
relative RMS difference. Activations are NumPy arrays, as the cpu backend passes them (NumPy
aligns them to 16 bytes: the vnni level's f32 rows are read as they lie, the bf16 level rounds
them into its own line-aligned scratch).

End to end (unless --no-model): a GGUF model (default: the catalog's default model, when pulled)
with every weight matrix dequantized and rounded to bf16 in memory, so the cpu backend runs it
as it runs a bf16 safetensors checkpoint (the model file op by op, bf16 matmuls): prefill tok/s
of a 128-token prompt, TPOT of one greedy request, and the logits of the bf16 level against the
vnni level's (max |diff| / their std, top-1 agreement, mean KL), medians of 3 per level."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_llamacpp import cpu_isa

from tinyserve._ext import kernels

SHAPES = ((1536, 576), (576, 1536))  # (M, K): out (N, M) = x (N, K) @ W.T
ROWS = (1, 8, 128)
LEVELS = ("vnni", "bf16")


def to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, nearest even (finite weights)."""
    b = np.ascontiguousarray(w, np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def time_levels(x: np.ndarray, bits: np.ndarray, repeats: int) -> dict[str, float]:
    """Median seconds per call of matmul_bf16 on each level, the levels alternating."""
    out = np.empty((x.shape[0], bits.shape[0]), np.float32)
    times: dict[str, list[float]] = {lv: [] for lv in LEVELS}
    inner = max(1, int(2e8 // (2 * x.shape[0] * bits.size)))  # ~0.1 s of work per sample
    for r in range(repeats + 1):
        for lv in LEVELS if r % 2 == 0 else reversed(LEVELS):
            kernels.set_isa(lv)
            t = time.perf_counter()
            for _ in range(inner):
                kernels.matmul_bf16(x, bits, out)
            if r:  # the first round warms up
                times[lv].append((time.perf_counter() - t) / inner)
    return {lv: statistics.median(v) for lv, v in times.items()}


def bench_kernels(repeats: int) -> None:
    rng = np.random.default_rng(0)
    print(f"{'M x K':>10s} {'N':>4s} {'thr':>3s} {'vnni us':>9s} {'bf16 us':>9s} {'speedup':>7s}"
          f" {'bf16 GFLOP/s':>12s}")  # fmt: skip
    accuracy = []
    for m, k in SHAPES:
        bits = to_bf16_bits(rng.standard_normal((m, k)).astype(np.float32) * 0.05)
        for n in ROWS:
            x = rng.standard_normal((n, k)).astype(np.float32)
            for threads in (1, 2):
                kernels.set_num_threads(threads)
                t = time_levels(x, bits, repeats)
                flops = 2 * n * m * k / t["bf16"] / 1e9
                print(f"{m:>4d} x {k:<4d} {n:>4d} {threads:>3d} {t['vnni'] * 1e6:9.1f} "
                      f"{t['bf16'] * 1e6:9.1f} {t['vnni'] / t['bf16']:6.2f}x {flops:12.1f}")  # fmt: skip
            kernels.set_isa("vnni")
            ref = kernels.matmul_bf16(x, bits)
            kernels.set_isa("bf16")
            diff = kernels.matmul_bf16(x, bits) - ref
            accuracy.append(
                (m, k, n, np.abs(diff).max() / np.abs(ref).max(),
                 np.sqrt(np.mean(diff**2) / np.mean(ref**2)))
            )  # fmt: skip
    m, k = 49152, 576  # the default model's tied head: 56 MB of bf16, streamed from memory
    bits = to_bf16_bits(rng.standard_normal((m, k)).astype(np.float32) * 0.05)
    x = rng.standard_normal((1, k)).astype(np.float32)
    for threads in (1, 2):
        kernels.set_num_threads(threads)
        t = time_levels(x, bits, max(5, repeats // 4))
        print(f"{m} x {k}, N = 1, {threads} thread(s), from memory: vnni {t['vnni'] * 1e6:.0f} us "
              f"({bits.nbytes / t['vnni'] / 1e9:.1f} GB/s), bf16 {t['bf16'] * 1e6:.0f} us "
              f"({bits.nbytes / t['bf16'] / 1e9:.1f} GB/s)")  # fmt: skip
    print("\naccuracy of the bf16 level against the f32-activation path (vnni level):")
    for m, k, n, rel_max, rel_rms in accuracy:
        print(f"  {m} x {k}, N = {n:>3d}: max |diff| / max |out| {rel_max:.2e}, "
              f"relative RMS {rel_rms:.2e}")  # fmt: skip


def bf16_llm(model: str | None):
    """An LLM on the GGUF with every quantized matrix dequantized and rounded to bf16."""
    from tinyserve import LLM, loading
    from tinyserve.loading.gguf_file import QuantTensor
    from tinyserve.loading.safetensors_file import BF16Array

    real = loading.load_checkpoint

    def load_as_bf16(path):
        ckpt = real(path)
        for name, t in ckpt.tensors.items():
            if isinstance(t, QuantTensor) or (isinstance(t, np.ndarray) and t.ndim == 2):
                w = t.dequantize() if isinstance(t, QuantTensor) else t
                ckpt.tensors[name] = BF16Array(to_bf16_bits(w))
        return ckpt

    loading.load_checkpoint = load_as_bf16
    try:
        return LLM(model, enable_prefix_caching=False)
    finally:
        loading.load_checkpoint = real


def bench_model(model: str | None) -> None:
    from tinyserve import SamplingParams
    from tinyserve.errors import TinyServeError

    try:
        llm = bf16_llm(model)
    except TinyServeError as e:  # not pulled, not a model
        print(f"\nend to end: skipped ({type(e).__name__}: {e})")
        return
    kernels.set_num_threads(2)
    rng = np.random.default_rng(1)
    prompt = rng.integers(100, 20000, 128).tolist()
    one = SamplingParams(max_tokens=65, temperature=0, ignore_eos=True)
    runs: dict[str, list[tuple[float, float]]] = {lv: [] for lv in LEVELS}
    logits = {}
    for r in range(3):
        for lv in LEVELS if r % 2 == 0 else reversed(LEVELS):
            kernels.set_isa(lv)
            t = time.perf_counter()
            logits[lv] = llm.logits(prompt).astype(np.float64)
            prefill = len(prompt) / (time.perf_counter() - t)
            t = time.perf_counter()
            llm.generate([prompt[:16]], one)
            runs[lv].append((prefill, (time.perf_counter() - t) / 65))
    med = {lv: [statistics.median(x[i] for x in runs[lv]) for i in range(2)] for lv in LEVELS}
    a, b = logits["vnni"], logits["bf16"]
    la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    kl = (np.exp(la) * (la - lb)).sum(-1).mean()
    print(f"\nend to end, {model or 'default model'} as bf16, 2 threads: {'vnni':>8s} {'bf16':>8s}")
    print(f"  prefill, 128 tokens (tok/s) {med['vnni'][0]:8.0f} {med['bf16'][0]:8.0f}")
    print(f"  TPOT, 1 request (ms)        {med['vnni'][1] * 1e3:8.2f} {med['bf16'][1] * 1e3:8.2f}")
    print(f"  logits, bf16 vs vnni level: max |diff| / std {np.abs(a - b).max() / a.std():.3g}, "
          f"top-1 agreement {np.mean(a.argmax(-1) == b.argmax(-1)):.3f}, mean KL {kl:.2e}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--model", default=None)
    ap.add_argument("--no-model", action="store_true")
    args = ap.parse_args()
    if "bf16" not in kernels.available_isas():
        sys.exit(f"no bf16 level on this CPU (levels: {kernels.available_isas()})")
    isa = cpu_isa()
    print(f"{isa['cpu']}, {isa['cores']} cores, levels {kernels.available_isas()}")
    before = kernels.get_isa(), kernels.get_num_threads()
    try:
        bench_kernels(args.repeats)
        if not args.no_model:
            bench_model(args.model)
    finally:
        kernels.set_isa(before[0])
        kernels.set_num_threads(before[1])


if __name__ == "__main__":
    main()
