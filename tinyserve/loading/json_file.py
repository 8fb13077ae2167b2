"""JSON files of a model folder (config.json, the shard index, tokenizer_config.json,
generation_config.json), read strictly: a file that is not a JSON object, or a field whose JSON
type is wrong, is a one-line ConfigError naming the file and the field, never a KeyError or an
AttributeError deep in the code that uses it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# JSON kinds a field may take; a field's entry in a table lists the kinds it accepts
_KINDS = {
    "null": lambda v: v is None,
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    # NaN and Infinity are not JSON, but Python's json reads them
    "number": lambda v: (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "int array": lambda v: isinstance(v, list) and all(_KINDS["int"](x) for x in v),
    "string array": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}
FieldTypes = Mapping[str, tuple[str, ...]]


def json_type(v: Any) -> str:
    """The JSON name of a value's type, for messages."""
    for name in ("null", "bool", "int", "number", "string", "array", "object"):
        if _KINDS[name](v):
            return name
    return "non-finite number" if isinstance(v, float) else type(v).__name__


def parse_json_object(text: str | bytes, source: str) -> dict[str, Any]:
    """JSON text that must be an object -> the dict; ConfigError naming source otherwise."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{source} nests too deeply to read") from None
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError of bytes
        raise ConfigError(f"{source} is not valid JSON: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} is not a JSON object (it is a {json_type(data)})")
    return data


def read_json_object(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    """A model folder's JSON object file -> dict ({} for an absent file when missing_ok)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ConfigError(f"no {path.name} at {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_json_object(raw, str(path))


def check_field_types(data: Mapping[str, Any], types: FieldTypes, source: str) -> None:
    """Raise ConfigError for the first field of data whose JSON type is not one types lists."""
    for name, kinds in types.items():
        if name in data and not any(_KINDS[k](data[name]) for k in kinds):
            raise ConfigError(
                f"{source}: field {name!r} must be {' or '.join(kinds)}, "
                f"got {json_type(data[name])}"
            )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
