"""`tinyserve bench`: TTFT, TPOT, inter-token latency and throughput from the engine's own metrics.

`batch_size` requests are kept in flight at once (a closed loop: when one finishes the next prompt
is added) through the one Engine step loop that serves `LLM.generate`. Every figure comes from the
per-request RequestMetrics the engine records (tinyserve/sequence.py), so the CLI, asv and any
script measure the same thing:

    TTFT     first token time - arrival (add_request), so queueing inside the engine counts
    TPOT     (last token time - first token time) / (output tokens - 1), per request
    ITL      every gap between two consecutive tokens of a request, pooled over requests
    output tok/s   output tokens / wall time of the run (prefill included)
    prefill tok/s  prompt tokens computed / wall time of the steps that computed some
    decode tok/s   tokens sampled by the steps that computed no prompt token / their wall time
    goodput  requests per second whose TPOT met the --tpot-slo-ms target
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RequestError, TinyServeError

Prompt = str | list[int]


@dataclass(frozen=True, slots=True)
class Stats:
    """Mean, median and 99th percentile of a latency, in milliseconds (None when nothing measured)."""

    mean: float | None
    p50: float | None
    p99: float | None

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Stats:
        if len(values) == 0:
            return cls(None, None, None)
        ms = np.asarray(values, dtype=np.float64) * 1e3
        return cls(float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


@dataclass(frozen=True, slots=True)
class BenchResult:
    """One benchmark run: `batch_size` concurrent requests until `num_prompts` have finished."""

    model: str
    backend: str
    threads: int | None
    batch_size: int
    num_prompts: int
    input_len: float  # mean prompt tokens per request
    output_len: int  # max_tokens of every request (ignore_eos, so each produces exactly this many)
    n_input_tokens: int
    n_output_tokens: int
    n_cached_tokens: int  # prompt tokens served by the prefix cache instead of computed
    duration_s: float
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    output_tok_s: float
    prefill_tok_s: float | None
    decode_tok_s: float | None  # tokens sampled by steps that computed no prompt token / their time
    request_s: float
    tpot_slo_ms: float | None
    goodput_req_s: float | None  # requests/s whose TPOT <= tpot_slo_ms
    n_steps: int
    decode_step_ms: float | None  # mean wall time of a step that computed no prompt token
    n_preemptions: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- thread pinning ---------------------------------------------------------------------------------


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def pin_threads(n: int) -> Iterator[None]:
    """Limit BLAS and OpenMP pools to n threads (threadpoolctl) and tell the cpu backend
    (TINYSERVE_NUM_THREADS), so runs on one machine are comparable."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    old = os.environ.get("TINYSERVE_NUM_THREADS")
    os.environ["TINYSERVE_NUM_THREADS"] = str(n)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            print(
                "tinyserve bench: warning: threadpoolctl missing, BLAS threads not pinned "
                "(pip install threadpoolctl)",
                file=sys.stderr,
            )
            yield
            return
        with threadpool_limits(limits=n):
            yield
    finally:
        if old is None:
            os.environ.pop("TINYSERVE_NUM_THREADS", None)
        else:
            os.environ["TINYSERVE_NUM_THREADS"] = old


# -- prompts ----------------------------------------------------------------------------------------


