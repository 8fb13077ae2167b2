"""A third-party backend package, installed for real: the entry point registers it, `tinyserve
backends` lists it, and the conformance kit passes on it (examples/tinyserve-backend-example)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tinyserve-backend-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """pip-installs the example into a private --target dir; the environment to see it with.
    Removing the dir uninstalls it, and the global environment is never touched."""
    tmp = tmp_path_factory.mktemp("plugin")
    src, target = tmp / "src", tmp / "site"
    shutil.copytree(
        EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])
    )
    yield env
    shutil.rmtree(target)


def _python(env, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_backends_command_lists_the_plugin(installed):
    out = _python(
        installed, "import sys; from tinyserve.cli import main; sys.exit(main(['backends']))"
    )
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.split()[0] == "example")
    assert "available" in line.split() and "example plugin" in line


def test_not_visible_without_the_package():
    out = _python(
        dict(os.environ), "from tinyserve.backends import backend_names; print(backend_names())"
    )
    assert out.returncode == 0 and "'example'" not in out.stdout


def test_the_plugin_generates(installed):
    code = (
        "from tinyserve.testing import tiny_checkpoint; from tinyserve.backends import create_backend\n"
        "from tinyserve.engine import Engine, EngineConfig; from tinyserve import SamplingParams\n"
        "b = create_backend('example'); print(type(b).__module__)\n"
        "e = Engine(tiny_checkpoint('mistral'), None, b, EngineConfig(block_size=4, kv_cache_tokens=256))\n"
        "e.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))\n"
        "while e.has_unfinished(): e.step()\n"
    )
    out = _python(installed, code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tinyserve_backend_example"


def test_conformance_kit_passes_on_the_plugin(installed):
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        check=False,
        env=installed,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
