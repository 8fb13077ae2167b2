"""Structured output: the grammar's mask in the sampler, through the engine.

Oracles: every output parses and validates (jsonschema, re.fullmatch, membership); a
constrained request batched with others, forked (n > 1), preempted or served from the prefix
cache gives the same tokens as alone; a constraint the unconstrained greedy already satisfies
leaves the greedy text as it was.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import default_model_gguf

from tinyserve import SamplingParams
from tinyserve.errors import RequestError
from tinyserve.sampling import sample_row
from tinyserve.structured import StructuredOutputsParams

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 9},
        "b": {"enum": ["x", "y"]},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}


def sampled(so: StructuredOutputsParams, seed: int, max_tokens: int = 48, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, seed=seed, structured_outputs=so, **kw)


def texts(outs) -> list[str]:
    return [o.text for out in outs for o in out.outputs]


def test_sampler_draws_only_allowed_tokens():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32)
    allowed = np.zeros(50, dtype=bool)
    allowed[[3, 17, 41]] = True
    draws = {
        sample_row(logits, SamplingParams(), rng, [], [], allowed).token_id for _ in range(200)
    }
    assert draws == {3, 17, 41}
    greedy = sample_row(logits, SamplingParams(temperature=0), None, [], [], allowed)
    assert greedy.token_id == [3, 17, 41][int(np.argmax(logits[[3, 17, 41]]))]


def test_choice_regex_json_and_grammar_hold_batched(make_llm):
    llm = make_llm()
    specs = {
        "choice": StructuredOutputsParams(choice=["yes", "no", "maybe so"]),
        "regex": StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"),
        "json": StructuredOutputsParams(json=SMALL_SCHEMA),
        "object": StructuredOutputsParams(json_object=True),
        "lark": StructuredOutputsParams(grammar='start: "x" /[a-c]{1,5}/ "!"'),
        "gbnf": StructuredOutputsParams(grammar='root ::= "ab" [0-9] [0-9]? "!"'),
    }
    params = [sampled(so, seed) for so in specs.values() for seed in range(4)]
    outs = llm.generate(["hello there"] * len(params), params)  # all in one batch
    by_kind = dict(zip(specs, [outs[i : i + 4] for i in range(0, len(outs), 4)]))
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    assert set(texts(by_kind["choice"])) <= {"yes", "no", "maybe so"}
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", t) for t in texts(by_kind["regex"]))
    for t in texts(by_kind["json"]):
        jsonschema.validate(json.loads(t), SMALL_SCHEMA)
    assert all(isinstance(json.loads(t), dict) for t in texts(by_kind["object"]))
    assert all(re.fullmatch(r"x[a-c]{1,5}!", t) for t in texts(by_kind["lark"]))
    assert all(re.fullmatch(r"ab[0-9][0-9]?!", t) for t in texts(by_kind["gbnf"]))
    assert llm.engine.kv_manager.n_used_blocks == 0


def test_batched_forked_preempted_and_cached_equal_alone(make_llm):
    so = StructuredOutputsParams(json=SMALL_SCHEMA)
    prompts = [f"prompt number {i} says" for i in range(6)]
    params = [sampled(so, seed=i, max_tokens=32, n=3) for i in range(6)]
    alone = [texts(make_llm().generate([p], [q])) for p, q in zip(prompts, params)]
    together = make_llm().generate(prompts, params)
    assert [texts([o]) for o in together] == alone
    small = make_llm(kv_cache_tokens=160, block_size=8)  # too small for all at once: preempts
    assert [texts([o]) for o in small.generate(prompts, params)] == alone
    assert small.engine.n_preemptions > 0
    cached = make_llm(block_size=4)
    cached.generate(prompts, params)
    again = cached.generate(prompts, params)  # every prompt's full blocks now from the cache
    assert [texts([o]) for o in again] == alone
    assert sum(o.metrics.n_prefilled_tokens for o in again) < sum(len(p) for p in prompts)
    assert all(len(set(children)) > 1 for children in alone)  # each child sampled on its own
    done = [o.text for out in together for o in out.outputs if o.finish_reason == "stop"]
    assert len(done) >= 9  # the tiny random model may still be mid-object at max_tokens
    for t in done:
        jsonschema.validate(json.loads(t), SMALL_SCHEMA)


def test_a_constraint_the_greedy_text_satisfies_leaves_it_unchanged(make_llm):
    llm = make_llm()
    prompt = "the quick brown fox"  # its greedy continuation is whole characters
    free = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    assert free.finish_reason == "length"
    for so in (
        StructuredOutputsParams(choice=[free.text, free.text + " and more"]),
        StructuredOutputsParams(regex=re.escape(free.text)),
    ):
        params = SamplingParams(max_tokens=10, temperature=0, structured_outputs=so)
        out = llm.generate(prompt, params)[0].outputs[0]
        assert (out.text, out.token_ids) == (free.text, free.token_ids)


@pytest.mark.parametrize(
    "so, match",
    [
        ({"json": {"type": "nonsense"}}, "invalid or unsupported JSON schema"),
        ({"json": '{"type": '}, "not valid JSON"),
        ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"regex": "(("}, "regex"),
        ({"grammar": "start: ???"}, "grammar"),
        ({"choice": []}, "must not be empty"),
        ({"regex": "a", "choice": ["a"]}, "exactly one"),
        ({"jsn": {}}, "unknown structured_outputs field"),
    ],
)
def test_invalid_specs_are_request_errors(make_llm, so, match):
    llm = make_llm()
    with pytest.raises(RequestError, match=match):
        llm.generate("x", SamplingParams(structured_outputs=so))
    assert not llm.engine.has_unfinished()


def test_without_llguidance_a_constraint_is_a_clear_error(make_llm, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_llguidance(name, *args, **kwargs):
        if name.startswith("llguidance"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    llm = make_llm()
    monkeypatch.setattr(builtins, "__import__", no_llguidance)
    with pytest.raises(RequestError, match=r"pip install 'tinyserve\[structured\]'"):
        llm.generate("x", SamplingParams(structured_outputs={"regex": "a+"}))


def _allow_every_token(compiler_cls, monkeypatch):
    """A mask that lets every token through: how a fault in the grammar engine would look."""
    monkeypatch.setattr(
        compiler_cls, "masks", lambda self, ms: np.ones((len(ms), self.vocab_size), dtype=bool)
    )


def test_a_token_the_grammar_refuses_fails_the_step_and_never_reaches_the_text(
    make_llm, monkeypatch
):
    from tinyserve.errors import GrammarError
    from tinyserve.structured import GrammarCompiler

    llm = make_llm()
    _allow_every_token(GrammarCompiler, monkeypatch)
    so = StructuredOutputsParams(choice=("yes", "no"))
    with pytest.raises(GrammarError, match="refused token"):
        llm.generate("x", SamplingParams(temperature=0, structured_outputs=so))
    assert not llm.engine.has_unfinished()


# the same under `python -O`, which strips asserts: the refusal must still stop the request
# (llguidance's error state reads as is_stopped(), so an unchecked refusal finished as "stop"
# with the out-of-grammar token as its text)
_REFUSED_UNDER_O = """
import sys
import numpy as np
from tinyserve import LLM, SamplingParams, StructuredOutputsParams
from tinyserve.structured import GrammarCompiler

