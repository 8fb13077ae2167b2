"""`tinyserve bench`: measure a model at one or more batch sizes and print the figures.

bench_run.py measures (its docstring defines every figure) and bench_report.py writes the table,
JSON and plot; both are re-exported here, so `tinyserve.bench` stays the one import for scripts,
asv and `tinyserve bench` (cli.py calls main(argv)).
"""

from __future__ import annotations

import argparse
import sys

from .bench_report import format_table, plot, to_json
from .bench_run import (
    BenchResult,
    Prompt,
    Stats,
    available_cores,
    pin_threads,
    random_prompts,
    read_prompt_file,
    run_bench,
    structured_bench_params,
    thread_options,
)
from .cli import add_model_args
from .errors import TinyServeError

__all__ = [
    "BenchResult",
    "Prompt",
    "Stats",
    "available_cores",
    "build_parser",
    "format_table",
    "main",
    "pin_threads",
    "plot",
    "random_prompts",
    "read_prompt_file",
    "run_bench",
    "structured_bench_params",
    "thread_options",
    "to_json",
]


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
    add_model_args(p)
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
        help="BLAS / kernel threads (default: all cores available)",
    )
    p.add_argument("--max-num-batched-tokens", type=_positive, default=2048)
    p.add_argument(
        "--structured",
        action="store_true",
        help="constrain every request to a JSON schema (structured output) and report the "
        "grammar mask's cost per decode step",
    )
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
                tensor_parallel_size=args.tensor_parallel_size,
                speculative_config=args.speculative_config,
                enforce_eager=args.enforce_eager,
                backend_options=thread_options(args.backend, args.threads),
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
                        structured=(
                            structured_bench_params(args.output_len) if args.structured else None
                        ),
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
