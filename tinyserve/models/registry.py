"""The model families: name -> the module whose `FAMILY` declares it, imported on first use.

Adding a family: write tinyserve/models/<name>.py (its math, ending with `FAMILY = Family(...)`)
and add one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .family import Family

FAMILIES = {
    "llama": "tinyserve.models.llama",
    "gemma3": "tinyserve.models.gemma3",
    "mixtral": "tinyserve.models.mixtral",
    "phi3": "tinyserve.models.phi3",
    "deepseek_v3": "tinyserve.models.deepseek_v3",
}


def get_family(name: str) -> Family:
    """The family called name (ModelConfig.family); KeyError lists the known ones."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name]).FAMILY


def families() -> list[Family]:
    return [get_family(name) for name in FAMILIES]


def hf_family(model_type: str) -> Family | None:
    """The family serving a config.json model_type, None if none does."""
    return next((f for f in families() if model_type in f.model_types), None)


def gguf_family(meta: Mapping[str, Any]) -> tuple[Family, str] | None:
    """The family serving a GGUF file's metadata and the model_type it stands for, None if none."""
    arch = meta.get("general.architecture", "")
    claims = [f for f in families() if arch in f.gguf_archs]
    # a family marked by a metadata key (Mixtral, filed under llama) before the plain claimant
    for f in sorted(claims, key=lambda f: f.gguf_marker is None):
        if f.gguf_marker is None or meta.get(f"{arch}.{f.gguf_marker}"):
            return f, f.gguf_archs[arch]
    return None


def supported_model_types() -> list[str]:
    return sorted({t for f in families() for t in f.model_types})


def supported_gguf_archs() -> list[str]:
    return sorted({a for f in families() for a in f.gguf_archs})
