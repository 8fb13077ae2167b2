"""The family registry: one table of family modules, each declaring what it serves (issue 12)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tinyserve.errors import UnsupportedArchitecture
from tinyserve.loading import config_from_gguf, config_from_hf
from tinyserve.loading.gguf_file import gguf_to_hf_name
from tinyserve.models.registry import (
    FAMILIES,
    families,
    get_family,
    gguf_family,
    hf_family,
    supported_gguf_archs,
    supported_model_types,
)

PACKAGE = Path(__file__).resolve().parent.parent / "tinyserve"


@pytest.mark.parametrize("name", FAMILIES)
def test_each_module_declares_the_family_it_is_listed_as(name):
    family = get_family(name)
    assert family.name == name
    assert family.model.__module__ == FAMILIES[name]
    assert set(family.gguf_archs.values()) <= set(family.model_types)


def test_no_model_type_is_served_twice():
    seen: dict[str, str] = {}
    for family in families():
        for model_type in family.model_types:
            assert model_type not in seen, (
                f"{model_type} in {seen.get(model_type)} and {family.name}"
            )
            seen[model_type] = family.name
    assert hf_family("qwen3").name == "llama" and hf_family("kimi_k2").name == "deepseek_v3"
    assert hf_family("gpt_neox") is None


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(KeyError, match="llama, gemma3"):
        get_family("gpt2")


@pytest.mark.parametrize(
    "meta, want",
    [
        ({"general.architecture": "llama"}, ("llama", "llama")),
        ({"general.architecture": "llama", "llama.expert_count": 4}, ("mixtral", "mixtral")),
        ({"general.architecture": "qwen3"}, ("llama", "qwen3")),
        ({"general.architecture": "deepseek2"}, ("deepseek_v3", "deepseek_v3")),
        ({"general.architecture": "gemma3"}, ("gemma3", "gemma3")),
    ],
)
def test_gguf_arch_resolves_to_family_and_model_type(meta, want):
    family, model_type = gguf_family(meta)
    assert (family.name, model_type) == want


def test_gguf_names_come_from_the_family():
    # Mixtral's experts are named only when the file is Mixtral (llama + expert_count)
    name = "blk.3.ffn_gate_exps.weight"
    assert gguf_to_hf_name(name, "llama") == name
    moe = gguf_to_hf_name(name, "llama", {"llama.expert_count": 4})
    assert moe == "model.layers.3.block_sparse_moe.experts.w1.weight"
    assert (
        gguf_to_hf_name("blk.0.attn_qkv.weight", "phi3")
        == "model.layers.0.self_attn.qkv_proj.weight"
    )
    assert gguf_to_hf_name("blk.0.attn_qkv.weight", "gpt2") == "blk.0.attn_qkv.weight"


def test_unsupported_architectures_list_the_supported_ones():
    with pytest.raises(UnsupportedArchitecture) as e:
        config_from_hf({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})
    assert all(t in str(e.value) for t in supported_model_types())
    with pytest.raises(UnsupportedArchitecture) as e:
        config_from_gguf({"general.architecture": "gpt2"}, set())
    assert all(a in str(e.value) for a in supported_gguf_archs())
    assert "deepseek2" in supported_gguf_archs() and "kimi_k2" in supported_model_types()


def test_model_config_imports_no_family():
    """config.py is plain data: the families import it, never the other way round."""
    tree = ast.parse((PACKAGE / "config.py").read_text(encoding="utf-8"))
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any("models" in m or "loading" in m for m in imported), imported


def test_import_tinyserve_imports_no_family_module():
    code = "import sys, tinyserve; print(' '.join(m for m in sys.modules if m.startswith('tinyserve')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert not loaded & set(FAMILIES.values()), loaded & set(FAMILIES.values())
