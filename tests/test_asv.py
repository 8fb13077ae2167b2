"""The asv suite stays runnable: `asv check` passes, a quick run of one benchmark succeeds, and a
broken benchmark makes both fail (so CI catches it), all in the current environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("asv")

ASV_DIR = Path(__file__).resolve().parents[1] / "asv_bench"


def _asv(args: list[str], cwd: Path, home: Path, timeout: float = 120):
    """Run asv with a private HOME (its machine file lives there); returns the CompletedProcess."""
    env = {**os.environ, "HOME": str(home), "TINYSERVE_BENCH_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "asv", *args],
        cwd=cwd,
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("asv-home")
    done = _asv(["machine", "--yes", "--machine", "test"], ASV_DIR, home)
    assert done.returncode == 0, done.stdout + done.stderr
    return home


def test_config_points_at_the_project():
    from asv.util import load_json

    conf = load_json(str(ASV_DIR / "asv.conf.json"), js_comments=True)
    assert (ASV_DIR / conf["repo"] / "pyproject.toml").is_file()
    assert conf["environment_type"] == "virtualenv"
    assert (ASV_DIR / conf["benchmark_dir"]).is_dir()


def test_asv_check_passes(home):
    done = _asv(["check", "--python=same"], ASV_DIR, home)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No problems found" in done.stdout


def _quick_run(bench: str, suite: Path, home: Path):
    """One quick `asv run` of the benchmarks matching `bench`, on this Python, nothing saved."""
    args = ["run", "--python=same", "--quick", "--dry-run", "--show-stderr", "--machine", "test"]
    return _asv([*args, "--bench", bench], suite, home)


@pytest.mark.slow
def test_quick_run_of_one_benchmark(home):
    done = _quick_run(r"Kernels.time_rms_norm", ASV_DIR, home)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "bench_kernels.Kernels.time_rms_norm" in out and "failed" not in out


@pytest.fixture()
def broken_suite(tmp_path) -> Path:
    """A copy of the suite plus one benchmark that raises and one with a bad signature."""
    copy = tmp_path / "asv_bench"
    shutil.copytree(ASV_DIR, copy, ignore=shutil.ignore_patterns(".asv", "__pycache__"))
    conf = (copy / "asv.conf.json").read_text()
    conf = conf.replace('"repo": ".."', f'"repo": {json.dumps(str(ASV_DIR.parent))}')
    (copy / "asv.conf.json").write_text(conf)
    (copy / "benchmarks" / "bench_broken.py").write_text(
        "def time_raises():\n    raise RuntimeError('broken on purpose')\n\n\n"
        "class Params:\n    params = [1, 2]\n\n    def time_missing_param(self):\n        pass\n"
    )
    return copy


def test_broken_benchmark_fails_check_and_run(broken_suite, home):
    done = _asv(["check", "--python=same"], broken_suite, home)
    assert done.returncode != 0, done.stdout
    done = _quick_run("time_raises", broken_suite, home)
    assert done.returncode != 0, done.stdout
    assert "broken on purpose" in done.stdout + done.stderr
