"""tinyserve.settings: every TINYSERVE_* variable parsed, checked and turned into arguments."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tinyserve import LLM
from tinyserve.errors import ConfigError
from tinyserve.settings import Settings, settings

PACKAGE = Path(__file__).resolve().parents[1] / "tinyserve"


def test_unset_and_empty_give_the_defaults():
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"TINYSERVE_NUM_THREADS": "", "TINYSERVE_KV_DTYPE": ""}) == Settings()
    assert Settings().backend_options("cpu") == {} and Settings().backend_options("torch") == {}


def test_every_variable_is_parsed():
    env = {
        "TINYSERVE_PURE_PYTHON": "1",
        "TINYSERVE_NUM_THREADS": "3",
        "TINYSERVE_KV_DTYPE": "float16",
        "TINYSERVE_ADAPT_THREADS": "0",
        "TINYSERVE_BLAS_MIN_N": "0",
        "TINYSERVE_QUANT_ISA": "avx2",
        "TINYSERVE_CPU_FUSED": "0",
        "TINYSERVE_TORCH_FUSED": "false",
        "TINYSERVE_TORCH_GRAPHS": "0",
        "TINYSERVE_MODELS_DIR": "~/weights",
        "TINYSERVE_API_KEY": "sk-1",
        "TINYSERVE_REQUIRE_NATIVE": "1",
        "TINYSERVE_OFFLINE": "yes",
        "TINYSERVE_BENCH_THREADS": "2",
    }
    s = Settings.from_env(env)
    assert s == Settings(
        pure_python=True,
        num_threads=3,
        kv_dtype="float16",
        adapt_threads=False,
        blas_min_n=0,
        quant_isa="avx2",
        cpu_fused=False,
        torch_fused=False,
        torch_graphs=False,
        models_dir=Path("~/weights").expanduser(),
        api_key="sk-1",
        require_native=True,
        offline=True,
        bench_threads=2,
    )
    assert s.backend_options("cpu") == {
        "num_threads": 3,
        "kv_dtype": "float16",
        "adapt_threads": False,
        "lower": False,
    }
    assert s.backend_options("torch") == {"lower": False, "graphs": False}
    assert s.backend_options("numpy") == {}


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("TINYSERVE_NUM_THREADS", "0", "must be a positive integer, got '0'"),
        ("TINYSERVE_NUM_THREADS", "zero", "must be a positive integer, got 'zero'"),
        ("TINYSERVE_BLAS_MIN_N", "-1", "must be a non-negative integer, got '-1'"),
        ("TINYSERVE_KV_DTYPE", "bfloat16", "must be one of float32, float16, got 'bfloat16'"),
        ("TINYSERVE_QUANT_ISA", "avx512", "must be one of scalar, avx2, vnni, bf16, got 'avx512'"),
        ("TINYSERVE_CPU_FUSED", "maybe", "must be 1 or 0, got 'maybe'"),
        ("TINYSERVE_BENCH_THREADS", "four", "must be a positive integer, got 'four'"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_value(name, value, message):
    with pytest.raises(ConfigError) as e:
        Settings.from_env({name: value})
    assert str(e.value) == f"{name} {message}"


def test_settings_are_read_once_until_cleared(monkeypatch):
    monkeypatch.setenv("TINYSERVE_NUM_THREADS", "2")
    first = settings()
    monkeypatch.setenv("TINYSERVE_NUM_THREADS", "5")
    assert settings() is first and first.num_threads == 2
    settings.cache_clear()
    assert settings().num_threads == 5


def test_llm_takes_the_environment_under_its_backend_options(tiny_dir, monkeypatch):
    """What the environment sets reaches the backend's constructor; backend_options wins."""
    from tinyserve import backends
    from tinyserve.backends.numpy_backend import NumpyBackend

    seen = []

    class Recording(NumpyBackend):
        def __init__(self, device=None, dtype=None, **options):
            seen.append(options)
            super().__init__(device, dtype)

    monkeypatch.setitem(backends._registry, "cpu", Recording)
    monkeypatch.setenv("TINYSERVE_NUM_THREADS", "3")
    monkeypatch.setenv("TINYSERVE_CPU_FUSED", "0")
    LLM(str(tiny_dir), backend="cpu", backend_options={"num_threads": 1})
    LLM(str(tiny_dir), backend="cpu")
    assert seen == [{"num_threads": 1, "lower": False}, {"num_threads": 3, "lower": False}]


def test_only_settings_reads_the_environment():
    """No module of the package but settings.py touches os.environ / os.getenv."""
    readers: dict[str, list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE.parent).as_posix()
        if name == "tinyserve/settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), name)):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv"):
                readers.setdefault(name, []).append(node.lineno)
    assert readers == {}
