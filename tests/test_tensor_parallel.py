"""Tensor parallelism on the torch backend (tinyserve/backends/torch_tp.py): two CPU ranks over
gloo give the logits and tokens of one rank, for dense GQA (Llama, Qwen3), expert-parallel MoE
(Mixtral) and MLA (DeepSeek-V3, heads split, latent whole), batched, over the paged cache with
prefix sharing; heads that do not split are a ConfigError before any process starts."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from tinyserve import LLM, SamplingParams
from tinyserve.errors import BackendError, ConfigError

HF = Path(__file__).parent / "fixtures" / "hf"
PROMPTS = [[3, 5, 7, 9, 11, 13, 17, 19, 23, 29, 31], [2, 4, 6, 8, 10], [3, 5, 7, 9, 11, 13, 4]]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["llama", "qwen3", "mixtral", "deepseek_v3"])
def test_two_ranks_equal_one(name):
    """Logits within 1e-5 of the largest logit, and the same greedy tokens for prompts batched
    together, two of them sharing a prefix (its blocks shared in the paged cache)."""
    one = LLM(HF / name, backend="torch")
    two = LLM(HF / name, backend="torch", tensor_parallel_size=2)
    try:
        assert two.backend.lowering(two.engine.model) == "torch decoder stack"
        for ids in PROMPTS[:2]:
            want, got = one.logits(ids), two.logits(ids)
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        want = [o.outputs[0].token_ids for o in one.generate(PROMPTS, params)]
        got = [o.outputs[0].token_ids for o in two.generate(PROMPTS, params)]
        assert got == want
    finally:
        two.backend.close()


def test_heads_that_do_not_split_are_a_config_error():
    before = len(multiprocessing.active_children())
    with pytest.raises(ConfigError, match="tensor_parallel_size 3 does not divide"):
        LLM(HF / "llama", backend="torch", tensor_parallel_size=3)
    assert len(multiprocessing.active_children()) == before  # refused before starting a rank


def test_tensor_parallelism_is_the_torch_backends():
    with pytest.raises(BackendError, match="torch backend"):
        LLM(HF / "llama", backend="numpy", tensor_parallel_size=2)


def test_closing_stops_the_ranks():
    llm = LLM(HF / "llama", backend="torch", tensor_parallel_size=2)
    workers = list(llm.backend.tp.workers)
    assert workers and all(p.is_alive() for p in workers)
    llm.backend.close()
    assert not any(p.is_alive() for p in workers)
