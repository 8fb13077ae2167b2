"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP.

Oracles: the server's text equals LLM.generate / LLM.chat on a second, independent LLM over the
same checkpoint; logprobs equal a log-softmax of LLM.logits; concurrent streams equal the same
requests run alone; KV blocks in use, read from the engine and from /metrics, drop to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from tinyserve import LLM, SamplingParams
from tinyserve.serving import ServerConfig, create_app, main

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "smollm2"
MODEL = "tiny"
LIMITS = {"max_body_bytes": 4096, "max_prompt_tokens": 64, "max_tokens_limit": 128, "max_queue": 64}


@contextlib.contextmanager
def running(app):
    """Serve app on a free loopback port in a thread; yields the base URL; shuts down at the end."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def ref() -> LLM:
    """A second, independent LLM over the same checkpoint: the oracle for the server's answers."""
    return LLM(str(FIXTURE), backend="numpy")


@pytest.fixture(scope="module")
def served():
    app = create_app(LLM(str(FIXTURE), backend="numpy"), ServerConfig(model_name=MODEL, **LIMITS))
    with running(app) as url:
        yield url, app.server_state


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[0], timeout=10) as c:
        yield c


def greedy(max_tokens=12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def wait_until(cond, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def metric(http, name: str) -> float:
    """One sample's value from /metrics (name may include labels)."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@contextlib.contextmanager
def slow_steps(state, seconds: float):
    """Each engine step takes at least `seconds`, so a stream is surely cut mid-way."""
    engine = state.loop.engine
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()

    engine.step = slow
    try:
        yield
    finally:
        del engine.step


# -- the official client ------------------------------------------------------------------------


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert http.get("/health").json() == {"status": "ok"}


def test_completion_equals_llm_generate(client, ref):
    r = client.completions.create(
        model=MODEL,
        prompt="Story 1: the",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    want = ref.generate("Story 1: the", greedy())[0]
    assert r.choices[0].text == want.outputs[0].text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_equals_llm_chat(client, ref):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me a story"},
    ]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    want = ref.chat(messages, greedy(10))[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.outputs[0].text
    assert (
        r.usage.prompt_tokens == len(ref.chat_prompt(messages)) and r.usage.completion_tokens == 10
    )


def test_streaming_joins_to_the_whole_answer(client, ref):
    want = ref.generate("Story 2: the", greedy(20))[0].outputs[0].text
    stream = client.completions.create(
        model=MODEL,
        prompt="Story 2: the",
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert len([c for c in chunks if c.choices]) > 1, "one chunk is not a stream"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": "hi"}]
    chat = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert chat[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chat)
        == ref.chat(messages, greedy(8))[0].outputs[0].text
    )


def test_n_2_seeded_sampling_equals_llm_generate(client, ref):
    params = SamplingParams(
        max_tokens=10, temperature=0.9, top_p=0.95, seed=7, n=2, ignore_eos=True
    )
    want = [o.text for o in ref.generate("Story 3: the", params)[0].outputs]
    kw = {
        "model": MODEL,
        "prompt": "Story 3: the",
        "max_tokens": 10,
        "temperature": 0.9,
        "top_p": 0.95,
        "seed": 7,
        "n": 2,
        "extra_body": {"ignore_eos": True},
    }
    r = client.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == want
    assert r.usage.completion_tokens == 20
    streamed = ["", ""]
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == want


def test_every_sampling_field_reaches_sampling_params(client, ref):
    fields = {"temperature": 0.7, "top_p": 0.9, "seed": 3, "presence_penalty": 1.0,
              "frequency_penalty": 0.5}  # fmt: skip
    extra = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.3, "ignore_eos": True}
    want = ref.generate("Story 6: the", SamplingParams(max_tokens=12, **fields, **extra))[0]
    r = client.completions.create(
        model=MODEL, prompt="Story 6: the", max_tokens=12, extra_body=extra, **fields
    )
    assert r.choices[0].text == want.outputs[0].text
    other = client.completions.create(
        model=MODEL, prompt="Story 6: the", max_tokens=12, extra_body=extra, **{**fields, "seed": 4}
    )
    assert other.choices[0].text != r.choices[0].text  # the seed is not ignored


def test_stop_strings_cut_the_text(client, ref):
    full = ref.generate("Story 0: the", greedy(16))[0].outputs[0].text  # "ran'qqqq..."
    stop = full[3:5]
    r = client.completions.create(
        model=MODEL,
        prompt="Story 0: the",
        max_tokens=16,
        temperature=0,
        stop=[stop, "never-there"],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(
        model=MODEL,
        prompt="Story 0: the",
        max_tokens=16,
        temperature=0,
        stop=stop,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]


def test_completion_logprobs_match_the_model(client, ref):
    prompt_ids = ref.tokenizer.encode("Story 5: the")
    r = client.completions.create(
        model=MODEL,
        prompt=prompt_ids,
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    out_ids = ref.generate([prompt_ids], greedy(6))[0].outputs[0].token_ids
    logits = ref.logits(prompt_ids + out_ids[:-1])[
        len(prompt_ids) - 1 :
    ]  # (6, V): row i predicts out i
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # (6, V) log-softmax
    lp = r.choices[0].logprobs
    assert lp.tokens == [ref.tokenizer.decode([t], skip_special_tokens=False) for t in out_ids]
    np.testing.assert_allclose(lp.token_logprobs, logp[np.arange(6), out_ids], atol=1e-4)
    for row, top in zip(logp, lp.top_logprobs):  # top 3 + the chosen; tokens that print alike merge
        best = np.sort(row)[::-1][:4]
        assert 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(row.max(), abs=1e-4)
        assert all(np.isclose(best, v, atol=1e-4).any() for v in top.values())
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for tok in content:
        values = [t.logprob for t in tok.top_logprobs]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert tok.logprob == pytest.approx(values[0])  # greedy picks the most likely token
        assert tok.bytes == list(tok.token.encode())


def _logp(ref, ids):
    x = ref.logits(ids).astype(np.float64)  # (T, V)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_with_logprobs_scores_the_prompt(client, ref, max_tokens):
    """What lm-eval's local-completions sends for a loglikelihood: echo, logprobs, max_tokens 1
    (or 0): the prompt's tokens come back with their logprobs, the first one's null."""
    ids = ref.tokenizer.encode("Story 5: the cat sat on the mat")
    r = client.completions.create(
        model=MODEL, prompt=[ids], echo=True, logprobs=2, max_tokens=max_tokens, temperature=0
    )
    lp = r.choices[0].logprobs
    logp = _logp(ref, ids)
    assert len(lp.tokens) == len(ids) + max_tokens
    assert lp.tokens[: len(ids)] == [
        ref.tokenizer.decode([t], skip_special_tokens=False) for t in ids
    ]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = logp[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(lp.token_logprobs[1 : len(ids)], want, atol=1e-4)
    for row, top in zip(logp, lp.top_logprobs[1 : len(ids)]):
        assert max(top.values()) == pytest.approx(row.max(), abs=1e-4) and len(top) <= 3
    assert r.choices[0].text.startswith(ref.tokenizer.decode(ids))
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == max_tokens
    text = client.completions.create(model=MODEL, prompt="Story 5: the", echo=True, max_tokens=3,
                                     temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert (
        text.choices[0].text
        == "Story 5: the" + ref.generate("Story 5: the", greedy(3))[0].outputs[0].text
    )


def test_batched_prompts_one_choice_per_prompt_and_sample(client, ref, served):
    prompts = ["Story 1: the", "Story 2: a", "Story 3: one"]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=5, n=2, ignore_eos=True)
    want = [[o.text for o in ref.generate(p, params)[0].outputs] for p in prompts]
    kw = {"model": MODEL, "max_tokens": 6, "temperature": 0.8, "seed": 5, "n": 2,
          "extra_body": {"ignore_eos": True}}  # fmt: skip
    steps = served[1].loop.engine.n_steps
    r = client.completions.create(prompt=prompts, **kw)
    assert served[1].loop.engine.n_steps - steps <= 7, "the prompts ran in the same steps"
    got = {c.index: c.text for c in r.choices}
    assert got == {p * 2 + i: want[p][i] for p in range(3) for i in range(2)}  # as OpenAI indexes
    assert r.usage.completion_tokens == 36
    assert r.usage.prompt_tokens == sum(len(ref.tokenizer.encode(p)) for p in prompts)
    ids = [ref.tokenizer.encode(p) for p in prompts]
    by_ids = client.completions.create(prompt=ids, **kw)
    assert {c.index: c.text for c in by_ids.choices} == got
    streamed = dict.fromkeys(got, "")
    for chunk in client.completions.create(prompt=prompts, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == got


def test_logit_bias_min_tokens_bad_words_reach_the_engine(client, ref):
    base = {"model": MODEL, "prompt": "Story 7: the", "max_tokens": 5, "temperature": 0}
    r = client.completions.create(**base, logit_bias={"42": 100})
    want = ref.generate(
        "Story 7: the", SamplingParams(max_tokens=5, temperature=0, logit_bias={42: 100})
    )
    assert r.choices[0].text == want[0].outputs[0].text == ref.tokenizer.decode([42] * 5)
    extra = {"min_tokens": 4, "bad_words": ["the"], "allowed_token_ids": list(range(40, 200))}
    r = client.completions.create(**base, extra_body=extra)
    want = ref.generate("Story 7: the", SamplingParams(max_tokens=5, temperature=0, **extra))[0]
    assert r.choices[0].text == want.outputs[0].text
    best = client.completions.create(**{**base, "temperature": 1.0, "seed": 1}, n=2, best_of=4)
    assert sorted(c.index for c in best.choices) == [0, 1]


def test_tokenizer_endpoints_as_vllm_has_them(http, ref):
    """lm-eval's remote tokenizer: /tokenizer_info, /tokenize, /detokenize (no hub download)."""
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == ref.tokenizer.eos_token
    r = http.post("/tokenize", json={"prompt": "Story 1: the", "add_special_tokens": False})
    ids = ref.tokenizer.encode("Story 1: the", add_special_tokens=False)
    assert r.json()["tokens"] == ids and r.json()["count"] == len(ids)
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "Story 1: the"
    assert_error(http.post("/tokenize", json={"prompt": 5}), 400, "prompt")


# -- concurrency and disconnects ----------------------------------------------------------------


PROMPTS = [f"Story {i}: the" for i in range(32)]


async def _stream_one(aclient, prompt: str, max_tokens: int, cut_after: int | None) -> str:
    stream = await aclient.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text, n = "", 0
    async for chunk in stream:
        text += chunk.choices[0].text
        n += 1
        if cut_after is not None and n == cut_after:
            await stream.close()  # hang up mid-stream
            break
    return text


async def _clients(url: str, max_tokens: int, cut: bool) -> list[str]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as aclient:
        return await asyncio.gather(
            *[
                _stream_one(aclient, p, max_tokens, 2 if cut and i % 2 else None)
                for i, p in enumerate(PROMPTS)
            ]
        )


def test_32_concurrent_streams_batch_and_equal_sequential_ones(served, ref, http):
    url, state = served
    want = [ref.generate(p, greedy(16))[0].outputs[0].text for p in PROMPTS]  # one at a time
    steps_before = state.loop.engine.n_steps
    got = asyncio.run(_clients(url, 16, cut=False))
    assert got == want
    # 32 x 16 tokens one request at a time would take >= 512 steps: they shared them
    assert state.loop.engine.n_steps - steps_before < 256
    assert wait_until(lambda: state.loop.engine.kv_manager.n_used_blocks == 0)
    assert metric(http, "tinyserve_kv_blocks_in_use") == 0


def test_half_the_clients_hang_up_mid_stream(served, ref, http):
    url, state = served
    aborted_before = metric(http, 'tinyserve_requests_total{finish_reason="abort"}')
    with slow_steps(state, 0.002):  # 64 steps >= 128 ms: the hang-ups come long before the end
        got = asyncio.run(_clients(url, 64, cut=True))
    want = [ref.generate(p, greedy(64))[0].outputs[0].text for p in PROMPTS[::2]]
    assert got[::2] == want
    assert all(len(g) < len(w) for g, w in zip(got[1::2], want))
    assert wait_until(lambda: state.loop.engine.kv_manager.n_used_blocks == 0)
    assert metric(http, "tinyserve_kv_blocks_in_use") == 0
    assert metric(http, 'tinyserve_requests_total{finish_reason="abort"}') - aborted_before == 16


def test_a_disconnect_frees_the_blocks_at_once(served, http):
    url, state = served
    kv = state.loop.engine.kv_manager
    with slow_steps(state, 0.01), httpx.Client(base_url=url, timeout=10) as c:
        body = {
            "prompt": "Story 9: the",
            "max_tokens": 120,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            assert kv.n_used_blocks > 0
        t0 = time.monotonic()
        # generating the rest would take >= 1.1 s; hanging up frees everything at once
        assert wait_until(lambda: kv.n_used_blocks == 0, timeout=0.5)
        assert time.monotonic() - t0 < 0.5


def test_a_non_streaming_client_that_hangs_up_is_aborted_too(served, http):
    url, state = served
    kv = state.loop.engine.kv_manager
    aborted_before = metric(http, 'tinyserve_requests_total{finish_reason="abort"}')
    with slow_steps(state, 0.01):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                url + "/v1/completions",
                timeout=0.2,
                json={
                    "prompt": "Story 8: the",
                    "max_tokens": 120,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
        assert wait_until(lambda: kv.n_used_blocks == 0, timeout=0.5)
    assert metric(http, 'tinyserve_requests_total{finish_reason="abort"}') - aborted_before == 1


def test_metrics_count_requests_tokens_and_latencies(served, client, http):
    before = metric(http, "tinyserve_generation_tokens_total")
    ttft_before = metric(http, "tinyserve_time_to_first_token_seconds_count")
    client.completions.create(
        model=MODEL,
        prompt="Story 4: the",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert metric(http, "tinyserve_generation_tokens_total") - before == 5
    assert metric(http, "tinyserve_time_to_first_token_seconds_count") - ttft_before == 1
    text = http.get("/metrics").text
    assert 'tinyserve_time_per_output_token_seconds_bucket{le="+Inf"}' in text
    assert 'tinyserve_http_requests_total{path="/v1/completions",status="200"}' in text
    assert metric(http, "tinyserve_kv_blocks_total") == served[1].loop.engine.kv_manager.num_blocks


def test_router_gauges_move_as_requests_queue_and_finish(ref):
    """A server that runs 2 sequences at a time: 4 slow streams make 2 run and 2 wait."""
    app = create_app(
        LLM(str(FIXTURE), backend="numpy", max_num_seqs=2), ServerConfig(model_name=MODEL)
    )
    state = app.server_state
    body = {"prompt": "Story 7: the", "max_tokens": 100, "stream": True, "ignore_eos": True}
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        assert metric(c, "tinyserve_num_requests_running") == 0
        assert metric(c, "tinyserve_kv_cache_usage_perc") == 0
        with slow_steps(state, 0.01), contextlib.ExitStack() as streams:
            for _ in range(4):  # each response has started: its request is in the engine
                streams.enter_context(c.stream("POST", "/v1/completions", json=body))
            assert wait_until(lambda: metric(c, "tinyserve_num_requests_waiting") == 2)
            assert metric(c, "tinyserve_num_requests_running") == 2
            usage = metric(c, "tinyserve_kv_cache_usage_perc")
            kv = state.loop.engine.kv_manager
            assert 0 < usage <= 1 and usage == pytest.approx(kv.n_used_blocks / kv.num_blocks)
        assert wait_until(lambda: metric(c, "tinyserve_num_requests_running") == 0)
        assert metric(c, "tinyserve_num_requests_waiting") == 0
        assert metric(c, "tinyserve_kv_cache_usage_perc") == 0


def test_prefix_cache_counters_count_tokens_looked_up_and_reused(served, http, ref):
    prompt = "Story 11: " + "the cat sat on the mat and " * 4  # 57 tokens: 3 full blocks
    n_prompt = len(ref.tokenizer.encode(prompt))
    block = served[1].loop.engine.kv_manager.block_size
    queries = metric(http, "tinyserve_prefix_cache_queries_total")
    hits = metric(http, "tinyserve_prefix_cache_hits_total")
    for _ in range(2):
        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200
    assert metric(http, "tinyserve_prefix_cache_queries_total") - queries == 2 * n_prompt
    # the second request reuses every full block but the one holding the prompt's last token
    assert (
        metric(http, "tinyserve_prefix_cache_hits_total") - hits == (n_prompt - 1) // block * block
    )


def test_speculation_counters_count_proposed_and_kept_tokens(ref):
    """A server with ngram speculation: /metrics counts what its engine proposed and kept."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    llm = LLM(str(FIXTURE), backend="numpy", speculative_config=spec)
    app = create_app(llm, ServerConfig(model_name=MODEL))
    body = {"prompt": "the cat sat on the mat and " * 4, "max_tokens": 24, "temperature": 0}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert metric(c, "tinyserve_spec_decode_num_draft_tokens_total") == 0
        assert c.post("/v1/completions", json=body).status_code == 200
        engine = app.server_state.loop.engine
        assert wait_until(
            lambda: metric(c, "tinyserve_spec_decode_num_draft_tokens_total")
            == engine.n_draft_tokens
        )
        assert engine.n_draft_tokens > 0
        kept = metric(c, "tinyserve_spec_decode_num_accepted_tokens_total")
        assert kept == engine.n_accepted_tokens <= engine.n_draft_tokens


# -- bad input ----------------------------------------------------------------------------------


BAD = [  # (path, body or raw bytes, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "x", "bogus": 1}, 400, "bogus"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 129}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"five": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 8}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "best_of": 1, "n": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [999999]}, 400, "allowed_token_ids"),
    ("/v1/completions", {"prompt": ["x", ""]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], "x"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 65}, 400, "prompt"),  # more than max_queue
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, None),
    ("/v1/completions", {"prompt": "word " * 80}, 400, "prompt"),
    (
        "/v1/completions",
        {"prompt": "x", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "word " * 80}]},
        400,
        "messages",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"},
        404,
        "model",
    ),
    ("/v1/completions", {"prompt": "x" * 5000}, 413, None),
]


def assert_error(r, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "\n" not in err["message"] and err["param"] == param
    return err


def assert_still_serving(http) -> None:
    r = http.post("/v1/completions", json={"prompt": "Story 1: the", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    "path,body,status,param", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_gets_an_openai_error(http, path, body, status, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert_error(r, status, param)
    assert_still_serving(http)


def test_oversized_chunked_body_without_length_is_413(http):
    def chunks():  # no Content-Length: the server must count as it reads
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    assert_error(http.post("/v1/completions", content=chunks()), 413)
    assert_still_serving(http)


def test_unknown_route_and_wrong_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_an_engine_failure_fails_its_requests_not_the_server(served, http):
    engine = served[1].loop.engine

    def broken():
        del engine.step  # once
        raise RuntimeError("device lost")

    engine.step = broken
    err = assert_error(
        http.post("/v1/completions", json={"prompt": "Story 1: the", "max_tokens": 4}), 500
    )
    assert "device lost" in err["message"] and err["type"] == "server_error"
    assert wait_until(lambda: engine.kv_manager.n_used_blocks == 0)
    assert_still_serving(http)


def test_the_official_client_raises_on_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-3
        )


def test_api_key_and_queue_limit(ref):
    """A second server: key required, one request in flight at most."""
    config = ServerConfig(model_name=MODEL, api_key="sekret", max_queue=1)
    app = create_app(LLM(str(FIXTURE), backend="numpy"), config)
    state = app.server_state
    with running(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        body = {"prompt": "Story 1: the", "max_tokens": 3}
        assert_error(c.post("/v1/completions", json=body), 401)
        assert_error(
            c.post("/v1/completions", json=body, headers={"authorization": "Bearer nope"}), 401
        )
        assert_error(c.get("/v1/models"), 401)
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert ok.completions.create(
            model=MODEL, prompt="Story 1: the", max_tokens=3
        ).usage.completion_tokens
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()

        auth = {"authorization": "Bearer sekret"}
        with (
            slow_steps(state, 0.01),
            c.stream(
                "POST",
                "/v1/completions",
                headers=auth,
                json={**body, "max_tokens": 50, "stream": True, "ignore_eos": True},
            ) as r,
        ):
            lines = r.iter_lines()  # held: dropping the iterator would hang up
            next(lines)  # the first request is in flight
            err = assert_error(c.post("/v1/completions", json=body, headers=auth), 503)
            assert err["code"] == "queue_full"
        assert wait_until(lambda: state.n_in_flight == 0)
        assert c.post("/v1/completions", json=body, headers=auth).status_code == 200


# -- the command --------------------------------------------------------------------------------


def test_main_rejects_bad_limits(capsys):
    assert main(["--model", str(FIXTURE), "--max-queue", "0"]) == 2
    assert "max_queue" in capsys.readouterr().err


def test_tinyserve_serve_command_serves(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tinyserve.cli",
            "serve",
            "--model",
            str(FIXTURE),
            "-b",
            "numpy",
            "--port",
            "0",
            "--served-model-name",
            MODEL,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        for line in proc.stderr:
            if "Uvicorn running on" in line:
                url = line.split("running on ")[1].split()[0]
                break
        assert url is not None and url.startswith("http://127.0.0.1:"), "binds loopback by default"
        r = httpx.post(
            url + "/v1/completions",
            json={"model": MODEL, "prompt": "Story 1: the", "max_tokens": 3, "temperature": 0},
        )
        assert r.status_code == 200 and json.loads(r.text)["model"] == MODEL
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


def test_replica_metrics_merge_into_one_exposition():
    """Behind Ray the ingress shows every replica's samples, each metric's TYPE line once."""
    from tinyserve.serving.metrics import Metrics, merge

    replicas = [Metrics({"replica": name}) for name in ("a", "b")]
    replicas[0].count_http("/v1/completions", 200)
    replicas[1].gauges["num_requests_waiting"] = 3
    text = merge([m.render() for m in replicas])
    lines = text.splitlines()
    assert lines.count("# TYPE tinyserve_num_requests_waiting gauge") == 1
    assert 'tinyserve_num_requests_waiting{replica="a"} 0' in lines
    assert 'tinyserve_num_requests_waiting{replica="b"} 3' in lines
    assert (
        'tinyserve_http_requests_total{replica="a",path="/v1/completions",status="200"} 1' in lines
    )
    assert 'tinyserve_time_to_first_token_seconds_bucket{replica="b",le="+Inf"} 0' in lines
    # every sample sits right under its own family's TYPE line
    family = None
    for line in lines:
        if line.startswith("# TYPE"):
            family = line.split()[2]
        elif not line.startswith("#"):
            assert line.startswith(family) and "replica=" in line, line
