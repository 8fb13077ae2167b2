"""The sampler: each filter against a direct computation, seeds, penalties, stops, logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from tinyserve.errors import RequestError
from tinyserve.sampling import (
    SamplingParams,
    TokenRules,
    apply_penalties,
    filtered_probs,
    log_softmax,
    sample_row,
)


def _logits(seed=0, V=50):
    return np.random.default_rng(seed).standard_normal(V).astype(np.float32) * 3


def test_greedy_is_argmax_and_ignores_the_rng():
    x = _logits()
    p = SamplingParams(temperature=0)
    picks = {sample_row(x, p, np.random.default_rng(s), [], []).token_id for s in range(5)}
    assert picks == {int(np.argmax(x))}


def test_top_k_top_p_min_p_match_a_direct_computation():
    x = _logits(1).astype(np.float64)
    probs = np.exp(x / 0.7 - (x / 0.7).max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    # top-k 5
    got = filtered_probs(x, SamplingParams(temperature=0.7, top_k=5))
    assert set(np.nonzero(got)[0]) == set(order[:5])
    np.testing.assert_allclose(got[order[:5]], probs[order[:5]] / probs[order[:5]].sum(), rtol=1e-6)
    # top-p 0.6: the smallest prefix of the sorted distribution with mass >= 0.6
    got = filtered_probs(x, SamplingParams(temperature=0.7, top_p=0.6))
    k = int(np.searchsorted(np.cumsum(probs[order]), 0.6) + 1)
    assert set(np.nonzero(got)[0]) == set(order[:k])
    # min-p 0.2: tokens at least 0.2 x the top one
    got = filtered_probs(x, SamplingParams(temperature=0.7, min_p=0.2))
    assert set(np.nonzero(got)[0]) == set(np.nonzero(probs >= 0.2 * probs.max())[0])


def test_sampling_follows_the_distribution():
    x = np.log(np.array([0.5, 0.3, 0.2, 1e-9], dtype=np.float32))
    p = SamplingParams(temperature=1.0)
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_row(x, p, rng, [], []).token_id for _ in range(4000)], minlength=4)
    np.testing.assert_allclose(counts / 4000, [0.5, 0.3, 0.2, 0.0], atol=0.03)


def test_same_seed_same_tokens():
    x = _logits(2)
    p = SamplingParams(temperature=1.0, seed=5)
    a = [sample_row(x, p, np.random.default_rng(5), [], []).token_id for _ in range(1)]
    b = [sample_row(x, p, np.random.default_rng(5), [], []).token_id for _ in range(1)]
    assert a == b


def test_penalties_follow_their_definitions():
    x = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = apply_penalties(x.copy(), SamplingParams(repetition_penalty=2.0), [0], [1])
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, 0.5])
    out = apply_penalties(
        x.copy(), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [2], [3, 3, 0]
    )
    np.testing.assert_allclose(out, [2.0 - 0.25 - 0.5, -2.0, 1.0, 0.5 - 0.5 - 0.5])


def test_logprobs_are_the_model_distribution():
    x = _logits(3)
    s = sample_row(x, SamplingParams(temperature=0, logprobs=3), np.random.default_rng(0), [], [])
    ref = log_softmax(x.astype(np.float64))
    top = np.argsort(-ref)[:3]
    assert list(s.top_logprobs) == top.tolist()
    np.testing.assert_allclose(list(s.top_logprobs.values()), ref[top], rtol=1e-5)
    assert s.logprob == pytest.approx(ref[s.token_id], rel=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"logit_bias": {3: 101}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"bad_words": [""]}, "bad_words"),
        ({"top_k": 0}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"n": 0}, "n must"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logprobs": 99}, "logprobs"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_params_raise(kw, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kw)


def test_unknown_field_is_refused():
    with pytest.raises(RequestError, match="unknown sampling field"):
        SamplingParams.from_dict({"temprature": 0.5})
    with pytest.raises(TypeError):
        SamplingParams(temprature=0.5)
    assert SamplingParams.from_dict({"temperature": 0.5, "stop": ["x"]}).stop == ("x",)


# -- through the engine -----------------------------------------------------------------------


def test_stop_strings_cut_the_text(make_llm):
    llm = make_llm()
    free = llm.generate("hello", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[
        0
    ].outputs[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    out = llm.generate(
        "hello", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    )[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.text == free.text[: free.text.index(stop)]
    # streaming never shows the stop string, even partially
    streamed = "".join(
        d.text
        for d in llm.stream(
            "hello", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
        )
    )
    assert streamed == c.text


def test_stop_token_ids_eos_and_length(make_llm):
    llm = make_llm()
    free = llm.generate([5, 6, 7], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[
        0
    ].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    t = free.token_ids[4]
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[t]))[
        0
    ].outputs[0]
    assert (
        out.finish_reason == "stop"
        and out.token_ids == free.token_ids[: free.token_ids.index(t) + 1]
    )
    llm.engine.eos_ids = {t}  # make that token the EOS: generation ends there unless ignore_eos
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == t


def test_seeded_requests_repeat_and_differ_by_seed(make_llm):
    llm = make_llm()
    p = lambda s: SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True)
    a, b, c = (llm.generate("abc", p(s))[0].outputs[0].token_ids for s in (1, 1, 2))
    assert a == b and a != c


# -- token rules: logit_bias, allowed_token_ids, min_tokens, bad_words ----------------------------


def _rules(p, vocab=50, eos=(1,), encode=None):
    return TokenRules.build(p, vocab, eos, encode)


def test_logit_bias_adds_to_the_logits_and_can_ban_or_force():
    x = _logits(4)
    p = SamplingParams(temperature=0, logit_bias={7: 100.0})
    assert sample_row(x, p, None, [], [], rules=_rules(p)).token_id == 7
    best = int(np.argmax(x))
    p = SamplingParams(temperature=0, logit_bias={best: -100})
    s = sample_row(x, p, None, [], [], rules=_rules(p))
    assert s.token_id == int(np.argsort(-x)[1])
    p = SamplingParams(logit_bias={"3": 0.5, 4: -2})  # JSON keys are strings
    out = _rules(p).apply(x.copy(), [])
    np.testing.assert_allclose(
        out - x, np.where(np.arange(50) == 3, 0.5, 0) - 2 * (np.arange(50) == 4)
    )


def test_allowed_token_ids_keep_only_those():
    x = _logits(5)
    p = SamplingParams(temperature=1.0, allowed_token_ids=[3, 9, 11])
    rng = np.random.default_rng(0)
    picks = {sample_row(x, p, rng, [], [], rules=_rules(p)).token_id for _ in range(200)}
    assert picks <= {3, 9, 11} and len(picks) >= 2


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    x = np.zeros(50, dtype=np.float32)
    x[1], x[2] = 10, 9  # EOS, then a stop token id, are the likeliest
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[2])
    rules = _rules(p)
    assert sample_row(x, p, None, [], [5, 6], rules=rules).token_id not in (1, 2)
    assert sample_row(x, p, None, [], [5, 6, 7], rules=rules).token_id == 1


def test_bad_words_ban_the_last_token_after_the_rest():
    # as vLLM: the word alone and after a space, when the space makes a same-length new first token
    words = {"ab": [10, 11], " ab": [12, 11], "c": [13], " c": [14, 15]}
    x = np.zeros(50, dtype=np.float32)
    x[[11, 12, 13]] = [5, 4, 3]
    p = SamplingParams(temperature=0, bad_words=["ab", "c"])
    rules = _rules(p, encode=lambda s: words.get(s, []))
    assert rules.bad_words == ((10, 11), (12, 11), (13,))
    assert sample_row(x, p, None, [], [3], rules=rules).token_id == 11  # 11 alone is not "ab"
    assert sample_row(x, p, None, [], [3, 10], rules=rules).token_id == 12  # 11 and 13 banned
    assert sample_row(x, p, None, [], [12], rules=rules).token_id == 12


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"logit_bias": {50: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": [3, 50]}, "allowed_token_ids"),
    ],
)
def test_token_ids_outside_the_vocab_raise(kw, match):
    with pytest.raises(RequestError, match=match):
        _rules(SamplingParams(**kw))


def test_best_of_returns_the_n_likeliest(make_llm):
    llm = make_llm()
    hot = {"max_tokens": 8, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    all4 = llm.generate([[5, 6, 7]], SamplingParams(n=4, logprobs=0, **hot))[0].outputs
    best = llm.generate([[5, 6, 7]], SamplingParams(n=2, best_of=4, **hot))[0].outputs
    ranked = sorted(all4, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked]
    assert [c.index for c in best] == [0, 1]
    assert [c.token_ids for c in best] != [c.token_ids for c in all4[:2]]  # not just the first two


def test_engine_applies_token_rules_per_row_in_one_batch(make_llm):
    """Requests with different rules in one step: each follows its own, the others none."""
    llm = make_llm()
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    free = llm.generate([[5, 6, 7]], plain)[0].outputs[0].token_ids
    banned = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                            logit_bias={t: -100 for t in free})  # fmt: skip
    only = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, allowed_token_ids=[40, 41])
    outs = llm.generate([[5, 6, 7]] * 3, [plain, banned, only])
    assert outs[0].outputs[0].token_ids == free
    assert not set(outs[1].outputs[0].token_ids) & set(free)
    assert set(outs[2].outputs[0].token_ids) <= {40, 41}
    llm.engine.eos_ids = {free[0]}
    short = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0))[0].outputs[0]
    assert short.token_ids == free[:1]
    held = SamplingParams(max_tokens=6, temperature=0, min_tokens=3)
    assert free[0] not in llm.generate([[5, 6, 7]], held)[0].outputs[0].token_ids[:3]
