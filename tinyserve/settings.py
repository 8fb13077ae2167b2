"""Every TINYSERVE_* environment variable, read once, in one place (vLLM's envs.py).

The library reads the environment only here. `settings()` parses it on first use and keeps the
result; the edges (the LLM facade, the CLI, the kernel modules at import) turn it into arguments:
`settings().backend_options("cpu")` is what LLM merges under its `backend_options`. A bad value
is a ConfigError naming the variable and the value, raised when the settings are first read.

Build-time variables (TINYSERVE_NATIVE, TINYSERVE_PURE_PYTHON for setup.py) are setup.py's own.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

KV_DTYPES = ("float32", "float16")
QUANT_ISAS = ("scalar", "avx2", "vnni", "bf16")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the environment asks for; None where a variable is unset and the default applies."""

    pure_python: bool = False  # TINYSERVE_PURE_PYTHON=1: NumPy reference only, kernels unused
    num_threads: int | None = None  # TINYSERVE_NUM_THREADS: kernel threads (None: all cores)
    kv_dtype: str | None = None  # TINYSERVE_KV_DTYPE: the cpu backend's KV cache dtype
    adapt_threads: bool | None = None  # TINYSERVE_ADAPT_THREADS=0: decode always on all threads
    exact_prefill: bool | None = None  # TINYSERVE_EXACT_PREFILL=1: cpu prefill in float sgemm
    blas_min_n: int = 64  # TINYSERVE_BLAS_MIN_N: exact prefill's rows from which sgemm is used
    quant_isa: str | None = None  # TINYSERVE_QUANT_ISA: force scalar / avx2 / vnni / bf16 kernels
    cpu_fused: bool | None = None  # TINYSERVE_CPU_FUSED=0: cpu runs the model file op by op
    torch_fused: bool | None = None  # TINYSERVE_TORCH_FUSED=0: torch runs it op by op
    torch_graphs: bool | None = None  # TINYSERVE_TORCH_GRAPHS=1 / 0: CUDA graphs for decode
    models_dir: Path | None = None  # TINYSERVE_MODELS_DIR: where `pull` puts catalog weights
    api_key: str | None = None  # TINYSERVE_API_KEY: the server's default --api-key
    require_native: bool = False  # TINYSERVE_REQUIRE_NATIVE=1 (tests): the kernels must load
    offline: bool = False  # TINYSERVE_OFFLINE=1 (tests): skip what needs an unpulled model
    bench_threads: int = 4  # TINYSERVE_BENCH_THREADS (asv): the parallel thread count

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Parse every variable in `environ`; an empty value counts as unset."""
        values = {}
        for f in dataclasses.fields(cls):
            name = f"TINYSERVE_{f.name.upper()}"
            raw = environ.get(name, "")
            if raw != "":
                values[f.name] = _PARSERS[f.name](name, raw)
        return cls(**values)

    def backend_options(self, name: str) -> dict[str, Any]:
        """Constructor arguments the environment sets for backend `name` (only those set)."""
        if name == "cpu":
            options = {
                "num_threads": self.num_threads,
                "kv_dtype": self.kv_dtype,
                "adapt_threads": self.adapt_threads,
                "lower": self.cpu_fused,
                "exact_prefill": self.exact_prefill,
            }
        elif name == "torch":
            options = {"lower": self.torch_fused, "graphs": self.torch_graphs}
        else:
            return {}
        return {k: v for k, v in options.items() if v is not None}


@functools.cache
def settings() -> Settings:
    """The process's settings, parsed from os.environ on first use (tests: settings.cache_clear())."""
    return Settings.from_env()


# -- parsing ----------------------------------------------------------------------------------------

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


def _int_at_least(lowest: int, what: str) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            n = int(raw)
        except ValueError:
            n = lowest - 1
        if n < lowest:
            raise ConfigError(f"{name} must be a {what} integer, got {raw!r}")
        return n

    return parse


def _one_of(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw

    return parse


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "pure_python": _flag,
    "num_threads": _int_at_least(1, "positive"),
    "kv_dtype": _one_of(KV_DTYPES),
    "adapt_threads": _flag,
    "exact_prefill": _flag,
    "blas_min_n": _int_at_least(0, "non-negative"),
    "quant_isa": _one_of(QUANT_ISAS),
    "cpu_fused": _flag,
    "torch_fused": _flag,
    "torch_graphs": _flag,
    "models_dir": lambda name, raw: Path(raw).expanduser(),
    "api_key": lambda name, raw: raw,
    "require_native": _flag,
    "offline": _flag,
    "bench_threads": _int_at_least(1, "positive"),
}
assert _PARSERS.keys() == {f.name for f in dataclasses.fields(Settings)}, "a field without a parser"
