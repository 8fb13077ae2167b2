"""Speculative decoding (tinyserve/speculative.py): ngram proposals verified in one forward.

Oracles: the tokens (and their logprobs) of plain decoding, greedy and seeded sampling alike, on
every backend, batched with requests that do not speculate, with n > 1, stop strings, max_tokens
and preemption; a chi-square test of the first sampled token against the model's own
probabilities; after many rejections no KV block stays in use and the prefix cache holds only
tokens that were kept."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_chi_square_fits

from tinyserve import LLM, SamplingParams
from tinyserve.errors import RequestError
from tinyserve.sampling import apply_penalties, filtered_probs
from tinyserve.speculative import NgramProposer

NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
}
# prompts that repeat themselves (proposals every step) and ones that do not
LOOP = [5, 6, 7, 8, 9] * 6
PROMPTS = [LOOP, [11, 12, 13, 14] * 5 + [11], [3, 90, 41, 7, 200, 18, 66]]


def _tokens(outs):
    return [[o.token_ids for o in out.outputs] for out in outs]


# -- the proposer and its config -------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_occurrence():
    p = NgramProposer(k=3, min_n=1, max_n=3)
    assert p.propose([1, 2, 3, 4, 9, 1, 2, 3], limit=10) == [4, 9, 1]
    assert p.propose([1, 2, 3, 4, 9, 1, 2, 3], limit=2) == [4, 9]
    assert p.propose([1, 2, 3, 4, 5], limit=10) == []  # no n-gram recurs
    # the longest n first: "7 8" recurs followed by 1, "8" alone later by 5
    assert NgramProposer(1, 1, 2).propose([7, 8, 1, 3, 8, 5, 7, 8], 10) == [1]
    # of several occurrences, the latest with k tokens after it
    assert NgramProposer(2, 2, 2).propose([4, 4, 1, 2, 4, 4, 3, 5, 4, 4], 10) == [3, 5]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"method": "eagle"}, "not supported"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens must be an int >= 1"),
        ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min must be <="),
        ({"k": 3}, "unknown speculative_config field"),
    ],
)
def test_bad_speculative_config_is_a_request_error(bad, match, make_llm):
    with pytest.raises(RequestError, match=match):
        make_llm(speculative_config=bad)


# -- exactness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "cpu", "torch"])
def test_greedy_equals_plain_decoding(make_llm, backend):
    if backend == "torch":
        pytest.importorskip("torch")
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2)
    plain = make_llm(backend=backend).generate(PROMPTS, params)
    spec = make_llm(backend=backend, speculative_config=NGRAM)
    fast = spec.generate(PROMPTS, params)
    assert _tokens(fast) == _tokens(plain)
    for a, b in zip(fast, plain):  # the accepted tokens' logprobs are the plain ones
        np.testing.assert_allclose(
            [lp[t] for lp, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)],
            [lp[t] for lp, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)],
            rtol=1e-4,
            atol=1e-4,
        )
    assert spec.engine.n_accepted_tokens > 0, "the repeating prompts never had a proposal kept"
    assert spec.engine.kv_manager.n_used_blocks == 0


def test_greedy_argmax_path_equals_plain_decoding(make_llm):
    """Greedy rows without logprobs take the backend's on-device argmax, proposals included."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = make_llm(backend="cpu").generate(PROMPTS, params)
    fast = make_llm(backend="cpu", speculative_config=NGRAM).generate(PROMPTS, params)
    assert _tokens(fast) == _tokens(plain)
    m = fast[0].metrics
    assert m.n_draft_tokens > 0 and 0 < m.acceptance_rate <= 1
    assert m.mean_accepted_length == pytest.approx(
        (m.n_accepted_tokens + m.n_spec_steps) / m.n_spec_steps
    )


def test_seeded_sampling_equals_plain_decoding(make_llm):
    """Each kept token is drawn from the same row, with the same generator draw, as plain
    decoding draws it: the same seed gives the same tokens."""
    params = SamplingParams(
        max_tokens=24,
        temperature=0.9,
        top_p=0.95,
        seed=7,
        n=2,
        ignore_eos=True,
        repetition_penalty=1.1,
    )
    plain = make_llm().generate(PROMPTS, params)
    fast = make_llm(speculative_config=NGRAM).generate(PROMPTS, params)
    assert _tokens(fast) == _tokens(plain)


