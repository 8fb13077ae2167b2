"""The engine: continuous batching, preemption, prefix caching, chunked prefill, n > 1, abort, metrics.

Oracles: a request served in a batch gives the same tokens as served alone; with a tiny cache
(preemption) as with a big one; with the prefix cache as without; chunked as unchunked.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_prompts

from tinyserve import SamplingParams
from tinyserve.errors import RequestError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_batched_equals_alone(make_llm):
    rng = np.random.default_rng(0)
    prompts = random_prompts(16, rng)
    llm = make_llm()
    together = _ids(llm.generate(prompts, GREEDY))
    alone = [_ids(llm.generate([p], GREEDY))[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 12 for t in together)
    assert llm.engine.kv_manager.n_used_blocks == 0


def test_small_cache_preempts_and_gives_the_same_tokens(make_llm):
    rng = np.random.default_rng(1)
    prompts = random_prompts(8, rng, 20, 40)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = _ids(make_llm().generate(prompts, params))
    small = make_llm(kv_cache_tokens=128, block_size=8)  # room for ~2 of the 8 requests at once
    got = _ids(small.generate(prompts, params))
    assert got == expected
    assert small.engine.n_preemptions > 0
    assert small.engine.kv_manager.n_used_blocks == 0


def test_prefix_cache_computes_only_the_suffix(make_llm):
    rng = np.random.default_rng(2)
    prefix = rng.integers(4, 384, size=64).tolist()
    first, second = prefix + [5, 6, 7], prefix + rng.integers(4, 384, size=10).tolist()
    cached = make_llm(block_size=16)
    cached.generate([first], GREEDY)
    out = cached.generate([second], GREEDY)[0]
    assert out.metrics.n_prefilled_tokens == 10  # the 4 full prefix blocks came from the cache
    uncached = make_llm(block_size=16, enable_prefix_caching=False)
    ref = uncached.generate([second], GREEDY)[0]
    assert ref.metrics.n_prefilled_tokens == len(second)
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_prefix_cache_hit_is_checked_against_tokens(make_llm):
    """Same block hash is not enough: a different prefix must not reuse the blocks."""
    llm = make_llm(block_size=16)
    kv = llm.engine.kv_manager
    llm.generate([list(range(10, 60))], GREEDY)
    key = next(iter(kv.cached))
    block = kv.cached[key]
    kv.block_key[block] = (key, None, tuple(range(100, 116)))  # forge: right key, wrong tokens
    out = llm.generate([list(range(10, 60))], GREEDY)[0]
    assert out.metrics.n_prefilled_tokens == 50


def test_chunked_prefill_equals_unchunked(make_llm):
    rng = np.random.default_rng(3)
    prompt = rng.integers(4, 384, size=150).tolist()
    whole = make_llm()
    chunked = make_llm(chunk_size=32, max_num_batched_tokens=40)
    np.testing.assert_allclose(chunked.logits(prompt), whole.logits(prompt), rtol=1e-5, atol=1e-5)
    a, b = whole.generate([prompt], GREEDY)[0], chunked.generate([prompt], GREEDY)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert chunked.engine.n_steps > whole.engine.n_steps + 3  # really several prefill steps


def test_chunked_prefill_logits_match_across_chunks(make_llm):
    """Each chunk attends to the earlier ones through the cache: last-token logits of a prompt
    prefilled in 7-token chunks equal the full forward's."""
    rng = np.random.default_rng(4)
    prompt = rng.integers(4, 384, size=45).tolist()
    llm = make_llm(chunk_size=7, enable_prefix_caching=False)
    full = llm.logits(prompt)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=3))[0]
    top = max(out.outputs[0].logprobs[0].items(), key=lambda kv: kv[1])[0]
    assert top == int(np.argmax(full[-1]))