GrammarCompiler.masks = lambda self, ms: np.ones((len(ms), self.vocab_size), dtype=bool)
llm = LLM(sys.argv[1], backend="numpy")
so = StructuredOutputsParams(choice=("yes", "no"))
out = llm.generate("x", SamplingParams(temperature=0, structured_outputs=so))[0].outputs[0]
print(repr(out.text), out.finish_reason)
"""


def test_a_refused_token_is_an_error_under_python_O_too():
    import subprocess
    import sys

    from conftest import TINY

    run = subprocess.run(
        [sys.executable, "-O", "-c", _REFUSED_UNDER_O, str(TINY)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode != 0, f"a refused token was served: {run.stdout.strip()}"
    assert "GrammarError" in run.stderr and "refused token" in run.stderr, run.stderr[-2000:]


# -- paths that skip the mask, and the printed text ----------------------------------------------

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


@pytest.mark.parametrize("backend", ["numpy", "cpu", "torch"])
def test_a_constrained_request_takes_no_path_that_skips_its_mask(make_llm, backend):
    """Greedy, n=1, no logprobs, speculation on, a prompt that repeats itself, its blocks cached,
    the torch backend sampling on its device: what sends an unconstrained request down the
    argmax-only, on-device sampling and speculative paths, none of which applies a mask. A
    constrained request, alone or forked, takes none of them: the greedy tokens (ids 5..9) are
    outside the grammar, so a skipped mask would show as a GrammarError or as text the regex
    refuses."""
    kw = {}
    if backend == "torch":
        pytest.importorskip("torch")
        kw["backend_options"] = {"device_sampling": True}
    llm = make_llm(backend=backend, speculative_config=NGRAM, block_size=4, **kw)
    loop = [5, 6, 7, 8, 9] * 6
    regex = "[a-c]{12}"
    so = StructuredOutputsParams(regex=regex)
    params = [
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, structured_outputs=so),
        SamplingParams(max_tokens=12, n=3, seed=1, structured_outputs=so),
    ]
    for _ in range(2):  # the second time, the prompt's blocks come from the prefix cache
        outs = llm.generate([loop] * 3, params)
        assert outs[0].metrics.n_draft_tokens > 0, "the proposer never proposed"
        for out in outs[1:]:
            assert out.metrics.n_draft_tokens == 0
            assert all(re.fullmatch(regex, o.text) for o in out.outputs), texts([out])
    assert all(o.metrics.n_prefilled_tokens < len(loop) for o in outs)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """The tiny llama_mqa checkpoint (vocab 400) with the 400-piece llama-style tokenizer.model:
    a vocab whose decode strips the leading space (sentencepiece's dummy prefix)."""
    import shutil

    from conftest import HF_DIR

    d = tmp_path_factory.mktemp("spm_model")
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(HF_DIR / "llama_mqa" / f, d / f)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(HF_DIR.parent / "tokenizer" / "spm_llama" / f, d / f)
    return d


def test_a_choice_keeps_its_leading_space_on_an_spm_vocab(make_llm, spm_model):
    """The grammar matched " cache" ("▁cache"); decode() strips the first space of a decode, so
    the output once printed "cache", not one of the choices."""
    llm = make_llm(spm_model)
    choices = (" the", " cache")
    params = [
        sampled(StructuredOutputsParams(choice=choices), s, temperature=1.0) for s in range(4)
    ]
    outs = llm.generate(["hello"] * 4, params)
    assert set(texts(outs)) <= set(choices)
    streamed = "".join(d.text for d in llm.stream("hello", params[0]))
    assert streamed == outs[0].outputs[0].text
    free = llm.generate("hello", SamplingParams(max_tokens=8, temperature=0))[0].outputs[0]
    assert free.text == llm.tokenizer.decode(free.token_ids, skip_special_tokens=True)


# -- the real default model -------------------------------------------------------------------

REAL_SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array_enum_range": {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "score": {"type": "number", "minimum": 0, "maximum": 10},
        },
        "required": ["colors", "score"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def real_llm():
    from tinyserve import LLM

    return LLM(str(default_model_gguf()))


def _chat_prompts(llm, text: str, k: int):
    return [llm.chat_prompt([{"role": "user", "content": text}])] * k


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(REAL_SCHEMAS))
def test_real_model_20_sampled_outputs_validate(real_llm, name):
    schema = REAL_SCHEMAS[name]
    so = StructuredOutputsParams(json=schema)
    # room for the longest value the schema allows: a 20-character string sampled at
    # temperature 1 may be CJK, up to 3 byte-level tokens a character
    params = [sampled(so, seed, max_tokens=256, temperature=1.0) for seed in range(20)]
    prompt = f"Reply with a JSON object matching this schema: {json.dumps(schema)}"
    outs = real_llm.generate(_chat_prompts(real_llm, prompt, 20), params)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text  # the grammar closed
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


