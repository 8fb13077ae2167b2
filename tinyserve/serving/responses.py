"""The OpenAI Responses API (POST /v1/responses): request bodies -> chat messages and
SamplingParams; engine outputs -> a Response object, or its stream of typed events.

Input is a string or a list of message items; `instructions` becomes a system message in front;
both are rendered with the model's chat template, as /v1/chat/completions does. `text.format`
json_schema / json_object constrain the output through structured output. Function `tools` (the
Responses API's flat form) go through the same ToolPlan as chat's: calls come back as
function_call output items, function_call / function_call_output items in the input become the
history's assistant tool_calls and tool messages. Nothing is stored, so `previous_response_id`
is refused.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator

from ..errors import RequestError
from ..outputs import RequestOutput
from ..sampling import SamplingParams
from ..structured import StructuredOutputsParams
from ..tools import ToolPlan
from .protocol import _SAMPLING, HTTPError, _check_fields, _field, _sampling_params, _tool_plan

FIELDS = {
    **_SAMPLING,
    "model": "str",
    "input": None,
    "instructions": "str",
    "max_output_tokens": "int",
    "stream": "bool",
    "text": "dict",
    "tools": "list",
    "tool_choice": None,
    "parallel_tool_calls": "bool",
    "previous_response_id": "str",
    "store": "bool",
    "metadata": "dict",
    "user": "str",
    "truncation": "str",
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text", "text")


def parse(body: dict, max_tokens_limit: int) -> tuple[list[dict], SamplingParams, ToolPlan | None]:
    """A /v1/responses body -> (chat messages, SamplingParams, the tools' plan); HTTPError 400
    naming the field."""
    _check_fields(body, FIELDS)
    if body.get("previous_response_id") is not None:
        raise HTTPError(
            400,
            "'previous_response_id' is not supported: this server stores no responses; "
            "send the whole conversation in 'input'",
            "previous_response_id",
        )
    max_tokens = _field(body, "max_output_tokens", "int")
    if max_tokens is not None and max_tokens < 1:
        raise HTTPError(
            400, f"max_output_tokens must be >= 1, got {max_tokens}", "max_output_tokens"
        )
    params = _sampling_params(body, max_tokens, None, max_tokens_limit)
    fmt = _text_format(body)
    if fmt is not None:
        params = dataclasses.replace(params, structured_outputs=fmt)
    return _messages(body), params, _tools(body)


def _tools(body: dict) -> ToolPlan | None:
    """The Responses API's flat function tools and tool_choice, in chat's nested form."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None:
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function":
                kind = t.get("type") if isinstance(t, dict) else t
                raise HTTPError(400, f"tools[{i}]: only function tools, got {kind!r}", "tools")
        keep = ("name", "description", "parameters")
        tools = [{"type": "function", "function": {k: t[k] for k in keep if k in t}} for t in tools]
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    chat = {"tools": tools, "tool_choice": choice}
    return _tool_plan({**chat, "parallel_tool_calls": body.get("parallel_tool_calls", True)})


def _messages(body: dict) -> list[dict]:
    items = body.get("input")
    if isinstance(items, str) and items:
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise HTTPError(400, "'input' must be a non-empty string or array of items", "input")
    messages = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "function_call":
            call = _call_of(item, i)
            if messages and messages[-1].get("tool_calls"):  # parallel calls: one message
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            continue
        if kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise HTTPError(400, f"input[{i}] needs a call_id and an output string", "input")
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            )
            continue
        if kind != "message":
            kind = item.get("type") if isinstance(item, dict) else type(item).__name__
            raise HTTPError(
                400, f"input[{i}]: only message items are supported, got {kind!r}", "input"
            )
        role = _ROLES.get(item.get("role"))
        if role is None:
            raise HTTPError(
                400, f"input[{i}] needs a role of system, developer, user or assistant", "input"
            )
        content = item.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict)
                and p.get("type") in _TEXT_PARTS
                and isinstance(p.get("text"), str)
                for p in content
            ):
                raise HTTPError(400, f"input[{i}].content: only text parts are supported", "input")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise HTTPError(400, f"input[{i}].content must be a string or text parts", "input")
        messages.append({"role": role, "content": content})
    return messages


def _call_of(item: dict, i: int) -> dict:
    """A function_call input item -> a chat tool call."""
    if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
        raise HTTPError(400, f"input[{i}] needs call_id, name and arguments strings", "input")
    fn = {"name": item["name"], "arguments": item["arguments"]}
    return {"id": item["call_id"], "type": "function", "function": fn}


def _text_format(body: dict) -> StructuredOutputsParams | None:
    """`text.format`: text (unconstrained), json_object, or json_schema (its `schema`)."""
    fmt = (body.get("text") or {}).get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    try:
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True)
        if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
            return StructuredOutputsParams(json=fmt["schema"])
    except RequestError as e:
        raise HTTPError(400, f"text.format: {e}", "text") from None
    raise HTTPError(
        400,
        "text.format must be {'type': 'text'}, {'type': 'json_object'} or "
        "{'type': 'json_schema', 'name': ..., 'schema': {...}}",
        "text",
    )


