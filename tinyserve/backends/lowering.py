"""Lowerings: a backend's fast forms of the specs model families declare (tinyserve/models/spec.py).

A backend class lists its lowerings by spec type (`Backend.lowerings`); at a model's first forward
the backend asks the model for its spec, looks the spec's type up, and builds the lowering once,
holding it itself (keyed weakly by the model, never stored on it). A lowering that cannot run this
particular spec (a dense matrix where it needs quantized blocks, an activation it lacks) raises
NotLowerable and the model runs op by op, through its own forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any


class NotLowerable(Exception):
    """The spec has something this lowering does not run; the message says what."""


class LoweringCache:
    """model -> its lowering on one backend (or None: op by op), built at first use."""

    def __init__(self, table: dict[type, Callable[[Any, Any], Any]]):
        self.table = table
        self._built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.reasons: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # why op by op

    def get(self, model, backend):
        try:
            return self._built[model]
        except KeyError:
            pass
        except TypeError:  # not weakly referenceable: lower it every time rather than pin it
            return self._lower(model, backend)
        lowered = self._built[model] = self._lower(model, backend)
        return lowered

    def _lower(self, model, backend):
        declare = getattr(model, "lowering_spec", None)
        spec = declare() if declare is not None else None
        factory = None if spec is None else self.table.get(type(spec))
        if factory is None:
            self._note(
                model, "no spec" if spec is None else f"no lowering of {type(spec).__name__}"
            )
            return None
        try:
            return factory(spec, backend)
        except NotLowerable as e:
            self._note(model, str(e))
            return None

    def _note(self, model, reason: str) -> None:
        try:
            self.reasons[model] = reason
        except TypeError:
            pass