def random_prompts(
    vocab_size: int, n: int, input_len: int, seed: int | list[int]
) -> list[list[int]]:
    """n prompts of input_len token ids drawn uniformly from [0, vocab_size), seeded."""
    if input_len < 1:
        raise RequestError(f"input_len must be >= 1, got {input_len}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(n, input_len)).tolist()


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or a .jsonl file (a string or {"prompt": ...} a line)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise RequestError(f"cannot read prompt file {path}: {e.strerror or e}") from None
    prompts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise RequestError(f"{path}:{i}: not JSON ({e.msg})") from None
            item = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(item, str):
                raise RequestError(f'{path}:{i}: expected a string or {{"prompt": "..."}}')
            line = item
        prompts.append(line)
    if not prompts:
        raise RequestError(f"prompt file {path} holds no prompts")
    return prompts


def _vocab_size(llm) -> int:
    """Ids a random prompt may use: the model's vocab, cut to the tokenizer's if that is smaller."""
    v = llm.config.vocab_size
    if llm.tokenizer is not None:
        v = min(v, llm.tokenizer.vocab_size)
    return v


# -- the run ----------------------------------------------------------------------------------------


def run_bench(
    llm,
    batch_size: int,
    input_len: int = 128,
    output_len: int = 64,
    num_prompts: int | None = None,
    prompts: Sequence[Prompt] | None = None,
    seed: int = 0,
    tpot_slo_ms: float | None = None,
    warmup: bool = True,
    progress: bool = False,
    threads: int | None = None,
) -> BenchResult:
    """Serve num_prompts requests (default batch_size), batch_size at a time, and measure them.

    Prompts are `prompts` (cycled) or seeded random ids of input_len tokens. Every request is greedy
    with ignore_eos and max_tokens=output_len. A warm-up request runs first, on other prompts so
    the prefix cache cannot serve the measured ones.
    """
    if batch_size < 1:
        raise RequestError(f"batch_size must be >= 1, got {batch_size}")
    if output_len < 1:
        raise RequestError(f"output_len must be >= 1, got {output_len}")
    num_prompts = batch_size if num_prompts is None else num_prompts
    if num_prompts < 1:
        raise RequestError(f"num_prompts must be >= 1, got {num_prompts}")
    engine = llm.engine
    if batch_size > engine.config.max_num_seqs:
        raise RequestError(
            f"batch_size {batch_size} exceeds the engine's max_num_seqs {engine.config.max_num_seqs}"
        )
    ctx = llm.config.context_len
    if prompts is None:
        if input_len + output_len > ctx:
            raise RequestError(
                f"input_len + output_len = {input_len + output_len} exceeds the model's context of {ctx}"
            )
        prompts = random_prompts(_vocab_size(llm), num_prompts, input_len, seed)
    elif not prompts:
        raise RequestError("no prompts given")
    else:
        prompts = [prompts[i % len(prompts)] for i in range(num_prompts)]

    from .sampling import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    if warmup:  # first-call costs (lazy weight prep, allocator, caches) stay out of the figures
        warm = random_prompts(_vocab_size(llm), 1, min(input_len, ctx - 4), seed=[seed, 1 << 30])
        llm.generate(warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))

    from tqdm import tqdm

    bar = tqdm(
        total=num_prompts * output_len,
        unit="tok",
        desc=f"batch {batch_size}",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )
    with pin_threads(threads) if threads else contextlib.nullcontext(), bar:
        outputs, duration, steps = _drive(engine, prompts, params, batch_size, bar)
    return _summarize(llm, outputs, duration, steps, batch_size, output_len, tpot_slo_ms, threads)


@dataclass(slots=True)
class _Steps:
    n: int = 0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: list[float] = dataclasses.field(default_factory=list)
    decode_tokens: int = 0
    preemptions: int = 0


def _drive(engine, prompts, params, batch_size: int, bar):
    """Keep batch_size requests in the engine until every prompt is served; time each step."""
    pending = deque(prompts)
    live: set[str] = set()
    done = []
    steps = _Steps()
    preempt0 = engine.n_preemptions
    t0 = time.perf_counter()
    try:
        while pending or live:
            while pending and len(live) < batch_size:
                live.add(engine.add_request(pending.popleft(), params))
            prefilled0 = engine.n_prefilled_tokens
            s0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - s0
            steps.n += 1
            n_new = sum(len(out.deltas[0].token_ids) for out in outs if out.deltas)
            bar.update(n_new)
            if engine.n_prefilled_tokens > prefilled0:
                steps.prefill_s += dt
                steps.prefill_tokens += engine.n_prefilled_tokens - prefilled0
            else:
                steps.decode_s.append(dt)
                steps.decode_tokens += n_new
            for out in outs:
                if out.finished:
                    live.discard(out.request_id)
                    done.append(out)
    finally:
        for rid in live:  # an exception (or Ctrl-C) mid-run frees the engine
            engine.abort(rid)
    steps.preemptions = engine.n_preemptions - preempt0
    return done, time.perf_counter() - t0, steps


def _summarize(llm, outputs, duration, steps: _Steps, batch_size, output_len, slo, threads):
    metrics = [o.metrics for o in outputs]
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    n_in = sum(len(o.prompt_token_ids) for o in outputs)
    tpots = [m.tpot for m in metrics if m.tpot is not None]
    goodput = None
    if slo is not None:  # a request with one output token has no TPOT: it meets any target
        good = sum(1 for m in metrics if m.tpot is None or m.tpot * 1e3 <= slo)
        goodput = good / duration
    return BenchResult(
        model=_model_name(llm),
        backend=llm.backend.name,
        threads=threads,
        batch_size=batch_size,
        num_prompts=len(outputs),
        input_len=n_in / len(outputs),
        output_len=output_len,
        n_input_tokens=n_in,
        n_output_tokens=n_out,
        n_cached_tokens=n_in - sum(m.n_prefilled_tokens for m in metrics),
        duration_s=duration,
        ttft_ms=Stats.of_seconds([m.ttft for m in metrics]),
        tpot_ms=Stats.of_seconds(tpots),
        itl_ms=Stats.of_seconds([d for m in metrics for d in m.inter_token_latencies]),
        e2e_ms=Stats.of_seconds([m.e2e for m in metrics]),
        output_tok_s=n_out / duration,
        prefill_tok_s=steps.prefill_tokens / steps.prefill_s if steps.prefill_s > 0 else None,
        decode_tok_s=steps.decode_tokens / sum(steps.decode_s) if steps.decode_s else None,
        request_s=len(outputs) / duration,
        tpot_slo_ms=slo,
        goodput_req_s=goodput,
        n_steps=steps.n,
        decode_step_ms=float(np.mean(steps.decode_s)) * 1e3 if steps.decode_s else None,
        n_preemptions=steps.preemptions,
    )


