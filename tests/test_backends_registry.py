"""The backend registry: lazy built-ins, entry-point plugins, name clashes, unknown names, and
`tinyserve backends` reporting availability with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import tinyserve.backends as registry
from tinyserve.backends import (
    backend_names,
    create_backend,
    get_backend_class,
    list_backends,
    register_backend,
)
from tinyserve.backends.base import Backend
from tinyserve.backends.numpy_backend import NumpyBackend
from tinyserve.cli import main as cli_main
from tinyserve.errors import BackendError


@pytest.fixture(autouse=True)
def private_registry(monkeypatch):
    """Each test registers into a copy: the module-level registry is left as it was."""
    registry._load_entry_points()
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))


class _NeedsFrobnicator(Backend):
    name = "frob"

    @classmethod
    def availability(cls):
        return False, "needs a frobnicator (none found)"


def test_builtins_are_listed_by_import_path():
    assert {"numpy", "torch"} <= set(backend_names())
    assert registry._BUILTIN["torch"] == "tinyserve.backends.torch_backend:TorchBackend"
    assert get_backend_class("numpy") is NumpyBackend


def test_registering_a_taken_name_raises():
    for name in ("numpy", "torch"):
        with pytest.raises(BackendError, match=f"backend '{name}' is already registered"):
            register_backend(name, NumpyBackend)
    register_backend("mine", NumpyBackend)
    with pytest.raises(BackendError, match="already registered"):
        register_backend("mine", "somewhere:Else")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(BackendError) as err:
        create_backend("cuda-magic")
    message = str(err.value)
    assert "unknown backend 'cuda-magic'" in message and "\n" not in message
    assert all(name in message for name in ("numpy", "torch"))


def test_in_process_registration_creates_instances():
    register_backend("mine", NumpyBackend)
    backend = create_backend("mine")
    assert isinstance(backend, NumpyBackend)
    register_backend("by-path", "tinyserve.backends.numpy_backend:NumpyBackend")
    assert get_backend_class("by-path") is NumpyBackend  # resolved on first use


def test_unavailable_backend_says_why():
    register_backend("frob", _NeedsFrobnicator)
    with pytest.raises(BackendError, match="'frob' is not available: needs a frobnicator"):
        create_backend("frob")
    info = {i.name: i for i in list_backends()}["frob"]
    assert not info.available and info.reason == "needs a frobnicator (none found)"


def test_bad_options_are_one_line_errors():
    with pytest.raises(BackendError, match="numpy backend runs on the cpu only"):
        create_backend("numpy", device="cuda")


def test_broken_import_path_is_reported_not_raised():
    register_backend("ghost", "no_such_module_xyz:Backend")
    info = {i.name: i for i in list_backends()}["ghost"]
    assert not info.available and "failed to import" in info.reason
    with pytest.raises(BackendError, match="'ghost' failed to import"):
        create_backend("ghost")


def test_backends_command_shows_availability_and_reason(capsys):
    register_backend("frob", _NeedsFrobnicator)
    assert cli_main(["backends"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["numpy"].split()[1] == "available"
    assert lines["frob"].split()[1] == "unavailable" and "needs a frobnicator" in lines["frob"]
    assert "torch" in lines


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_entry_point_plugins_are_discovered(tmp_path):
    """A distribution on sys.path that declares the entry point: found without any import of it."""
    (tmp_path / "fake_plugin.py").write_text(
        "from tinyserve.backends.numpy_backend import NumpyBackend\n"
        "class FakeBackend(NumpyBackend):\n    name = 'fake'\n"
    )
    dist = tmp_path / "fake_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[tinyserve.backends]\nfake = fake_plugin:FakeBackend\nnumpy = fake_plugin:FakeBackend\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PYTHONDONTWRITEBYTECODE="1")
    out = _run(
        """
        import sys
        from tinyserve.backends import backend_names, create_backend
        names = backend_names()
        assert "fake_plugin" not in sys.modules, "listing must not import plugins"
        print(names, type(create_backend("fake")).__name__, type(create_backend("numpy")).__name__)
        """,
        env,
    )
    assert out.returncode == 0, out.stderr
    # a plugin cannot take over a built-in's name
    assert out.stdout.split("] ")[1].split() == ["FakeBackend", "NumpyBackend"]
    assert "'fake'" in out.stdout


def test_import_tinyserve_never_imports_torch():
    out = _run(
        """
        import sys
        import tinyserve
        from tinyserve.backends import backend_names, create_backend
        backend_names(); create_backend("numpy")
        heavy = [m for m in ("torch", "torch_npu", "cupy", "jax") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
        """
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