def test_stops_max_tokens_and_preemption(make_llm):
    """A stop token inside a run of kept proposals ends the output there; max_tokens is never
    passed; a tiny cache preempts (proposals dropped, recomputed) and changes nothing."""
    loop_next = make_llm().generate([LOOP], SamplingParams(max_tokens=3, temperature=0))
    stop_at = loop_next[0].outputs[0].token_ids[1]
    cases = [
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(stop_at,)),
    ]
    for params in cases:
        want = _tokens(make_llm().generate(PROMPTS, params))
        got = make_llm(speculative_config=NGRAM).generate(PROMPTS, params)
        assert _tokens(got) == want
        assert all(len(o.outputs[0].token_ids) <= params.max_tokens for o in got)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = _tokens(make_llm().generate(PROMPTS * 2, params))
    small = make_llm(speculative_config=NGRAM, kv_cache_tokens=96, block_size=8)
    got = small.generate(PROMPTS * 2, params)
    assert _tokens(got) == want
    assert small.engine.n_preemptions > 0, "the cache was big enough: nothing was preempted"
    assert small.engine.kv_manager.n_used_blocks == 0


def test_stop_strings_cut_inside_kept_proposals(make_llm):
    """A stop string completed by a kept proposal ends the text there, as in plain decoding."""
    prompt = "the cat sat on the mat and the cat sat on the mat and the cat sat on the"
    free = make_llm().generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0]
    text = free.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), repr(text)
    params = SamplingParams(max_tokens=24, temperature=0, stop=(stop,))
    want = make_llm().generate([prompt, prompt[:30]], params)
    got = make_llm(speculative_config=NGRAM).generate([prompt, prompt[:30]], params)
    for a, b in zip(got, want):
        assert (a.outputs[0].text, a.outputs[0].finish_reason) == (
            b.outputs[0].text,
            b.outputs[0].finish_reason,
        )
    assert want[0].outputs[0].finish_reason == "stop"


