"""Bad input gets a clear, specific error and loses nothing; pickles are never unpickled."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from tinyserve import LLM, SamplingParams
from tinyserve.cli import main
from tinyserve.errors import (
    ModelNotFound,
    RequestError,
    TinyServeError,
    UnsafeCheckpoint,
    UnsupportedArchitecture,
    WeightsError,
)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A writable copy of the tiny checkpoint."""
    d = tmp_path / "model"
    shutil.copytree(TINY, d)
    return d


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_model():
    with pytest.raises(ModelNotFound, match="no such"):
        LLM("/nonexistent/model", backend="numpy")


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        LLM(str(ckpt), backend="numpy")


def test_corrupt_safetensors_header(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt"):
        LLM(str(ckpt), backend="numpy")


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no .safetensors"):
        LLM(str(ckpt), backend="numpy")


def test_unknown_architecture_is_refused_by_name(ckpt):
    _edit_config(ckpt, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(UnsupportedArchitecture, match="GPTNeoXForCausalLM"):
        LLM(str(ckpt), backend="numpy")


def test_config_disagreeing_with_weights(ckpt):
    _edit_config(ckpt, intermediate_size=100)
    with pytest.raises(WeightsError, match="shape"):
        LLM(str(ckpt), backend="numpy")


def test_malformed_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(TinyServeError, match="not valid JSON"):
        LLM(str(ckpt), backend="numpy")
    _edit_config_text = json.dumps({"model_type": "llama"})
    (ckpt / "config.json").write_text(_edit_config_text)
    with pytest.raises(TinyServeError, match="lacks required field"):
        LLM(str(ckpt), backend="numpy")


class _Boom:
    """Unpickling this would create a marker file: the proof that nobody unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth"])
def test_pickle_checkpoints_are_refused_not_unpickled(tmp_path, name):
    marker = tmp_path / "unpickled"
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(TINY / "config.json", d)
    (d / name).write_bytes(pickle.dumps(_Boom(marker)))
    for target in (d, d / name):
        with pytest.raises(UnsafeCheckpoint, match="refusing to unpickle"):
            LLM(str(target), backend="numpy")
    assert not marker.exists()


def test_truncated_gguf(tmp_path):
    from gguf_util import write_gguf_from_hf_dir

    path = write_gguf_from_hf_dir(TINY, tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError):
        LLM(str(path), backend="numpy")
    path.write_bytes(b"NOPE" + data[4:])
    with pytest.raises(WeightsError):
        LLM(str(path), backend="numpy")


def test_prompt_longer_than_context_loses_nothing(make_llm):
    llm = make_llm()
    ok = [5, 6, 7]
    with pytest.raises(RequestError, match="context"):
        llm.generate([ok, list(range(4, 300))], SamplingParams(max_tokens=4, temperature=0))
    assert not llm.engine.has_unfinished() and llm.engine.kv_manager.n_used_blocks == 0
    assert (
        len(llm.generate([ok], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids)
        == 4
    )


def test_token_ids_outside_the_vocab(make_llm):
    with pytest.raises(RequestError, match="token ids"):
        make_llm().generate([[5, 10_000]])


# -- the CLI: one line on stderr, non-zero exit, never a traceback ----------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "hi", "--model", "/nonexistent"],
        ["generate", "hi", "--model", str(TINY), "-b", "numpy", "--temperature", "-1"],
        ["generate", "hi", "--model", str(TINY), "-b", "numpy", "--top-p", "2"],
        ["generate", "hi", "--model", str(TINY), "-b", "numpy", "--max-tokens", "0"],
        ["generate", "hi", "--model", str(TINY), "-b", "no-such-backend"],
        ["info", "/nonexistent"],
        ["pull", "no-such-model"],
    ],
)
def test_cli_errors_are_one_line(argv, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinyserve: error:"), err


def test_cli_corrupt_weights_in_a_subprocess(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinyserve.cli",
            "generate",
            "hi",
            "--model",
            str(ckpt),
            "-b",
            "numpy",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "truncated or corrupt" in r.stderr
