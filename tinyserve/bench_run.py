"""Benchmark runs: TTFT, TPOT, inter-token latency and throughput from the engine's own metrics.

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
    mask     with --structured: time the grammar engine spent on the token masks of a decode
             step (all its constrained rows together), mean over decode steps
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RequestError

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
    structured: bool = False  # every request under structured_bench_params' JSON schema
    mask_ms_per_step: float | None = None  # grammar mask time of a decode step (structured only)
    acceptance_rate: float | None = None  # speculative decoding: proposals kept / proposed
    mean_accepted_length: float | None = None  # tokens a verifying step yields (kept + 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- thread pinning ---------------------------------------------------------------------------------


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def thread_options(backend: str, n: int) -> dict:
    """The backend_options that size a backend's own kernel pool to n threads (the cpu
    backend's num_threads); other backends' threads are BLAS's or the device's."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    return {"num_threads": n} if backend == "cpu" else {}


@contextlib.contextmanager
def pin_threads(n: int) -> Iterator[None]:
    """Limit BLAS and OpenMP pools to n threads (threadpoolctl) for the duration, so runs on one
    machine are comparable; a backend's own pool is sized when it is made (thread_options)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
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


def structured_bench_params(output_len: int):
    """The --structured case: an array of objects (an integer, a free string, an enum) that
    needs more than output_len tokens to close, so every request still runs output_len tokens."""
    from .structured import StructuredOutputsParams

    item = {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "kind": {"enum": ["a", "b", "c"]},
        },
        "required": ["id", "name", "kind"],
        "additionalProperties": False,
    }
    return StructuredOutputsParams(json={"type": "array", "items": item, "minItems": output_len})


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
    structured=None,
) -> BenchResult:
    """Serve num_prompts requests (default batch_size), batch_size at a time, and measure them.

    Prompts are `prompts` (cycled) or seeded random ids of input_len tokens. Every request is greedy
    with ignore_eos and max_tokens=output_len. A warm-up request runs first, on other prompts so
    the prefix cache cannot serve the measured ones. `threads` pins BLAS during the run; the
    backend's own pool was sized when it was made (LLM(..., backend_options=thread_options(...))).
    `structured` (StructuredOutputsParams, e.g. structured_bench_params) constrains every request.
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

    params = SamplingParams(
        max_tokens=output_len, temperature=0.0, ignore_eos=True, structured_outputs=structured
    )
    if warmup:  # first-call costs (lazy weight prep, allocator, caches) stay out of the figures
        warm = random_prompts(_vocab_size(llm), 1, min(input_len, ctx - 4), seed=[seed, 1 << 30])
        llm.generate(warm, dataclasses.replace(params, max_tokens=4))

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
    result = _summarize(llm, outputs, duration, steps, batch_size, output_len, tpot_slo_ms, threads)
    if structured is None or not steps.decode_s:
        return dataclasses.replace(result, structured=structured is not None)
    mask_ms = steps.decode_mask_s / len(steps.decode_s) * 1e3
    return dataclasses.replace(result, structured=True, mask_ms_per_step=mask_ms)


@dataclass(slots=True)
class _Steps:
    n: int = 0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: list[float] = dataclasses.field(default_factory=list)
    decode_tokens: int = 0
    decode_mask_s: float = 0.0  # of the decode steps' time: the grammar engine's masks
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
            prefilled0, mask0 = engine.n_prefilled_tokens, engine.mask_seconds
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
                steps.decode_mask_s += engine.mask_seconds - mask0
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
        **_speculation(metrics),
    )


def _speculation(metrics) -> dict:
    """acceptance_rate and mean_accepted_length over all requests (None without speculation)."""
    drafted = sum(m.n_draft_tokens for m in metrics)
    kept = sum(m.n_accepted_tokens for m in metrics)
    verifying = sum(m.n_spec_steps for m in metrics)
    if not verifying:
        return {}
    return {
        "acceptance_rate": kept / drafted if drafted else None,
        "mean_accepted_length": (kept + verifying) / verifying,
    }


def _model_name(llm) -> str:
    return Path(llm.checkpoint.path).name