def test_n2_shares_prompt_blocks_and_samples_differently(make_llm):
    llm = make_llm(block_size=4)
    prompt = list(range(10, 30))  # 20 tokens = 5 blocks
    params = SamplingParams(n=2, max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    engine = llm.engine
    rid = engine.add_request(prompt, params)
    req = engine.requests[rid]
    allocated = []
    original_allocate = engine.kv_manager.allocator.allocate

    def counting_allocate():
        allocated.append(original_allocate())
        return allocated[-1]

    engine.kv_manager.allocator.allocate = counting_allocate
    engine.step()  # prefill + fork
    a, b = req.seqs
    assert a.block_table == b.block_table  # the prompt's 5 blocks, shared
    engine.step()  # both siblings decode their first token
    assert len(allocated) == 5 + 2  # 5 prompt blocks once; one new block each for the first tokens
    assert a.block_table[:5] == b.block_table[:5] and a.block_table[5] != b.block_table[5]
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    texts = [c.token_ids for c in outs[0].outputs]
    assert texts[0] != texts[1]
    again = llm.generate([prompt], params)[0]
    assert [c.token_ids for c in again.outputs] == texts  # same seed, same samples
    assert engine.kv_manager.n_used_blocks == 0


def test_copy_on_write_keeps_siblings_apart(make_llm):
    """Forked siblings write into a shared partial block: each must attend to its own tokens.

    Oracle: the logprob each sibling saw for each of its tokens equals a full recompute of
    prompt + that sibling's tokens alone."""
    llm = make_llm(block_size=16)
    prompt = list(range(10, 30))  # 20 tokens: the second block is partial and shared after the fork
    p = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=3, ignore_eos=True, logprobs=1)
    outs = llm.generate([prompt], p)[0].outputs
    assert len({tuple(c.token_ids) for c in outs}) == 3
    for c in outs:
        full = llm.logits(prompt + c.token_ids)  # (T, V)
        full = full - full.max(-1, keepdims=True)
        logp = full - np.log(np.exp(full).sum(-1, keepdims=True))
        seen = [c.logprobs[t][tok] for t, tok in enumerate(c.token_ids)]
        want = [logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(c.token_ids)]
        np.testing.assert_allclose(seen, want, rtol=1e-4, atol=1e-4)


def test_stream_deltas_add_up_to_generate(make_llm):
    llm = make_llm()
    p = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    full = llm.generate("hello world", p)[0].outputs[0]
    deltas = list(llm.stream("hello world", p))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert deltas[-1].finish_reason == "length"


