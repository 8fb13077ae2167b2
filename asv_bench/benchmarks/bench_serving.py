"""TPOT, TTFT and tokens/s of the whole engine (tinyserve.bench.run_bench), per backend and batch.

All combinations are measured once in setup_cache (one process, threads pinned); the track_*
methods report them. TPOT and TTFT are in ms, lower is better, so asv flags a slowdown; tokens/s
are for display (asv reads any rise as a regression, so do not gate on them).
"""

from __future__ import annotations

from . import _common

BACKENDS = ["numpy", "cpu"]
BATCH_SIZES = [1, 8]


def _measure(model_path: str, input_len: int, output_len: int) -> dict:
    """{(backend, batch, threads): figures} for what can run here; the rest carry the reason."""
    from tinyserve import LLM
    from tinyserve.bench import run_bench, thread_options

    figures: dict = {}
    for backend in BACKENDS:
        for threads in _common.THREADS:
            reason = _common.backend_unavailable(backend)
            if reason is None and threads > _common.cores():
                reason = f"{threads} threads but only {_common.cores()} cores here"
            if reason is not None:
                figures.update({(backend, bs, threads): reason for bs in BATCH_SIZES})
                continue
            _common.use_threads(threads)
            llm = LLM(
                model_path,
                backend=backend,
                backend_options=thread_options(backend, threads),
                max_num_seqs=max(BATCH_SIZES),
                kv_cache_tokens=max(BATCH_SIZES) * 2 * (input_len + output_len),
            )
            _common.use_threads(threads)
            for i, bs in enumerate(BATCH_SIZES):
                r = run_bench(llm, bs, input_len, output_len, seed=i, warmup=i == 0)
                figures[(backend, bs, threads)] = {
                    "tpot_ms": r.tpot_ms.mean,
                    "ttft_ms": r.ttft_ms.mean,
                    "output_tok_s": r.output_tok_s,
                    "prefill_tok_s": r.prefill_tok_s,
                }
    return figures


class _Serving:
    params = (BACKENDS, BATCH_SIZES, _common.THREADS)
    param_names = ("backend", "batch_size", "threads")
    timeout = 600

    def setup(self, figures, backend, batch_size, threads):
        got = figures[(backend, batch_size, threads)]
        if isinstance(got, str):  # the reason it could not run
            raise NotImplementedError(got)
        self.figures = got

    def track_tpot(self, figures, backend, batch_size, threads):
        return self.figures["tpot_ms"]

    track_tpot.unit = "ms"

    def track_ttft(self, figures, backend, batch_size, threads):
        return self.figures["ttft_ms"]

    track_ttft.unit = "ms"

    def track_output_throughput(self, figures, backend, batch_size, threads):
        return self.figures["output_tok_s"]

    track_output_throughput.unit = "tokens/s"

    def track_prefill_throughput(self, figures, backend, batch_size, threads):
        return self.figures["prefill_tok_s"]

    track_prefill_throughput.unit = "tokens/s"


class ServingTiny(_Serving):
    """A 4-layer random Llama (D 128): engine and Python overhead dominate."""

    def setup_cache(self):
        path = _common.write_tiny_checkpoint("tiny-model")
        return _measure(str(path), input_len=64, output_len=32)

    setup_cache.timeout = 300


class ServingDefault(_Serving):
    """SmolLM2-135M-Instruct Q4_1 when pulled (`tinyserve pull`); skipped otherwise."""

    def setup_cache(self):
        path = _common.default_model_path()
        if path is None:
            reason = f"{_common.DEFAULT_MODEL} not pulled (tinyserve pull)"
            return {
                (b, bs, t): reason for b in BACKENDS for bs in BATCH_SIZES for t in _common.THREADS
            }
        return _measure(path, input_len=64, output_len=32)

    setup_cache.timeout = 600
