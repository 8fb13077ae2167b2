"""lm-eval-harness against `tinyserve serve`: its `local-completions` model scores a small local
multiple-choice task (tests/lm_eval/) through echo + logprobs, with the server's own tokenizer
endpoints (no hub download).

Oracle: each loglikelihood lm-eval reports equals the library's, the sum of
LLM.generate(..., prompt_logprobs) over the continuation's tokens on a second LLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import default_model_gguf

pytest.importorskip("lm_eval")
pytest.importorskip("aiohttp")

from tinyserve import LLM, SamplingParams

TASKS = Path(__file__).parent / "lm_eval"


def _serve(model: Path):
    """`tinyserve serve` on a free loopback port; returns the process and its base URL."""
    cmd = [sys.executable, "-m", "tinyserve.cli", "serve", "--model", str(model), "--port", "0"]
    proc = subprocess.Popen(
        cmd + ["--served-model-name", "tiny"], stderr=subprocess.PIPE, text=True
    )
    for line in proc.stderr:
        if "Uvicorn running on" in line:
            return proc, line.split("running on ")[1].split()[0]
    proc.wait(10)
    raise AssertionError("tinyserve serve did not start")


def _library_loglikelihood(llm: LLM, context: str, continuation: str) -> float:
    """As lm-eval's causal models encode a pair: trailing spaces of the context move to the
    continuation; the whole is encoded and split at the context's length."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    encode = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)
    whole, n_ctx = encode(context + continuation), len(encode(context))
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    scored = llm.generate([whole], params)[0].prompt_logprobs
    return sum(scored[t][whole[t]] for t in range(n_ctx, len(whole)))


@pytest.mark.real_model
def test_lm_eval_loglikelihoods_equal_the_library(tmp_path):
    model = default_model_gguf()
    proc, url = _serve(model)
    try:
        args = f"model=tiny,base_url={url}/v1/completions,num_concurrent=1,max_retries=1"
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        run = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions",
             "--model_args", args, "--tasks", "tinyserve_mc", "--include_path", str(TASKS),
             "--output_path", str(tmp_path), "--log_samples"],
            cwd=TASKS, env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()
    assert run.returncode == 0, run.stderr[-3000:]
    (samples,) = tmp_path.rglob("samples_tinyserve_mc_*.jsonl")
    docs = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(docs) == 4
    llm = LLM(str(model), backend="cpu")
    diffs = []
    for doc in docs:
        pairs = [(a["arg_0"], a["arg_1"]) for a in doc["arguments"].values()]
        for (context, continuation), resp in zip(pairs, doc["resps"]):
            got = float(resp[0][0])
            diffs.append(abs(got - _library_loglikelihood(llm, context, continuation)))
    print(f"lm-eval vs library loglikelihoods: {len(diffs)} pairs, max abs diff {max(diffs):.2e}")
    assert len(diffs) == 12 and max(diffs) < 1e-3