def test_closing_a_stream_aborts_and_frees(make_llm):
    llm = make_llm()
    it = llm.stream([5, 6, 7, 8], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    next(it)
    assert llm.engine.kv_manager.n_used_blocks > 0
    it.close()
    assert llm.engine.kv_manager.n_used_blocks == 0
    assert not llm.engine.has_unfinished()


def test_abort_frees_everything_at_once(make_llm):
    llm = make_llm()
    e = llm.engine
    ids = [e.add_request(p, GREEDY) for p in random_prompts(6, np.random.default_rng(5))]
    e.step()
    e.step()
    for rid in ids:
        e.abort(rid)
    assert e.kv_manager.n_used_blocks == 0 and not e.has_unfinished()


def test_requests_join_while_others_run(make_llm):
    llm = make_llm()
    e = llm.engine
    prompts = random_prompts(4, np.random.default_rng(6))
    alone = [_ids(llm.generate([p], GREEDY))[0] for p in prompts]
    results = {}
    rids = [e.add_request(prompts[0], GREEDY)]
    steps = 0
    while e.has_unfinished():
        if steps in (2, 5, 9):  # arrivals mid-flight join the running batch
            rids.append(e.add_request(prompts[len(rids)], GREEDY))
        for o in e.step():
            if o.finished:
                results[o.request_id] = o.outputs[0].token_ids
        steps += 1
    assert [results[r] for r in rids] == alone


def test_metrics_are_recorded(make_llm):
    out = make_llm().generate(
        [[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )[0]
    m = out.metrics
    assert m.ttft is not None and m.ttft > 0
    assert len(m.token_times) == 8 and len(m.inter_token_latencies) == 7
    assert m.tpot == pytest.approx((m.token_times[-1] - m.first_token_time) / 7)
    assert m.e2e >= m.ttft


def test_impossible_request_is_rejected_others_keep_running(make_llm):
    llm = make_llm(kv_cache_tokens=64, block_size=16)
    e = llm.engine
    ok = e.add_request([5, 6, 7], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    e.step()
    with pytest.raises(RequestError, match="KV blocks"):
        e.add_request(list(range(4, 40)), SamplingParams(max_tokens=100))
    with pytest.raises(RequestError, match="context"):
        e.add_request(list(range(300)), SamplingParams(max_tokens=1))
    done = []
    while e.has_unfinished():
        done += [o for o in e.step() if o.finished]
    assert [o.request_id for o in done] == [ok] and len(done[0].outputs[0].token_ids) == 10


def test_seedless_requests_are_seeded_by_engine_seed_and_admission_index(make_llm):
    """A request without a seed samples as if it had seed `engine seed * 2**32 + admission index`
    (every admitted request counts, greedy ones included), however its steps interleave.

    Oracle: the same prompts with those seeds given explicitly, each alone on a fresh engine."""
    long, short, other = list(range(10, 50)), [5, 6, 7], list(range(60, 75))

    def hot(seed=None):
        return SamplingParams(max_tokens=8, temperature=1.0, n=2, seed=seed, ignore_eos=True)

    def seed(index):
        return 11 * 2**32 + index

    llm = make_llm(seed=11, chunk_size=8)
    llm.generate([short, other], GREEDY)  # admissions 0 and 1
    # 2: `long`, prefilled in 5 chunks; 3: `other`, greedy; 4: `short`, sampling from the start
    outs = llm.generate([long, other, short], [hot(), GREEDY, hot()])
    later = llm.generate([other], hot())[0]  # 5
    fresh = make_llm(seed=0, chunk_size=8)
    want = [fresh.generate([p], hot(seed(i)))[0] for p, i in ((long, 2), (short, 4), (other, 5))]
    assert _ids_all([outs[0], outs[2], later]) == _ids_all(want)
    # the engine seed matters: a fresh engine's first request differs between seeds 11 and 12
    first = [make_llm(seed=s).generate([long], hot())[0] for s in (11, 12)]
    assert _ids_all(first[:1]) == _ids_all([fresh.generate([long], hot(seed(0)))[0]])
    assert _ids_all(first[:1]) != _ids_all(first[1:])


def _ids_all(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


# -- prompt logprobs (echo, lm-eval's loglikelihood) ----------------------------------------------


def _log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _assert_prompt_logprobs(pl, prompt, logits, top):
    """pl[t] scores prompt[t] given prompt[:t]: row t - 1 of the full forward's log-softmax."""
    logp = _log_softmax(logits)  # (T, V)
    assert len(pl) == len(prompt) and pl[0] is None
    for t in range(1, len(prompt)):
        row, entry = logp[t - 1], pl[t]
        assert entry[prompt[t]] == pytest.approx(row[prompt[t]], abs=1e-4)
        best = np.argsort(-row)[:top].tolist()
        assert set(best) <= set(entry) and len(entry) <= top + 1
        np.testing.assert_allclose([entry[i] for i in best], row[best], atol=1e-4)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_prompt_logprobs_equal_log_softmax_of_the_logits(make_llm, backend):
    llm = make_llm(backend=backend)
    prompt = np.random.default_rng(7).integers(4, 384, size=40).tolist()
    out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
    _assert_prompt_logprobs(out.prompt_logprobs, prompt, llm.logits(prompt), 3)
    assert llm.generate([prompt], GREEDY)[0].prompt_logprobs is None


def test_prompt_logprobs_only_for_the_request_that_asks(make_llm):
    """In one step, the scored request gets every prompt row's logits, the other its last row."""
    llm = make_llm(enable_prefix_caching=False)
    scored, other = list(range(10, 40)), list(range(50, 70))
    rows = []
    forward = llm.backend.forward_greedy

    def recording(model, batch, kv, greedy):
        rows.append(len(batch.logits_rows))
        return forward(model, batch, kv, greedy)

    llm.backend.forward_greedy = recording
    params = [SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0), GREEDY]
    outs = llm.generate([scored, other], params)
    assert rows[0] == len(scored) + 1  # 29 scoring rows + its sampling row + the other's last row
    assert (
        outs[1].prompt_logprobs is None
        and outs[1].outputs[0].token_ids == _ids(llm.generate([other], GREEDY))[0]
    )
    pl = outs[0].prompt_logprobs
    assert all(len(e) == 1 for e in pl[1:])  # prompt_logprobs=0: the prompt's own token only
    _assert_prompt_logprobs(pl, scored, llm.logits(scored), 0)


def test_prompt_logprobs_with_the_prefix_cache_and_chunks(make_llm):
    """A cached prefix still gets its logprobs (recomputed, not skipped); chunked prefill too."""
    llm = make_llm(block_size=16, chunk_size=7)
    prompt = np.random.default_rng(8).integers(4, 384, size=50).tolist()
    llm.generate([prompt], GREEDY)  # its first 3 blocks are cached now
    assert llm.generate([prompt], GREEDY)[0].metrics.n_prefilled_tokens == 50 - 48
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    _assert_prompt_logprobs(out.prompt_logprobs, prompt, llm.logits(prompt), 2)
    assert out.metrics.n_prefilled_tokens == 50
    # the prompt takes 8 chunks; the first output a stream sees already has all its logprobs
    rid = llm.engine.add_request(prompt, SamplingParams(max_tokens=3, prompt_logprobs=0))
    first = next(o for _ in range(20) for o in llm.engine.step() if o.request_id == rid)
    assert len(first.prompt_logprobs) == 50 and first.outputs[0].token_ids
    while llm.engine.has_unfinished():
        llm.engine.step()


def test_max_tokens_0_scores_the_prompt_only(make_llm):
    llm = make_llm()
    prompt = list(range(20, 45))
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1, n=2))[0]
    assert [(c.token_ids, c.finish_reason) for c in out.outputs] == [([], "length")] * 2
    _assert_prompt_logprobs(out.prompt_logprobs, prompt, llm.logits(prompt), 1)
    assert llm.engine.kv_manager.n_used_blocks == 0 and not llm.engine.has_unfinished()
