"""The Responses API (/v1/responses) through the official openai client, streaming and not.

Oracle: the text equals LLM.chat on a second LLM over the same checkpoint, with the instructions
as a system message; the streamed events add up to the same text, in the order the SDK expects."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from conftest import default_model_gguf
from test_server import FIXTURE, LIMITS, MODEL, assert_error, greedy, running

from tinyserve import LLM, SamplingParams
from tinyserve.serving import ServerConfig, create_app
from tinyserve.structured import StructuredOutputsParams

EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture(scope="module")
def ref() -> LLM:
    return LLM(str(FIXTURE), backend="numpy")


@pytest.fixture(scope="module")
def url():
    app = create_app(LLM(str(FIXTURE), backend="numpy"), ServerConfig(model_name=MODEL, **LIMITS))
    with running(app) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_text_input_with_instructions_equals_llm_chat(client, ref):
    r = client.responses.create(
        model=MODEL,
        input="Tell me a story",
        instructions="Be brief.",
        max_output_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me a story"},
    ]
    want = ref.chat(messages, greedy(10))[0]
    assert r.output_text == want.outputs[0].text and r.object == "response"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage.input_tokens == len(ref.chat_prompt(messages))
    assert r.usage.output_tokens == 10 and r.usage.total_tokens == r.usage.input_tokens + 10
    assert r.id.startswith("resp_") and r.max_output_tokens == 10


def test_message_items_and_sampling(client, ref):
    items = [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
        {"type": "message", "role": "user", "content": "again"},
    ]
    r = client.responses.create(
        model=MODEL, input=items, max_output_tokens=8, temperature=0.8, top_p=0.9,
        extra_body={"seed": 4, "ignore_eos": True},
    )  # fmt: skip
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=4, ignore_eos=True)
    assert r.output_text == ref.chat(messages, params)[0].outputs[0].text


def test_streaming_events_in_order_and_adding_up(client, ref):
    stream = client.responses.create(
        model=MODEL,
        input="Tell me a story",
        max_output_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    events = list(stream)
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1, "one delta is not a stream"
    assert [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]] == EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    want = ref.chat([{"role": "user", "content": "Tell me a story"}], greedy(12))[0].outputs[0].text
    done = events[-1].response
    assert "".join(deltas) == want == done.output_text
    assert events[kinds.index("response.output_text.done")].text == want
    assert done.usage.output_tokens == 12 and events[0].response.status == "in_progress"
    assert len({e.item_id for e in events if hasattr(e, "item_id")}) == 1


def test_text_format_json_schema_constrains_the_output(client, ref):
    schema = {"type": "string", "enum": ["yes", "no", "maybe"]}
    r = client.responses.create(
        model=MODEL,
        input="Is the sky blue?",
        max_output_tokens=10,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema}},
    )
    assert json.loads(r.output_text) in ("yes", "no", "maybe")
    params = SamplingParams(
        max_tokens=10, temperature=0, structured_outputs=StructuredOutputsParams(json=schema)
    )
    want = ref.chat([{"role": "user", "content": "Is the sky blue?"}], params)[0].outputs[0]
    assert r.output_text == want.text


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}


@pytest.fixture(scope="module")
def real():
    """The default model (the tiny fixture's context is too short for a tools prompt): a
    server, its client and a second LLM as the oracle."""
    path = str(default_model_gguf())
    app = create_app(LLM(path), ServerConfig(model_name=MODEL))
    with running(app) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0), LLM(path)


def _chat_call(ref, messages, n_tokens=40):
    params = SamplingParams(max_tokens=n_tokens, temperature=0)
    return ref.chat(messages, params, tools=[CHAT_WEATHER], tool_choice="required")[0].outputs[0]


@pytest.mark.real_model
def test_function_tools_required_give_a_function_call_item(real):
    jsonschema = pytest.importorskip("jsonschema")
    client, ref = real
    r = client.responses.create(
        model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
        max_output_tokens=40, temperature=0,
    )  # fmt: skip
    calls = [item for item in r.output if item.type == "function_call"]
    want = _chat_call(ref, [{"role": "user", "content": "Weather in Paris?"}]).tool_calls
    assert [(c.name, c.arguments) for c in calls] == [(w.name, w.arguments) for w in want]
    assert calls and all(c.call_id.startswith("call_") for c in calls)
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    named = client.responses.create(
        model=MODEL, input="Weather?", tools=[WEATHER], max_output_tokens=40, temperature=0,
        tool_choice={"type": "function", "name": "get_weather"},
    )  # fmt: skip
    assert [item.name for item in named.output if item.type == "function_call"] == ["get_weather"]


@pytest.mark.real_model
def test_streamed_function_call_events(real):
    client, ref = real
    events = list(
        client.responses.create(
            model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
            max_output_tokens=40, temperature=0, stream=True,
        )
    )  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert "function_call" in [item.type for item in added]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    final = [item for item in events[-1].response.output if item.type == "function_call"]
    assert [d.arguments for d in done] == [c.arguments for c in final] and final
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == "".join(c.arguments for c in final)
    want = _chat_call(ref, [{"role": "user", "content": "Weather in Paris?"}]).tool_calls
    assert [c.arguments for c in final] == [w.arguments for w in want]


@pytest.mark.real_model
def test_function_call_output_items_in_the_history(real):
    client, ref = real
    args = '{"city": "Paris"}'
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": args},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
    ]
    r = client.responses.create(
        model=MODEL, input=items, tools=[WEATHER], max_output_tokens=8, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]  # fmt: skip
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = ref.chat(messages, params, tools=[CHAT_WEATHER])[0].outputs[0]
    assert r.output_text == want.text


BAD_PARAMETERS = {"type": "object", "properties": {"x": {"type": "nonsense"}}}
JSON_FORMAT = {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}}
BAD = [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": [{**WEATHER, "parameters": BAD_PARAMETERS}]}, "tools"),
    (
        {
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "no"}}},
        },
        "text",
    ),
    (
        {"input": "x", "tools": [WEATHER], "tool_choice": "required", "text": JSON_FORMAT},
        "tool_choice",
    ),
    (
        {"input": "x", "tool_choice": {"type": "function", "name": "g"}, "tools": [WEATHER]},
        "tool_choice",
    ),
    ({"input": "x", "tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "bogus": 1}, "bogus"),
    ({"input": ""}, "input"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": -1}, "temperature"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_bad_input_is_a_400_naming_the_field(url, body, param):
    r = httpx.post(url + "/v1/responses", json=body, timeout=10)
    assert_error(r, 400, param)


def test_previous_response_id_is_refused_with_the_sdk(client):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_1")
