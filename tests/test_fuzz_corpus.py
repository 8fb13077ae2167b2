"""Every fuzz target's committed seed corpus, run once through the target (no atheris needed):
the parsers' contract — a typed error or success, never another exception — is checked by the
normal suite. tests/fuzz/run.py fuzzes from these same files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))

from targets import CORPUS, TARGETS, run_one

CASES = [(name, f) for name in TARGETS for f in sorted((CORPUS / name).iterdir())]


def test_every_target_has_seeds():
    assert {name for name, _ in CASES} == set(TARGETS)


@pytest.mark.parametrize("name, path", CASES, ids=[f"{n}/{p.name}" for n, p in CASES])
def test_seed_corpus_gives_only_typed_errors(name: str, path: Path):
    run_one(name, path.read_bytes())


def test_a_target_fails_on_an_untyped_error(monkeypatch):
    """The harness itself can fail: an exception that is not the project's error escapes."""

    def boom(data: bytes) -> None:
        raise KeyError("not a TinyServeError")

    monkeypatch.setitem(TARGETS, "model_config", boom)
    with pytest.raises(KeyError):
        run_one("model_config", b"{}")
