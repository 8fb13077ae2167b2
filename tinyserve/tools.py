"""Tool calling: OpenAI `tools` into the prompt, the model's call syntax back out as tool calls.

Shared by `LLM.chat(..., tools=...)` and the server's /v1/chat/completions.

- A chat template that takes `tools` (Qwen, Llama 3.1, Mistral) renders them itself. For one
  without a tools section (SmolLM2's) the default is Hermes-style, as Qwen2.5's template writes
  it: the function signatures as JSON lines inside <tools></tools> in a system message, and
  calls expected as <tool_call>{"name": ..., "arguments": {...}}</tool_call>. Earlier calls and
  tool results in the history are written the same way for such a template.
- The output is parsed back in the template's syntax: Hermes <tool_call> blocks, Mistral's
  [TOOL_CALLS] [...] list, or Llama 3.1's bare {"name": ..., "parameters": ...} object.
- tool_choice "required" or a named function constrains the output with the structured-output
  grammar engine, so a call always comes and its arguments always validate against the
  function's JSON schema; "auto" leaves the model free; "none" offers no tools.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError
from .structured import StructuredOutputsParams

DEFAULT_TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call the model made; arguments is JSON text, as OpenAI returns it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def check_tools(tools: Any) -> list[dict]:
    """OpenAI `tools` -> the same list, checked; RequestError naming the field at fault."""
    if not isinstance(tools, list) or not tools:
        raise RequestError("tools must be a non-empty array")
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise RequestError(f"{where}: only {{'type': 'function', 'function': ...}} tools")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"{where}.function.name must be a non-empty string")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", fn["name"]):
            raise RequestError(f"{where}.function.name must match [A-Za-z0-9_.-]{{1,64}}")
        if fn["name"] in names:
            raise RequestError(f"{where}.function.name {fn['name']!r} is given twice")
        names.add(fn["name"])
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise RequestError(f"{where}.function.parameters must be a JSON schema of an object")
    return tools


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


class ToolPlan:
    """One request's tools: how they enter the prompt, what constrains the output, the parse."""

    def __init__(self, tools: Any, tool_choice: Any = "auto", parallel_tool_calls: bool = True):
        self.tools = check_tools(tools)
        self.parallel = bool(parallel_tool_calls)
        names = [t["function"]["name"] for t in self.tools]
        if tool_choice in (None, "auto", "none", "required"):
            self.choice, self.forced = tool_choice or "auto", None
        elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
            name = tool_choice["function"].get("name")
            if name not in names:
                raise RequestError(f"tool_choice names {name!r}, which is not among the tools")
            self.choice, self.forced = "named", name
        else:
            raise RequestError(
                "tool_choice must be 'none', 'auto', 'required' or "
                "{'type': 'function', 'function': {'name': ...}}"
            )

    @property
    def offers_tools(self) -> bool:
        return self.choice != "none"

    # -- into the prompt ------------------------------------------------------------------------

    def render(self, tokenizer, messages: list[dict]) -> str:
        """The conversation and the tools through the chat template (or the Hermes default)."""
        template = tokenizer.chat_template or ""
        if "tools" in template:  # the template has its own tools section and call syntax
            history = [_for_template(m) for m in messages]
            extra = {"tools": self.tools} if self.offers_tools else {}
            return tokenizer.apply_chat_template(history, add_generation_prompt=True, **extra)
        history = [_as_hermes(m) for m in messages]
        if self.offers_tools:
            listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools)
            prompt = DEFAULT_TOOLS_PROMPT.format(tools=listing)
            if history and history[0]["role"] == "system":
                history[0] = {"role": "system", "content": history[0]["content"] + "\n\n" + prompt}
            else:
                history.insert(0, {"role": "system", "content": prompt})
        return tokenizer.apply_chat_template(history, add_generation_prompt=True)

    # -- the constraint -------------------------------------------------------------------------

    def constraint(self, syntax: str) -> StructuredOutputsParams | None:
        """For "required" / a named function: a grammar that admits only well-formed calls."""
        if self.choice not in ("required", "named"):
            return None
        chosen = [t for t in self.tools if self.forced in (None, t["function"]["name"])]
        key = "parameters" if syntax == "json" else "arguments"
        call = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": t["function"]["name"]}, key: _parameters(t)},
                    "required": ["name", key],
                    "additionalProperties": False,
                }
                for t in chosen
            ],
            "x-guidance": _COMPACT,
        }
        many = self.parallel and self.choice == "required"
        if syntax == "mistral":
            calls = {"type": "array", "items": call, "minItems": 1, "x-guidance": _COMPACT}
            if not many:
                calls["maxItems"] = 1
            return StructuredOutputsParams(
                grammar=f'start: "[TOOL_CALLS]" %json {json.dumps(calls)}'
            )
        if syntax == "json":
            return StructuredOutputsParams(grammar=f"start: %json {json.dumps(call)}")
        repeat = ' ("\\n" call)*' if many else ""
        lark = (  # a newline may follow the last call, as models write one before their end token
            f'start: call{repeat} "\\n"?\n'
            'call: "<tool_call>\\n" body "\\n</tool_call>"\n'
            f"body: %json {json.dumps(call)}"
        )
        return StructuredOutputsParams(grammar=lark)

    def check_parameters(self, compile) -> None:
        """Compile each function's parameters schema (compile: spec -> matcher, raising
        RequestError); RequestError naming the tool whose schema the grammar engine refuses."""
        for i, tool in enumerate(self.tools):
            try:
                compile(StructuredOutputsParams(json=_parameters(tool)))
            except RequestError as e:
                raise RequestError(f"tools[{i}].function.parameters: {e}") from None

    def sampling_params(self, params, syntax: str):
        """params with the constraint of tool_choice; Mistral's [TOOL_CALLS] kept in the text."""
        so = self.constraint(syntax)
        if so is not None and params.structured_outputs is not None:
            raise RequestError(
                "tool_choice 'required' or a named function cannot be combined "
                "with another structured output constraint"
            )
        changes: dict[str, Any] = {} if so is None else {"structured_outputs": so}
        if syntax == "mistral":
            changes["skip_special_tokens"] = False
        return dataclasses.replace(params, **changes) if changes else params

    # -- out of the text ------------------------------------------------------------------------

    def parse(self, text: str, syntax: str) -> tuple[str | None, list[ToolCall]]:
        """Output text -> (the content left, the tool calls in it)."""
        if not self.offers_tools:
            return text, []
        return parse_tool_calls(text, syntax, {t["function"]["name"] for t in self.tools})


