"""Tool calling (tinyserve/tools.py): tools into the prompt, calls out of the text.

Oracles: the calls parsed from each template's syntax equal the ones written into it; a
streamed output cut at every possible point hands out the same content and calls as the whole
text; a forced call's grammar admits a valid call and refuses one that breaks the schema.
"""

from __future__ import annotations

import json

import pytest

from tinyserve.errors import RequestError
from tinyserve.tokenizer import Tokenizer
from tinyserve.tools import ToolCallStream, ToolPlan, call_syntax, parse_tool_calls

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
NAMES = {"get_weather", "get_time"}


class _Template:
    """Just what ToolPlan.render and call_syntax read of a tokenizer."""

    def __init__(self, source: str):
        self.chat_template = source
        self.seen: dict = {}

    def apply_chat_template(self, messages, add_generation_prompt=True, **kw):
        self.seen = {"messages": messages, **kw}
        return json.dumps(self.seen)


@pytest.mark.parametrize(
    "syntax, text, content",
    [
        (
            "hermes",
            (
                'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
                '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
            ),
            "Let me check.",
        ),
        (
            "mistral",
            (
                '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "get_time", "arguments": {}}]'
            ),
            None,
        ),
    ],
)
def test_calls_parse_back_from_each_syntax(syntax, text, content):
    got_content, calls = parse_tool_calls(text, syntax, NAMES)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2


def test_llama_json_call_parses_only_for_a_known_function():
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}'
    _, calls = parse_tool_calls(text, "json", NAMES)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Rome"})]
    plain = '{"name": "Ada", "parameters": {}}'  # JSON, but no tool of that name
    assert parse_tool_calls(plain, "json", NAMES) == (plain, [])
    assert parse_tool_calls("no calls here", "hermes", NAMES) == ("no calls here", [])


def test_a_template_without_tools_gets_the_hermes_default():
    tok = _Template("{% for m in messages %}{{ m.content }}{% endfor %}")
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": '{"t": 21}'},
    ]
    ToolPlan([WEATHER]).render(tok, history)
    msgs = tok.seen["messages"]
    assert "tools" not in tok.seen and call_syntax(tok) == "hermes"
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("Be brief.")
    assert json.dumps(WEATHER) in msgs[0]["content"] and "<tool_call>" in msgs[0]["content"]
    call = msgs[2]["content"]
    assert parse_tool_calls(call, "hermes", NAMES)[1][0].arguments == '{"city": "Paris"}'
    assert msgs[3] == {"role": "user", "content": '<tool_response>\n{"t": 21}\n</tool_response>'}
    ToolPlan([WEATHER], "none").render(tok, history[1:2])
    assert tok.seen["messages"] == history[1:2]  # "none" offers no tools


def test_a_template_with_tools_renders_them_itself():
    tok = _Template("{% if tools %}{{ tools | tojson }}{% endif %}")
    call = {"id": "1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ToolPlan([WEATHER]).render(tok, [{"role": "assistant", "content": "", "tool_calls": [call]}])
    assert tok.seen["tools"] == [WEATHER]
    # templates index arguments as a mapping: they get the parsed object, as vLLM gives them
    assert tok.seen["messages"][0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert call_syntax(tok) == "json"
    assert call_syntax(_Template("{{ tools }}[TOOL_CALLS]")) == "mistral"
    assert call_syntax(_Template("{{ tools }}<tool_call>")) == "hermes"


@pytest.mark.parametrize("syntax", ["hermes", "mistral", "json"])
def test_streamed_pieces_give_the_whole_texts_content_and_calls(syntax):
    texts = {
        "hermes": 'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
        '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
        "mistral": '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]',
        "json": '{"name": "get_time", "parameters": {}}',
    }
    plan = ToolPlan([WEATHER, TIME])
    text = texts[syntax]
    whole_content, whole_calls = parse_tool_calls(text, syntax, NAMES)
    for cut in range(1, len(text)):
        for step in (1, 7):
            stream = ToolCallStream(plan, syntax)
            content, calls = "", []
            pieces = [text[:cut]] + [text[i : i + step] for i in range(cut, len(text), step)]
            for piece in pieces:
                c, new = stream.feed(piece)
                content, calls = content + c, calls + new
            c, new = stream.finish()
            content, calls = content + c, calls + new
            assert content.strip() == (whole_content or "")
            assert [(t.name, t.arguments) for t in calls] == [
                (t.name, t.arguments) for t in whole_calls
            ]


def test_plain_text_streams_through_untouched():
    stream = ToolCallStream(ToolPlan([WEATHER]), "hermes")
    assert stream.feed("Hello <tool") == ("Hello ", [])  # may be a call's start: held back
    assert stream.feed("s are fun") == ("<tools are fun", [])
    assert stream.finish() == ("", [])


@pytest.mark.parametrize(
    "tools, choice, match",
    [
        ([], "auto", "non-empty array"),
        ([{"type": "retrieval"}], "auto", r"tools\[0\]"),
        ([{"type": "function", "function": {"name": "a b"}}], "auto", r"tools\[0\].function.name"),
        ([WEATHER, WEATHER], "auto", "given twice"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            "auto",
            r"tools\[0\].function.parameters",
        ),
        ([WEATHER], "sometimes", "tool_choice must be"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    ],
)
def test_bad_tools_and_choices_are_request_errors(tools, choice, match):
    with pytest.raises(RequestError, match=match):
        ToolPlan(tools, choice)


def test_a_forced_call_grammar_admits_valid_calls_only():
    llg = pytest.importorskip("llguidance")
    from conftest import TINY

    tok = Tokenizer.from_dir(TINY)
    lt = llg.LLTokenizer(tok.tokenizers_json(), n_vocab=tok.vocab_size, eos_token=[2])
    from tinyserve.structured import grammar_text

    def admits(plan: ToolPlan, text: str) -> bool:
        m = llg.LLMatcher(lt, grammar_text(plan.constraint("hermes")), log_level=0)
        assert not m.is_error(), m.get_error()
        return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()

    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    bad_args = '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Oslo"}}\n</tool_call>'
    assert admits(ToolPlan([WEATHER, TIME], "required"), good)
    assert not admits(ToolPlan([WEATHER, TIME], "required"), bad_args)
    named_time = ToolPlan([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert not admits(named_time, good)
    assert admits(ToolPlan([WEATHER], "required"), good + "\n" + good)
    assert not admits(
        ToolPlan([WEATHER], "required", parallel_tool_calls=False), good + "\n" + good
    )
    assert ToolPlan([WEATHER], "auto").constraint("hermes") is None
