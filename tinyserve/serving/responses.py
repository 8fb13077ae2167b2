"""The OpenAI Responses API (POST /v1/responses): request bodies -> chat messages and
SamplingParams; engine outputs -> a Response object, or its stream of typed events.

Input is a string or a list of message items; `instructions` becomes a system message in front;
both are rendered with the model's chat template, as /v1/chat/completions does. `text.format`
json_schema / json_object constrain the output through structured output. Nothing is stored, so
`previous_response_id` is refused.
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
from .protocol import _SAMPLING, HTTPError, _check_fields, _field, _sampling_params

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


def parse(body: dict, max_tokens_limit: int) -> tuple[list[dict], SamplingParams]:
    """A /v1/responses body -> (chat messages, SamplingParams); HTTPError 400 naming the field."""
    _check_fields(body, FIELDS)
    if body.get("previous_response_id") is not None:
        raise HTTPError(
            400,
            "'previous_response_id' is not supported: this server stores no responses; "
            "send the whole conversation in 'input'",
            "previous_response_id",
        )
    if body.get("tools"):
        raise HTTPError(400, "'tools' is not supported in /v1/responses yet", "tools")
    max_tokens = _field(body, "max_output_tokens", "int")
    if max_tokens is not None and max_tokens < 1:
        raise HTTPError(
            400, f"max_output_tokens must be >= 1, got {max_tokens}", "max_output_tokens"
        )
    params = _sampling_params(body, max_tokens, None, max_tokens_limit)
    fmt = _text_format(body)
    if fmt is not None:
        params = dataclasses.replace(params, structured_outputs=fmt)
    return _messages(body), params


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
        if not isinstance(item, dict) or item.get("type", "message") != "message":
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
    """One Response: its JSON when done, or the typed events of its stream."""

    def __init__(self, model: str, body: dict, params: SamplingParams):
        self.model, self.body, self.params = model, body, params
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
            "tools": [],
            "top_p": self.params.top_p,
            "truncation": body.get("truncation", "disabled"),
            "usage": None,
            "user": body.get("user"),
        }
        if out is not None and out.finished:
            o = out.outputs[0]
            length = o.finish_reason == "length"
            r["status"] = "incomplete" if length else "completed"
            r["incomplete_details"] = {"reason": "max_output_tokens"} if length else None
            r["output"] = [self.message(o.text, "incomplete" if length else "completed")]
            n_in, n_out = len(out.prompt_token_ids), len(o.token_ids)
            r["usage"] = {
                "input_tokens": n_in,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": n_out,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": n_in + n_out,
            }
        return r

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
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        yield self.event("response.created", response=self.response(None))
        yield self.event("response.in_progress", response=self.response(None))
        yield self.event(
            "response.output_item.added", output_index=0, item=self.message(None, "in_progress")
        )
        yield self.event("response.content_part.added", **where, part=self.part(""))
        text, last = "", None
        try:
            async for out in outputs:
                last = out
                delta = out.deltas[0].text if out.deltas else ""
                if delta:
                    text += delta
                    yield self.event(
                        "response.output_text.delta", **where, delta=delta, logprobs=[]
                    )
        except HTTPError as e:
            yield self.event("error", code=e.code, message=e.message, param=e.param)
            return
        final = self.response(last)
        status = final["output"][0]["status"] if final["output"] else "completed"
        yield self.event("response.output_text.done", **where, text=text, logprobs=[])
        yield self.event("response.content_part.done", **where, part=self.part(text))
        yield self.event(
            "response.output_item.done", output_index=0, item=self.message(text, status)
        )
        # always response.completed, the status inside saying "incomplete" at max_output_tokens
        # (as vLLM sends it; OpenAI names that event response.incomplete)
        yield self.event("response.completed", response=final)