def test_rejections_roll_back_the_cache(make_llm):
    """Sampling at a high temperature rejects most proposals: afterwards no block is in use, and
    every block the prefix cache holds is a run of tokens some request kept."""
    llm = make_llm(speculative_config=NGRAM, block_size=4)
    params = SamplingParams(max_tokens=40, temperature=1.5, seed=3, n=3, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    kv, e = llm.engine.kv_manager, llm.engine
    assert e.n_draft_tokens > 2 * e.n_accepted_tokens, "too few rejections to test a rollback"
    assert kv.n_used_blocks == 0
    kept = [out.prompt_token_ids + o.token_ids for out in outs for o in out.outputs]
    by_key = {key: (parent, tokens) for key, parent, tokens in kv.block_key.values()}
    assert by_key, "nothing was cached"
    for key in by_key:
        chain = []
        while key is not None:
            key, tokens = by_key[key]
            chain[:0] = tokens
        assert any(ids[: len(chain)] == list(chain) for ids in kept), chain


def test_first_sampled_token_follows_the_model(make_llm):
    """Chi-square: the first token sampled at a verifying step (a request's second output token:
    the first comes from the prompt's row), over many seeds, against the model's probabilities
    for that row, given the first token (the most frequent one)."""
    temp = 1.0
    llm = make_llm(speculative_config={**NGRAM, "num_speculative_tokens": 2})
    prompt = [84, *LOOP]  # the fixture's likeliest next token (84, p ~ 0.5) recurs in it
    n = 1000
    outs = llm.generate(
        [prompt] * n, [SamplingParams(max_tokens=3, temperature=temp, seed=s) for s in range(n)]
    )
    assert llm.engine.n_draft_tokens > 0
    firsts = np.array([o.outputs[0].token_ids[0] for o in outs])
    t0 = int(np.bincount(firsts).argmax())
    seconds = [o.outputs[0].token_ids[1] for o, f in zip(outs, firsts) if f == t0]
    context = [*prompt, t0]
    assert llm.engine.proposer.propose(context, 10), "no proposal after the first token"
    p = SamplingParams(temperature=temp)
    logits = llm.logits(context)[-1].astype(np.float64)
    probs = filtered_probs(apply_penalties(logits, p, prompt, [t0]), p)
    assert len(seconds) >= 200, len(seconds)
    assert_chi_square_fits(np.bincount(seconds, minlength=len(probs)), probs, min_df=3)


@pytest.mark.real_model
def test_real_model_repeats_code_with_few_steps():
    """On the real default model, code whose lines repeat: plain decoding's greedy tokens, in
    fewer engine steps (most proposals kept). The cpu backend on one thread: its rows' numerics
    then do not depend on how many rows share a step (on more threads one sequence's keys are
    split by thread count, issue 17, and a near-tie may flip between 1 and k + 1 rows, as it may
    between alone and batched)."""
    from conftest import default_model_gguf

    path = default_model_gguf()
    code = "def add(a, b):\n    return a + b\n\n" * 3
    params = SamplingParams(max_tokens=64, temperature=0)
    config = {**NGRAM, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    one_thread = {"num_threads": 1, "adapt_threads": False}
    want = LLM(path, backend_options=one_thread).generate([code], params)[0]
    spec = LLM(path, backend_options=one_thread, speculative_config=config)
    got = spec.generate([code], params)[0]
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert got.metrics.acceptance_rate > 0.5
    assert spec.engine.n_steps < 0.6 * len(want.outputs[0].token_ids)


# -- a draft model as proposer --------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_draft_model_gives_plain_decodings_tokens(make_llm, tiny_dir, backend):
    """The target as its own draft: every greedy proposal is kept; a different draft (another
    random model of the same vocabulary) has most rejected; either way plain decoding's tokens,
    greedy and seeded, and both caches empty afterwards."""
    for draft, greedy_acceptance in ((tiny_dir, 1.0), (tiny_dir.parent / "llama", None)):
        config = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}
        spec = make_llm(backend=backend, speculative_config=config)
        for params in (
            SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=16, temperature=0.8, seed=3, n=2, ignore_eos=True),
        ):
            want = _tokens(make_llm(backend=backend).generate(PROMPTS, params))
            got = spec.generate(PROMPTS, params)
            assert _tokens(got) == want
            if params.greedy and greedy_acceptance is not None:
                assert got[0].metrics.acceptance_rate == greedy_acceptance
        proposer = spec.engine.proposer
        assert spec.engine.n_draft_tokens > 0
        assert spec.engine.kv_manager.n_used_blocks == 0
        assert proposer.kv_manager.n_used_blocks == 0 and not proposer.mirrors


def test_draft_model_of_another_vocabulary_is_refused(make_llm, tiny_dir):
    config = {"method": "draft_model", "model": str(tiny_dir.parent / "qwen3")}
    with pytest.raises(RequestError, match="vocabulary of 512, the target 384"):
        make_llm(speculative_config=config)
    with pytest.raises(RequestError, match='"model" names the draft model'):
        make_llm(speculative_config={"method": "ngram", "model": str(tiny_dir)})


# -- the command line ------------------------------------------------------------------------------


def test_cli_speculative_config(capsys):
    from conftest import TINY

    from tinyserve.cli import main

    prompt = "the cat sat on the mat and the cat sat on the mat and the cat"
    args = ["generate", prompt, "--model", str(TINY), "-b", "numpy", "--max-tokens", "16"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative-config", '{"method": "ngram", "prompt_lookup_min": 1}']) == 0
    assert capsys.readouterr().out == plain
    for bad in ("{not json", "[1, 2]"):
        with pytest.raises(SystemExit) as e:
            main([*args, "--speculative-config", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "--speculative-config" in err[-1]
    assert main([*args, "--speculative-config", '{"method": "medusa"}']) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "medusa" in err[0]