class ResponseFormatter:
    """One Response: its JSON when done, or the typed events of its stream.

    tools: (plan, call syntax) when the request offers tools: the text is parsed for calls once
    it is complete, so such a stream sends its items when the reply is done."""

    def __init__(self, model: str, body: dict, params: SamplingParams, tools=None):
        self.model, self.body, self.params, self.tools = model, body, params, tools
        self.id = "resp_" + uuid.uuid4().hex
        self.message_id = "msg_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.sequence_number = 0

    def response(self, out: RequestOutput | None) -> dict:
        """The Response object; out None: just created (in progress, no output yet)."""
        body = self.body
        r = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "model": self.model,
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {},
            "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "store": False,  # nothing is kept
            "temperature": self.params.temperature,
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": self.params.top_p,
            "truncation": body.get("truncation", "disabled"),
            "usage": None,
            "user": body.get("user"),
        }
        if out is not None and out.finished:
            o = out.outputs[0]
            r["output"] = self.items(o.text, o.finish_reason)
            if any(item["status"] == "incomplete" for item in r["output"]):
                r["status"] = "incomplete"
                r["incomplete_details"] = {"reason": "max_output_tokens"}
            else:
                r["status"] = "completed"
            if o.finish_reason == "error":  # the model's logits went NaN / Inf: not a whole answer
                r["status"] = "failed"
                r["error"] = {
                    "code": "server_error",
                    "message": "the model's logits are NaN or infinite",
                }
            n_in, n_out = len(out.prompt_token_ids), len(o.token_ids)
            r["usage"] = {
                "input_tokens": n_in,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": n_out,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": n_in + n_out,
            }
        return r

    def items(self, text: str, finish_reason: str | None) -> list[dict]:
        """The output items of a finished reply: its message, then its function calls."""
        status = "incomplete" if finish_reason == "length" else "completed"
        calls = []
        if self.tools is not None:
            plan, syntax = self.tools
            content, calls = plan.parse(text, syntax)
            text = content or ""
        items = [self.message(text, status)] if text or not calls else []
        for call in calls:
            items.append(
                {
                    "type": "function_call",
                    "id": "fc_" + uuid.uuid4().hex,
                    "call_id": call.id,
                    "name": call.name,
                    "arguments": call.arguments,
                    "status": "completed",
                }
            )
        return items

    def message(self, text: str | None, status: str) -> dict:
        """The assistant message item; text None: added, with no content yet."""
        content = [] if text is None else [self.part(text)]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def event(self, kind: str, **fields) -> str:
        """One SSE event: its type as the SSE event name and in the data, numbered in order."""
        data = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    async def events(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        """The stream the openai SDK iterates: created ... output_text.delta ... completed."""
        yield self.event("response.created", response=self.response(None))
        yield self.event("response.in_progress", response=self.response(None))
        live = self.tools is None  # text streams as it comes; with tools, once it is parsed
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        if live:
            yield self.event(
                "response.output_item.added", output_index=0, item=self.message(None, "in_progress")
            )
            yield self.event("response.content_part.added", **where, part=self.part(""))
        last = None
        try:
            async for out in outputs:
                last = out
                delta = out.deltas[0].text if out.deltas else ""
                if live and delta:
                    yield self.event(
                        "response.output_text.delta", **where, delta=delta, logprobs=[]
                    )
        except HTTPError as e:
            yield self.event("error", code=e.code, message=e.message, param=e.param)
            return
        final = self.response(last)
        for index, item in enumerate(final["output"]):
            for event in self._item_events(index, item, added=not live):
                yield event
        # always response.completed, the status inside saying "incomplete" at max_output_tokens
        # (as vLLM sends it; OpenAI names that event response.incomplete)
        yield self.event("response.completed", response=final)

    def _item_events(self, index: int, item: dict, added: bool) -> list[str]:
        """The events that finish one output item (and, unless streamed live, announce it)."""
        out = []
        if item["type"] == "function_call":
            where = {"item_id": item["id"], "output_index": index}
            args = item["arguments"]
            out.append(
                self.event(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
            )
            out.append(self.event("response.function_call_arguments.delta", **where, delta=args))
            out.append(self.event("response.function_call_arguments.done", **where, arguments=args))
        else:
            text = item["content"][0]["text"]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            if added:
                out.append(
                    self.event(
                        "response.output_item.added",
                        output_index=index,
                        item=self.message(None, "in_progress"),
                    )
                )
                out.append(self.event("response.content_part.added", **where, part=self.part("")))
                if text:
                    delta = {"delta": text, "logprobs": []}
                    out.append(self.event("response.output_text.delta", **where, **delta))
            out.append(self.event("response.output_text.done", **where, text=text, logprobs=[]))
            out.append(self.event("response.content_part.done", **where, part=self.part(text)))
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        return out
