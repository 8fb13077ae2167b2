"""Benchmark reports: BenchResults as a table (one column per batch size), JSON, or a PNG plot."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from .bench_run import BenchResult

_ROWS = [  # (label, getter, format)
    ("requests", lambda r: r.num_prompts, "{:d}"),
    ("input tokens / request", lambda r: r.input_len, "{:.1f}"),
    ("output tokens", lambda r: r.n_output_tokens, "{:d}"),
    ("duration (s)", lambda r: r.duration_s, "{:.3f}"),
    ("TTFT mean (ms)", lambda r: r.ttft_ms.mean, "{:.1f}"),
    ("TTFT p50 (ms)", lambda r: r.ttft_ms.p50, "{:.1f}"),
    ("TTFT p99 (ms)", lambda r: r.ttft_ms.p99, "{:.1f}"),
    ("TPOT mean (ms)", lambda r: r.tpot_ms.mean, "{:.2f}"),
    ("TPOT p50 (ms)", lambda r: r.tpot_ms.p50, "{:.2f}"),
    ("TPOT p99 (ms)", lambda r: r.tpot_ms.p99, "{:.2f}"),
    ("ITL p50 (ms)", lambda r: r.itl_ms.p50, "{:.2f}"),
    ("ITL p99 (ms)", lambda r: r.itl_ms.p99, "{:.2f}"),
    ("output tok/s", lambda r: r.output_tok_s, "{:.1f}"),
    ("prefill tok/s", lambda r: r.prefill_tok_s, "{:.1f}"),
    ("decode tok/s", lambda r: r.decode_tok_s, "{:.1f}"),
    ("requests/s", lambda r: r.request_s, "{:.3f}"),
    ("goodput (req/s)", lambda r: r.goodput_req_s, "{:.3f}"),
    ("decode step (ms)", lambda r: r.decode_step_ms, "{:.2f}"),
    ("mask / step (ms)", lambda r: r.mask_ms_per_step, "{:.2f}"),
    ("mask / step (%)", lambda r: _share(r.mask_ms_per_step, r.decode_step_ms), "{:.1f}"),
    ("spec acceptance (%)", lambda r: _share(r.acceptance_rate, 1.0), "{:.1f}"),
    ("spec tokens / step", lambda r: r.mean_accepted_length, "{:.2f}"),
    ("engine steps", lambda r: r.n_steps, "{:d}"),
    ("preemptions", lambda r: r.n_preemptions, "{:d}"),
]


def _share(part: float | None, whole: float | None) -> float | None:
    return None if part is None or not whole else 100 * part / whole


def format_table(results: Sequence[BenchResult]) -> str:
    """Metrics as rows, one column per batch size."""
    r0 = results[0]
    slo = f"  TPOT SLO {r0.tpot_slo_ms:g} ms" if r0.tpot_slo_ms is not None else ""
    head = (
        f"model {r0.model}  backend {r0.backend}  threads {r0.threads}  "
        f"output {r0.output_len} tok/request{slo}"
        + ("  structured JSON (grammar mask per row)" if r0.structured else "")
    )
    cols = [f"batch {r.batch_size}" for r in results]
    width = max(12, *(len(c) for c in cols))
    lines = [head, f"{'':<24}" + "".join(f"{c:>{width}}" for c in cols)]
    for label, get, fmt in _ROWS:
        cells = [get(r) for r in results]
        lines.append(
            f"{label:<24}"
            + "".join(f"{'-' if v is None else fmt.format(v):>{width}}" for v in cells)
        )
    return "\n".join(lines)


def _finite(x):
    """JSON has no NaN: None stands for 'not measured'."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def to_json(results: Sequence[BenchResult]) -> str:
    return json.dumps({"results": [_finite(r.to_dict()) for r in results]}, indent=2)


def plot(results: Sequence[BenchResult], path: str | Path) -> None:
    """Output tokens/s and TPOT (mean, p99) against batch size, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = [r.batch_size for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(bs, [r.output_tok_s for r in results], "o-", label="output (prefill included)")
    ax1.plot(
        bs, [r.decode_tok_s or float("nan") for r in results], "s--", label="decode steps only"
    )
    ax1.set(xlabel="concurrent requests", ylabel="tokens/s", title="throughput")
    nan = float("nan")
    ax2.plot(bs, [r.tpot_ms.mean or nan for r in results], "o-", label="mean")
    ax2.plot(bs, [r.tpot_ms.p99 or nan for r in results], "s--", label="p99")
    ax2.set(xlabel="concurrent requests", ylabel="ms", title="time per output token")
    slo, worst = results[0].tpot_slo_ms, max((r.tpot_ms.p99 or 0.0) for r in results)
    if slo is not None and slo <= 2 * worst:  # a target far above every point would flatten them
        ax2.axhline(slo, color="grey", linestyle=":", label="SLO")
    for ax in (ax1, ax2):
        if len(bs) > 1 and max(bs) / min(bs) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    r0 = results[0]
    fig.suptitle(f"{r0.model} on {r0.backend}: {r0.input_len:.0f} in / {r0.output_len} out")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
