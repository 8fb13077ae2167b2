"""No backend imports a model family: fast paths are lowerings of what a model declares (its spec),
never a backend's guess from the model's class (issue 12).

Every module under tinyserve/backends/ is parsed with `ast` (nothing is imported) and refused if it
imports a family module (tinyserve/models/<file> defining a *Model class: llama, mixtral, ...) or a
family class, however spelled: absolute, relative, `from ..models import llama`, or the module's
dotted name as a string (importlib.import_module). Generic modules of the models package (the
spec types, rope, moe routing, the package itself) stay allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tinyserve"
BACKENDS = PACKAGE / "backends"


def _module_name(path: Path) -> str:
    """tinyserve/backends/cpu.py -> tinyserve.backends.cpu (a package's __init__ -> the package)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def family_modules() -> dict[str, set[str]]:
    """{dotted module: its *Model class names} for each file of tinyserve/models defining one."""
    found = {}
    for path in sorted((PACKAGE / "models").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        classes = {
            n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Model")
        }
        if classes:
            found[_module_name(path)] = classes
    return found


def _resolve(module: str | None, level: int, package: str) -> str:
    """The absolute name an ImportFrom refers to, seen from `package`."""
    if level == 0:
        return module or ""
    base = package.split(".")[: len(package.split(".")) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def family_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """'line N: what' for every import of a family module or class in one module's source."""
    families = family_modules()
    classes = set().union(*families.values())
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def is_family(name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in families)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}" for a in node.names if is_family(a.name)
            ]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.module, node.level, package)
            for alias in node.names:
                if is_family(target) or is_family(f"{target}.{alias.name}"):
                    found.append(f"line {node.lineno}: from {target} import {alias.name}")
                elif alias.name in classes:
                    found.append(f"line {node.lineno}: {alias.name} from {target}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = node.value.partition(":")[0]  # "module:Class" as the registries spell it
            if is_family(name):
                found.append(f"line {node.lineno}: {node.value!r} (an import by name)")
    return found


def test_the_family_modules_are_found():
    """The oracle is not empty: every family of issue 12 is a module the check refuses."""
    families = family_modules()
    for name in ("llama", "mixtral", "gemma3", "phi3", "deepseek_v3"):
        assert f"tinyserve.models.{name}" in families, sorted(families)
    assert "LlamaModel" in families["tinyserve.models.llama"]
    assert "tinyserve.models" not in families  # the package itself (build_model, Linear) is fine


@pytest.mark.parametrize(
    "source",
    [
        "from ..models.llama import LlamaModel",
        "def f():\n    from ..models.mixtral import MixtralModel",
        "from tinyserve.models.gemma3 import LayerWeights",
        "import tinyserve.models.phi3",
        "from ..models import llama",
        "from ..models import DeepseekV3Model",
        "import importlib\nm = importlib.import_module('tinyserve.models.llama')",
    ],
)
def test_the_check_refuses_each_spelling(source):
    assert family_imports(source, "tinyserve.backends.mine"), source


@pytest.mark.parametrize(
    "source",
    [
        "from ..models import build_model, Linear",
        "from ..models.rope import rope_inv_freq",
        "from ..models.moe import route_softmax",
        "from tinyserve.models import spec",
        "from ..batch import Batch",
        "from .numpy_ops import NumpyOps",
    ],
)
def test_the_check_allows_generic_modules(source):
    assert family_imports(source, "tinyserve.backends.mine") == [], source


@pytest.mark.parametrize(
    "path", sorted(BACKENDS.rglob("*.py")), ids=lambda p: str(p.relative_to(BACKENDS))
)
def test_no_backend_imports_a_model_family(path):
    found = family_imports(
        path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py"
    )
    assert not found, f"{path.relative_to(PACKAGE.parent)} imports a model family: " + "; ".join(
        found
    )
