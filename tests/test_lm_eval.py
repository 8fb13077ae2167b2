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
        cmd + ["--served-model-name", "tiny"],
        stdout=subprocess.DEVNULL,  # uvicorn's access log
        stderr=subprocess.PIPE,
        text=True,
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


# lm-eval's own entry point with its TaskManager told to index only tests/lm_eval: its CLI
# indexes the thousands of built-in tasks first, most of a minute on 2 cores
_RUN = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

url, tasks = sys.argv[1], sys.argv[2]
results = lm_eval.simple_evaluate(
    model="local-completions",
    model_args=f"model=tiny,base_url={url}/v1/completions,num_concurrent=1,max_retries=1",
    tasks=["tinyserve_mc"],
    task_manager=TaskManager(include_path=tasks, include_defaults=False),
    log_samples=True,
)
scored = [
    (args[0], args[1], float(resp[0][0]))
    for doc in results["samples"]["tinyserve_mc"]
    for args, resp in zip(doc["arguments"], doc["resps"])
]
print(json.dumps({"acc": results["results"]["tinyserve_mc"]["acc,none"], "scored": scored}))
"""


@pytest.mark.real_model
def test_lm_eval_loglikelihoods_equal_the_library():
    model = default_model_gguf()
    proc, url = _serve(model)
    try:
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        run = subprocess.run(
            [sys.executable, "-c", _RUN, url, str(TASKS)],
            cwd=TASKS.parent.parent, env=env, capture_output=True, text=True, timeout=300,
            check=False,
        )  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(report["scored"]) == 12  # 4 questions x 3 choices
    llm = LLM(str(model), backend="cpu")
    diffs = [
        abs(got - _library_loglikelihood(llm, context, continuation))
        for context, continuation, got in report["scored"]
    ]
    print(f"lm-eval vs library: {len(diffs)} loglikelihoods, max abs diff {max(diffs):.2e}")
    assert max(diffs) < 1e-3
