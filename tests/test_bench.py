"""tinyserve bench on the tiny smollm2 fixture: the table, --json, --plot, and the figures' arithmetic.

Oracles: token counts against batch * output_len (ignore_eos fixes them); the pooled inter-token
mean against the per-request TPOT mean (equal for equal-length requests, computed two ways); the
run's duration against a stopwatch around it; prompt lengths against the tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tinyserve import LLM
from tinyserve.bench import (
    Stats,
    main,
    pin_threads,
    read_prompt_file,
    run_bench,
    thread_options,
)
from tinyserve.errors import RequestError

FIXTURE = str(Path(__file__).parent / "fixtures" / "hf" / "smollm2")
ARGS = [
    "--model",
    FIXTURE,
    "--backend",
    "numpy",
    "--input-len",
    "16",
    "--output-len",
    "8",
    "--no-progress",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(FIXTURE, backend="numpy")


def test_table_for_batch_1_and_4(capsys):
    assert main([*ARGS, "--batch-size", "1,4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "backend numpy" in lines[0]
    assert lines[1].split() == ["batch", "1", "batch", "4"]
    rows = {line[:24].strip(): line[24:].split() for line in lines[2:]}
    assert rows["requests"] == ["1", "4"]
    assert rows["output tokens"] == ["8", "32"]
    assert float(rows["TPOT mean (ms)"][0]) > 0


def test_json_keys_and_sane_values(capsys):
    assert main([*ARGS, "--batch-size", "1,4", "--json", "--tpot-slo-ms", "1e9"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["batch_size"] for r in results] == [1, 4]
    for r in results:
        assert {
            "ttft_ms",
            "tpot_ms",
            "itl_ms",
            "e2e_ms",
            "output_tok_s",
            "prefill_tok_s",
            "decode_tok_s",
            "request_s",
            "goodput_req_s",
            "duration_s",
            "n_output_tokens",
        } <= r.keys()
        assert set(r["tpot_ms"]) == {"mean", "p50", "p99"}
        bs = r["batch_size"]
        assert r["num_prompts"] == bs
        assert r["n_output_tokens"] == bs * 8  # ignore_eos: exactly output_len each
        assert r["n_input_tokens"] == bs * 16
        assert r["tpot_ms"]["mean"] > 0 and r["ttft_ms"]["mean"] > 0
        assert r["tpot_ms"]["p50"] <= r["tpot_ms"]["p99"]
        assert r["output_tok_s"] == pytest.approx(r["n_output_tokens"] / r["duration_s"])
        assert r["request_s"] * r["duration_s"] == pytest.approx(bs)
        assert r["goodput_req_s"] == pytest.approx(r["request_s"])  # every request meets 1e9 ms
        assert r["n_cached_tokens"] == 0  # random prompts, warm-up on other ids


def test_plot_writes_png(tmp_path, capsys):
    png = tmp_path / "sweep.png"
    assert main([*ARGS, "--batch-size", "1,2", "--output-len", "3", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000


def test_itl_mean_is_tpot_mean_and_duration_is_wall_time(llm):
    import time

    t0 = time.perf_counter()
    r = run_bench(llm, batch_size=3, input_len=10, output_len=6, seed=1, warmup=False)
    wall = time.perf_counter() - t0
    # TPOT is each request's mean gap; with equal lengths the mean of means is the pooled mean
    assert r.itl_ms.mean == pytest.approx(r.tpot_ms.mean, rel=1e-9)
    assert 0 < r.duration_s <= wall
    assert r.e2e_ms.p99 <= r.duration_s * 1e3
    assert r.ttft_ms.mean < r.e2e_ms.mean
    assert r.n_steps == 6  # all three prefill together, then 5 batched decode steps
    # each decode step samples one token per request: 3 tokens per mean decode step
    assert r.decode_tok_s == pytest.approx(3 / (r.decode_step_ms / 1e3), rel=1e-9)


def test_closed_loop_serves_num_prompts(llm):
    r = run_bench(llm, batch_size=2, input_len=8, output_len=4, num_prompts=5, seed=2, warmup=False)
    assert (r.num_prompts, r.n_output_tokens, r.n_input_tokens) == (5, 20, 40)
    # at most 2 in flight: 3 waves of 4 steps (the third has one request), never fewer
    assert r.n_steps >= 3 * 4


def test_goodput_counts_requests_under_the_slo(llm):
    r = run_bench(
        llm, batch_size=2, input_len=8, output_len=4, tpot_slo_ms=1e-6, seed=3, warmup=False
    )
    assert r.goodput_req_s == 0.0
    r = run_bench(llm, batch_size=2, input_len=8, output_len=4, seed=4, warmup=False)
    assert r.goodput_req_s is None


def test_prompt_file_lengths_come_from_the_tokenizer(llm, tmp_path):
    texts = ["hello world", "the quick brown fox jumps", "a"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": t}) for t in texts) + "\n\n")
    prompts = read_prompt_file(path)
    assert prompts == texts
    r = run_bench(llm, batch_size=3, output_len=2, prompts=prompts, warmup=False)
    lens = [len(llm.tokenizer.encode(t)) for t in texts]
    assert r.n_input_tokens == sum(lens)
    assert r.input_len == pytest.approx(np.mean(lens))


def test_stats_percentiles():
    s = Stats.of_seconds([0.004, 0.001, 0.003, 0.002])
    assert (s.mean, s.p50) == pytest.approx((2.5, 2.5))
    assert 3.9 < s.p99 <= 4.0
    assert Stats.of_seconds([]) == Stats(None, None, None)


def test_pin_threads_limits_blas_and_leaves_the_environment():
    from threadpoolctl import threadpool_info

    env, before = dict(os.environ), [p["num_threads"] for p in threadpool_info()]
    with pin_threads(1):
        assert all(p["num_threads"] == 1 for p in threadpool_info())
        assert dict(os.environ) == env
    assert [p["num_threads"] for p in threadpool_info()] == before
    with pytest.raises(ValueError, match="threads"), pin_threads(0):
        pass


def test_thread_options_size_the_cpu_backends_pool():
    assert thread_options("numpy", 2) == {}
    with pytest.raises(ValueError, match="threads"):
        thread_options("cpu", 0)
    llm = LLM(FIXTURE, backend="cpu", backend_options=thread_options("cpu", 1))
    if llm.backend.name != "cpu":
        pytest.skip("native kernels not built")
    assert llm.backend.num_threads == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "batch sizes must be integers >= 1"),
        (["--batch-size", "1,x"], "comma list of integers"),
        (["--output-len", "300"], "exceeds the model's context of 256"),
        (["--prompt-file", "/nonexistent/prompts.txt"], "cannot read prompt file"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    assert main([*ARGS, *argv]) != 0
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_run_bench_rejects_bad_values(llm):
    with pytest.raises(RequestError, match="batch_size"):
        run_bench(llm, batch_size=0)
    with pytest.raises(RequestError, match="max_num_seqs"):
        run_bench(llm, batch_size=10_000)
    with pytest.raises(RequestError, match="no prompts"):
        run_bench(llm, batch_size=1, prompts=[])


def test_tinyserve_bench_subcommand(capsys):
    from tinyserve.cli import main as cli_main

    assert cli_main(["bench", *ARGS, "--batch-size", "2", "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)["results"]
    assert (r["batch_size"], r["n_output_tokens"]) == (2, 16)
    assert cli_main(["bench", "--help"]) == 0
    assert "--tpot-slo-ms" in capsys.readouterr().out


def test_structured_case_reports_the_mask_cost_per_step(llm, capsys):
    pytest.importorskip("llguidance")
    from tinyserve.bench import structured_bench_params

    so = structured_bench_params(8)
    r = run_bench(llm, 2, 16, 8, structured=so, warmup=False)
    assert r.n_output_tokens == 2 * 8  # the schema cannot close within output_len: none ends early
    assert r.structured and r.mask_ms_per_step > 0
    assert r.mask_ms_per_step < r.decode_step_ms  # the mask is timed inside the step
    free = run_bench(llm, 2, 16, 8, warmup=False)
    assert not free.structured and free.mask_ms_per_step is None
    assert main([*ARGS, "--batch-size", "2", "--structured"]) == 0
    table = capsys.readouterr().out
    assert "mask / step (ms)" in table and "structured JSON" in table