@pytest.mark.real_model
def test_real_model_regex_and_choice(real_llm):
    regex = r"\d{3}-\d{4}"
    choices = ["Paris", "London", "Rome"]
    params = [sampled(StructuredOutputsParams(regex=regex), s, 16) for s in range(20)]
    params += [sampled(StructuredOutputsParams(choice=choices), s, 16) for s in range(20)]
    prompts = _chat_prompts(real_llm, "Give a phone number.", 20)
    prompts += _chat_prompts(real_llm, "What is the capital of France?", 20)
    got = texts(real_llm.generate(prompts, params))
    assert all(re.fullmatch(regex, t) for t in got[:20])
    assert set(got[20:]) <= set(choices)


@pytest.mark.real_model
def test_real_model_greedy_json_unchanged_by_a_schema_it_satisfies(real_llm):
    prompt = _chat_prompts(
        real_llm, 'Reply only with this JSON, nothing else: {"city": "Paris", "year": 2024}', 1
    )
    free = real_llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    value = json.loads(free.text)  # the prompt is chosen so that the free answer is this JSON
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["city", "year"],
    }
    jsonschema.validate(value, schema)
    params = SamplingParams(max_tokens=24, temperature=0, structured_outputs={"json": schema})
    out = real_llm.generate(prompt, params)[0].outputs[0]
    assert out.text == free.text
