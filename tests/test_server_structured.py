"""Structured output and tool calls through the server, driven by the official openai client.

Oracles: the server's constrained answer equals LLM.generate under the same constraint on an
independent LLM; outputs validate with jsonschema; bad schemas and tools are 400s that name
their field; on the real default model a forced tool call's arguments validate, streamed or not.
"""

from __future__ import annotations

import json

import pytest
from conftest import TINY, default_model_gguf
from test_server import assert_error, running

from tinyserve import LLM, SamplingParams
from tinyserve.serving import ServerConfig, create_app

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {"b": {"enum": ["x", "y"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["b", "n"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def tiny():
    app = create_app(LLM(str(TINY), backend="numpy"), ServerConfig(model_name="tiny"))
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def ref() -> LLM:
    return LLM(str(TINY), backend="numpy")


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_response_format_json_schema_equals_the_library(tiny, ref):
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}}
    r = _client(tiny).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=48, seed=3, n=3,
        response_format=fmt,
    )  # fmt: skip
    params = SamplingParams(max_tokens=48, seed=3, n=3, structured_outputs={"json": SCHEMA})
    want = ref.chat([{"role": "user", "content": "hi"}], params)[0].outputs
    assert [c.message.content for c in r.choices] == [o.text for o in want]
    done = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert done  # the tiny random model may still be inside the object at max_tokens
    for text in done:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_vllm_structured_outputs(tiny):
    client = _client(tiny)
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=48, seed=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    choices = ["red", "green", "blue"]
    for seed in range(4):
        c = client.completions.create(
            model="tiny", prompt="my favourite colour is", max_tokens=8, seed=seed,
            extra_body={"structured_outputs": {"choice": choices}},
        )  # fmt: skip
        assert c.choices[0].text in choices and c.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12, stream=True,
        extra_body={"structured_outputs": {"regex": "[0-9]{4}"}},
    )  # fmt: skip
    assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices).isdigit()


BAD_TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}},
    },
}


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "no"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"structured_outputs": {"regex": "(("}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
         "response_format"),
        ({"tools": [BAD_TOOL]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
         "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required",
          "structured_outputs": {"regex": "a"}}, "tool_choice"),
    ],
)  # fmt: skip
def test_bad_constraints_and_tools_are_400s_naming_the_field(tiny, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}
    with httpx.Client(base_url=tiny, timeout=10) as http:
        assert_error(http.post("/v1/chat/completions", json=body), 400, param)
        assert http.get("/health").json() == {"status": "ok"}


# -- tool calls on the real default model -------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    app = create_app(LLM(str(default_model_gguf())), ServerConfig(model_name="smol"))
    with running(app) as url:
        yield _client(url)


def _validate_call(call, tool=WEATHER):
    assert call.type == "function" and call.id
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


@pytest.mark.real_model
@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_real_model_forced_tool_call_validates(real, choice):
    r = real.chat.completions.create(
        model="smol", messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=48,
        temperature=1.0, seed=1, parallel_tool_calls=False,
    )  # fmt: skip
    (c,) = r.choices
    assert c.finish_reason == "tool_calls"
    (call,) = c.message.tool_calls
    _validate_call(call)


@pytest.mark.real_model
def test_real_model_streamed_tool_call_equals_the_whole_answer(real):
    kw = {"model": "smol", "messages": ASK, "tools": [WEATHER], "tool_choice": "required"}
    kw |= {"max_tokens": 48, "temperature": 0, "parallel_tool_calls": False}
    whole = real.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in real.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                got = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
                got["id"] = got["id"] or d.id
                got["name"] += (d.function and d.function.name) or ""
                got["arguments"] += (d.function and d.function.arguments) or ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (t.function.name, t.function.arguments) for t in whole.message.tool_calls
    ]
    assert all(c["id"] for c in calls.values())
    _validate_call(whole.message.tool_calls[0])


@pytest.mark.real_model
def test_real_model_takes_a_tool_result_in_the_history(real):
    history = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    r = real.chat.completions.create(model="smol", messages=history, tools=[WEATHER], max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 100  # the tools and the whole history reached the prompt
