"""Shared tiny fixtures: seeded HF checkpoints in tests/fixtures/hf (see tests/make_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tinyserve.settings import settings

HF_DIR = Path(__file__).parent / "fixtures" / "hf"
TINY = HF_DIR / "smollm2"  # tied embeddings, 2 layers, vocab 384, context 256


def assert_chi_square_fits(counts: np.ndarray, probs: np.ndarray, min_df: int = 2) -> None:
    """Draws `counts` (per token) fit the distribution `probs` at p = 0.999: tokens expected
    fewer than 5 times pooled into one bin, the chi-square quantile by Wilson-Hilferty."""
    import math

    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    assert df >= min_df, f"{df} degrees of freedom: too few to test"
    z = 3.09  # the standard normal quantile at p = 0.999
    limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < limit, f"chi2 {chi2:.1f} over {df} dof (limit {limit:.1f})"


def mapped_bytes(arr: np.ndarray) -> int | None:
    """Bytes of the pages under arr that are mapped in this process (the present bit of
    /proc/self/pagemap), None where the kernel has no pagemap."""
    import mmap

    first = arr.ctypes.data // mmap.PAGESIZE
    last = -(-(arr.ctypes.data + arr.nbytes) // mmap.PAGESIZE)
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            pagemap.seek(first * 8)
            entries = np.frombuffer(pagemap.read((last - first) * 8), np.uint64)
    except OSError:
        return None
    return int((entries >> np.uint64(63)).sum()) * mmap.PAGESIZE


def random_prompts(
    n: int, rng: np.random.Generator, low: int = 3, high: int = 60, vocab: int = 384
):
    """n prompts of token ids with mixed lengths in [low, high)."""
    return [rng.integers(4, vocab, size=int(rng.integers(low, high))).tolist() for _ in range(n)]


@pytest.fixture(autouse=True)
def fresh_settings():
    """settings() reads the environment once per process; each test reads it afresh, so that
    monkeypatch.setenv("TINYSERVE_...") before the code under test reaches it."""
    settings.cache_clear()
    yield
    settings.cache_clear()


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return TINY


@pytest.fixture
def make_llm():
    """LLM on a fixture checkpoint with the numpy backend; keyword arguments go to LLM."""
    from tinyserve import LLM

    def make(path: Path = TINY, **kw):
        kw.setdefault("backend", "numpy")
        return LLM(str(path), **kw)

    return make


def catalog_model(name: str) -> Path:
    """A catalog model's file: pulled once into models/ (CI's test command pulls them first).

    Only TINYSERVE_OFFLINE=1 turns a missing file into a skip; otherwise it is pulled here."""
    from tinyserve import catalog

    path = catalog.model_path(name)
    if path is None:
        if settings().offline:
            pytest.skip(f"{name} not pulled and TINYSERVE_OFFLINE=1")
        path = catalog.pull(name, quiet=True)
    return Path(path)


def default_model_gguf() -> Path:
    from tinyserve import catalog

    return catalog_model(catalog.DEFAULT_MODEL)
