"""Chat templates: a model's jinja2 template rendered in HF's sandbox, with HF's helpers.

The environment matches transformers' chat-template rendering: an immutable sandbox (a template
cannot mutate its inputs or reach unsafe attributes), trim/lstrip blocks, loop controls, and
the helpers templates expect (raise_exception, tojson, strftime_now).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .errors import RequestError, TokenizerError


def check_messages(messages: Any) -> None:
    """Raise RequestError unless messages is a list of dicts that each have a role."""
    if not isinstance(messages, Sequence) or not all(
        isinstance(m, Mapping) and "role" in m for m in messages
    ):
        raise RequestError("messages must be a list of {'role': ..., 'content': ...} dicts")


def compile_chat_template(source: str) -> Any:
    """Template text -> a jinja2 Template in the sandbox (TokenizerError if it does not compile)."""
    import jinja2

    try:
        return _jinja_env().from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {_first_line(e)}") from e
    except RecursionError:  # jinja2's parser recurses once per nested bracket
        raise TokenizerError("chat template does not compile: it nests too deeply") from None
    except SyntaxError as e:  # jinja2 lets {% break %} outside a loop through to Python's compile
        raise TokenizerError(f"chat template does not compile: {e.msg}") from None


def render_chat_template(
    template: Any,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    variables: Mapping[str, Any],
) -> str:
    """Render a compiled template; any failure inside it becomes a TokenizerError."""
    try:
        return template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except Exception as e:  # raise_exception, SecurityError, or a template's own bug
        raise TokenizerError(f"chat template error: {_first_line(e)}") from e


def pick_template(t: Any) -> str | None:
    """tokenizer_config chat_template: a string, or a list of {name, template} (take "default")."""
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        if "default" in named:
            return named["default"]
        raise TokenizerError(
            f"chat_template list has no 'default' entry (has {sorted(map(str, named))})"
        )
    raise TokenizerError(f"chat_template must be a string or a list, got {type(t).__name__}")


def _jinja_env() -> Any:
    """HF's chat-template environment: immutable sandbox, trim/lstrip blocks, its helpers."""
    import jinja2.ext
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class StrictSandbox(ImmutableSandboxedEnvironment):
        """Touching an unsafe attribute raises at once instead of yielding an Undefined."""

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
            )

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
