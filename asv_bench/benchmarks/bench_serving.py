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
    """{(backend, batch): figures} for every available backend; missing ones carry the reason."""
    from tinyserve import LLM
    from tinyserve.bench import run_bench

    figures: dict = {}
    for backend in BACKENDS:
        reason = _common.backend_unavailable(backend)
        if reason is not None:
            figures.update({(backend, bs): reason for bs in BATCH_SIZES})
            continue
        llm = LLM(model_path, backend=backend, max_num_seqs=max(BATCH_SIZES),
                  kv_cache_tokens=max(BATCH_SIZES) * 2 * (input_len + output_len))
        _common.pin_threads()
        for i, bs in enumerate(BATCH_SIZES):
            r = run_bench(llm, bs, input_len, output_len, seed=i, warmup=i == 0)
            figures[(backend, bs)] = {
                "tpot_ms": r.tpot_ms.mean,
                "ttft_ms": r.ttft_ms.mean,
                "output_tok_s": r.output_tok_s,
                "prefill_tok_s": r.prefill_tok_s,
            }
    return figures


class _Serving:
    params = (BACKENDS, BATCH_SIZES)
    param_names = ("backend", "batch_size")
    timeout = 600

    def setup(self, figures, backend, batch_size):
        got = figures[(backend, batch_size)]
        if isinstance(got, str):  # the reason it could not run
            raise NotImplementedError(got)
        self.figures = got

    def track_tpot(self, figures, backend, batch_size):
        return self.figures["tpot_ms"]

    track_tpot.unit = "ms"

    def track_ttft(self, figures, backend, batch_size):
        return self.figures["ttft_ms"]

    track_ttft.unit = "ms"

    def track_output_throughput(self, figures, backend, batch_size):
        return self.figures["output_tok_s"]

    track_output_throughput.unit = "tokens/s"

    def track_prefill_throughput(self, figures, backend, batch_size):
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
            return {(b, bs): "default model not pulled" for b in BACKENDS for bs in BATCH_SIZES}
        return _measure(path, input_len=64, output_len=32)

    setup_cache.timeout = 600