def apply_tool_calls(o, plan: ToolPlan, syntax: str) -> None:
    """A finished CompletionOutput: tool calls out of its text into o.tool_calls."""
    content, calls = plan.parse(o.text, syntax)
    if calls:
        o.text, o.tool_calls = content or "", calls
        if o.finish_reason == "stop":
            o.finish_reason = "tool_calls"


def call_syntax(tokenizer) -> str:
    """How the model writes calls: "hermes" (the default), "mistral" or "json" (Llama 3.1)."""
    template = tokenizer.chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "tools" in template and "<tool_call>" not in template:
        return "json"
    return "hermes"


def parse_tool_calls(text: str, syntax: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """Text -> (content without the calls, or None if nothing is left; the calls)."""
    if syntax == "mistral" and "[TOOL_CALLS]" in text:
        before, _, after = text.partition("[TOOL_CALLS]")
        found = _json_value(after)
        objs = found if isinstance(found, list) else [found]
        calls = [c for c in map(_call, objs) if c is not None]
        return (before.strip() or None, calls) if calls else (text, [])
    if syntax == "json":
        body = text.replace("<|python_tag|>", "").strip()
        obj = _json_value(body)
        call = _call(obj) if isinstance(obj, dict) and obj.get("name") in names else None
        return (None, [call]) if call else (text, [])
    calls = [c for c in (_call(_json_value(m.group(1))) for m in _HERMES.finditer(text)) if c]
    if not calls:
        return text, []
    content = _HERMES.sub("", text).strip()
    return content or None, calls


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(obj: Any) -> ToolCall | None:
    """{"name": ..., "arguments" | "parameters": {...}} -> a ToolCall (None if it is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        args = _json_value(args)
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _arguments(call: dict) -> Any:
    """An assistant message's tool call -> its arguments as a dict (templates expect one)."""
    args = call.get("function", {}).get("arguments", {})
    if isinstance(args, str):
        parsed = _json_value(args)
        return parsed if isinstance(parsed, dict) else args
    return args


def _for_template(m: dict) -> dict:
    """A history message for a template with a tools section: arguments as dicts (vLLM too)."""
    if not m.get("tool_calls"):
        return m
    calls = [
        {**c, "function": {**c.get("function", {}), "arguments": _arguments(c)}}
        for c in m["tool_calls"]
    ]
    return {**m, "tool_calls": calls}


def _as_hermes(m: dict) -> dict:
    """A history message for a template without tools: calls and results written out in text."""
    if m["role"] == "tool":
        body = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
        return {"role": "user", "content": body}
    if m.get("tool_calls"):
        blocks = [
            "<tool_call>\n"
            + json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)})
            + "\n</tool_call>"
            for c in m["tool_calls"]
        ]
        text = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
        return {"role": "assistant", "content": text}
    return m


class ToolCallStream:
    """Streamed text -> content deltas and tool calls, as soon as each is certain.

    Text that may be the start of a call is held back; a Hermes call is handed out when its
    </tool_call> arrives, the other syntaxes' calls (which run to the end) at finish."""

    def __init__(self, plan: ToolPlan, syntax: str):
        self.plan, self.syntax = plan, syntax
        self.text = ""
        self.n_content = 0  # characters of content handed out
        self.n_calls = 0

    def _marker(self) -> str:
        return {"mistral": "[TOOL_CALLS]", "hermes": "<tool_call>"}.get(self.syntax, "")

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self.text += delta
        if not self.plan.offers_tools:
            return self._content(len(self.text)), []
        if self.syntax == "json":  # a bare JSON call starts the output; anything else is content
            head = self.text.lstrip()
            if not head or head[0] in "{<":
                return "", []
            return self._content(len(self.text)), []
        marker = self._marker()
        start = self.text.find(marker)
        if start < 0:  # hold back a tail that may be the marker's beginning
            keep = next(
                (k for k in range(len(marker) - 1, 0, -1) if self.text.endswith(marker[:k])), 0
            )
            return self._content(len(self.text) - keep), []
        content = self._content(start)
        if self.syntax != "hermes":
            return content, []
        closed = self.text[: self.text.rfind("</tool_call>") + len("</tool_call>")]
        _, calls = parse_tool_calls(closed, "hermes", set())
        new, self.n_calls = calls[self.n_calls :], len(calls)
        return content, new

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end: what is left of the content and the calls not yet handed out."""
        _, calls = self.plan.parse(self.text, self.syntax)
        if not calls:
            return self._content(len(self.text)), []
        tail = self.text.rpartition("</tool_call>")[2] if self.syntax == "hermes" else ""
        return tail.strip(), calls[self.n_calls :]

    def _content(self, end: int) -> str:
        out = self.text[self.n_content : end] if end > self.n_content else ""
        self.n_content = max(self.n_content, end)
        return out
