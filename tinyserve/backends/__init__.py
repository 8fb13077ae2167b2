"""Backend registry: name -> backend class, resolved lazily so `import tinyserve` imports no torch.

Built-ins are an import-path table; third-party packages register through the entry-point group
`tinyserve.backends` (value "module:Class") or in-process with register_backend(name, factory).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import BackendError

_BUILTIN: dict[str, str] = {
    "numpy": "tinyserve.backends.numpy_backend:NumpyBackend",
    "torch": "tinyserve.backends.torch_backend:TorchBackend",
    "cpu": "tinyserve.backends.cpu:CpuBackend",
}

_registry: dict[str, str | Callable[..., Any]] = dict(_BUILTIN)
_entry_points_loaded = False


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why not available, or what it runs on


def _load_entry_points() -> None:
    """Add the installed plugins' names (once; importlib.metadata and what it imports cost ~2 MiB
    resident, so only code that needs a name outside the registry gets here)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="tinyserve.backends"):
        if ep.name not in _registry:
            _registry[ep.name] = ep.value


def register_backend(name: str, factory: str | Callable[..., Any]) -> None:
    """Register a backend class (or "module:Class" path) under a new name."""
    _load_entry_points()
    if name in _registry:
        raise BackendError(f"backend {name!r} is already registered")
    _registry[name] = factory


def backend_names() -> list[str]:
    _load_entry_points()
    return sorted(_registry)


def is_registered(name: str) -> bool:
    """Whether a backend goes by name (a built-in's name is known without reading entry points)."""
    if name not in _registry:
        _load_entry_points()
    return name in _registry


def get_backend_class(name: str):
    """The backend class registered under name (imports its module on first use)."""
    if not is_registered(name):
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(backend_names())}")
    target = _registry[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        try:
            target = getattr(importlib.import_module(module), attr)
        except Exception as e:  # a broken plugin must not take the registry down
            raise BackendError(f"backend {name!r} failed to import from {module}: {e}") from e
        _registry[name] = target
    return target


def create_backend(name: str, device: str | None = None, dtype: str | None = None, **options):
    """An instance of the named backend, or BackendError saying why it cannot run here.

    `options` are the backend's own constructor arguments (e.g. the cpu backend's num_threads)."""
    cls = get_backend_class(name)
    ok, reason = cls.availability()
    if not ok:
        raise BackendError(f"backend {name!r} is not available: {reason}")
    try:
        return cls(device=device, dtype=dtype, **options)
    except TypeError as e:  # an option this backend does not take
        raise BackendError(f"backend {name!r}: {e}") from None
    except ValueError as e:
        raise BackendError(f"backend {name!r}: {e}") from None


def list_backends() -> list[BackendInfo]:
    """Every registered backend with whether it can run here and why not."""
    infos = []
    for name in backend_names():
        try:
            cls = get_backend_class(name)
            ok, reason = cls.availability()
            if ok and hasattr(cls, "summary"):
                reason = cls.summary()
        except BackendError as e:
            ok, reason = False, str(e)
        infos.append(BackendInfo(name, ok, reason))
    return infos