def _model_name(llm) -> str:
    return Path(llm.checkpoint.path).name


# -- output -----------------------------------------------------------------------------------------

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
    ("engine steps", lambda r: r.n_steps, "{:d}"),
    ("preemptions", lambda r: r.n_preemptions, "{:d}"),
]


def format_table(results: Sequence[BenchResult]) -> str:
    """Metrics as rows, one column per batch size."""
    r0 = results[0]
    slo = f"  TPOT SLO {r0.tpot_slo_ms:g} ms" if r0.tpot_slo_ms is not None else ""
    head = (
        f"model {r0.model}  backend {r0.backend}  threads {r0.threads}  "
        f"output {r0.output_len} tok/request{slo}"
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


# -- command line -----------------------------------------------------------------------------------


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of integers, got {text!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers >= 1, got {text!r}")
    return sizes


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinyserve bench",
        description="Measure TTFT, TPOT, inter-token latency and throughput with N concurrent "
        "requests (a table on stdout, progress on stderr).",
    )
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="catalog name, HF directory or .gguf file (default: the catalog's default model)",
    )
    p.add_argument("--backend", "-b", default="cpu", help="backend name (see `tinyserve backends`)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument(
        "--batch-size",
        type=_batch_sizes,
        default=[1],
        metavar="N[,N...]",
        help="concurrent requests; a comma list sweeps, e.g. 1,8,32 (default 1)",
    )
    p.add_argument(
        "--input-len", type=_positive, default=128, help="random prompt length (default 128)"
    )
    p.add_argument(
        "--output-len", type=_positive, default=64, help="tokens per request (default 64)"
    )
    p.add_argument(
        "--num-prompts",
        type=_positive,
        default=None,
        help="requests per batch size (default: the batch size)",
    )
    p.add_argument(
        "--prompt-file",
        default=None,
        help="prompts, one per line (or .jsonl), instead of random ids",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument(
        "--tpot-slo-ms", type=float, default=50.0, help="TPOT target for goodput (default 50)"
    )
    p.add_argument(
        "--threads",
        type=_positive,
        default=available_cores(),
        help="BLAS / OpenMP threads (default: all cores available)",
    )
    p.add_argument("--max-num-batched-tokens", type=_positive, default=2048)
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up request")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="plot throughput and TPOT against batch size",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """`tinyserve bench ...`: returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a bad value (argparse printed why)
        return int(e.code or 0)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401  (fail now, not after minutes of measuring)
        except ImportError:
            print(
                "tinyserve bench: error: --plot needs matplotlib (pip install matplotlib)",
                file=sys.stderr,
            )
            return 2
    try:
        prompts = read_prompt_file(args.prompt_file) if args.prompt_file else None
        with pin_threads(args.threads):
            from .api import LLM

            llm = LLM(
                args.model,
                backend=args.backend,
                device=args.device,
                dtype=args.dtype,
                max_num_seqs=max(64, *args.batch_size),
                max_num_batched_tokens=args.max_num_batched_tokens,
                seed=args.seed,
            )
            results = []
            for i, bs in enumerate(args.batch_size):
                results.append(
                    run_bench(
                        llm,
                        bs,
                        args.input_len,
                        args.output_len,
                        num_prompts=args.num_prompts,
                        prompts=prompts,
                        seed=args.seed + i,
                        tpot_slo_ms=args.tpot_slo_ms,
                        warmup=not args.no_warmup and i == 0,
                        progress=not args.no_progress,
                        threads=args.threads,
                    )
                )
    except TinyServeError as e:
        print(f"tinyserve bench: error: {e}", file=sys.stderr)
        return 1
    print(to_json(results) if args.json else format_table(results))
    if args.plot is not None:
        plot(results, args.plot)
        print(f"tinyserve bench: wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
