"""Hostile requests and prompts: token ids that are not integers, text that is not Unicode,
argv / stdin bytes that are not UTF-8, and a model whose logits go NaN / Inf while generating.
Each is a typed error (or finish_reason "error") through the library, the CLI and the server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from safetensors.numpy import load_file, save_file

from tinyserve import LLM, SamplingParams
from tinyserve.backends import list_backends
from tinyserve.cli import main
from tinyserve.errors import RequestError
from tinyserve.tokenizer import Tokenizer

# -- token-id prompts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        [533.0, 5],
        [5, 6.0],
        [True, 5],
        [5, np.float32(7)],
        [5, "6"],
        [5, None],
        [5, [6]],
        [np.bool_(True)],
    ],
)
def test_token_ids_must_be_integers(make_llm, prompt):
    llm = make_llm()
    with pytest.raises(RequestError, match="token ids must be integers|prompt"):
        llm.generate([prompt], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError):
        llm.engine.add_request(prompt, SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()


def test_one_prompt_of_floats_and_numpy_ints(make_llm):
    llm = make_llm()
    with pytest.raises(RequestError, match="533.0"):
        llm.generate([533.0, 6.0], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="integers"):
        llm.logits([5, 6.5])
    out = llm.generate([np.int64(5), np.int32(6)], SamplingParams(max_tokens=2, temperature=0))
    assert out[0].prompt_token_ids == [5, 6]


def test_token_ids_outside_the_vocab_name_the_range(make_llm):
    with pytest.raises(RequestError, match=r"\[0, 384\)"):
        make_llm().generate([[5, -1]])


# -- text that is not valid Unicode, on every tokenizer engine ---------------------------------

LONE = ["a\ud800b", "\udcff", "tail \udfff"]


SPM_DIR = Path(__file__).parent / "fixtures" / "tokenizer" / "spm_llama"  # a Llama-2-style model


def _gguf_spm_meta(d: Path) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    n = sp.get_piece_size()

    def kind(i):
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
    }


GPT2_META = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "gpt-2",
    "tokenizer.ggml.tokens": ["a", "b", "ab", "Ġ", "Ċ"],
    "tokenizer.ggml.token_type": [1, 1, 1, 1, 1],
    "tokenizer.ggml.merges": ["a b"],
}


@pytest.fixture(
    scope="module", params=["tokenizer.json", "tokenizer.model", "gguf-gpt2", "gguf-spm"]
)
def any_tokenizer(request) -> Tokenizer:
    if request.param == "tokenizer.json":
        return Tokenizer.from_dir(TINY)
    if request.param == "tokenizer.model":
        return Tokenizer.from_dir(SPM_DIR)
    if request.param == "gguf-gpt2":
        return Tokenizer.from_gguf_metadata(GPT2_META)
    return Tokenizer.from_gguf_metadata(_gguf_spm_meta(SPM_DIR))


@pytest.mark.parametrize("text", LONE)
def test_lone_surrogates_are_request_errors_on_every_engine(any_tokenizer, text):
    with pytest.raises(RequestError, match="not valid Unicode: lone surrogate"):
        any_tokenizer.encode(text)
    assert any_tokenizer.encode("ab ab")  # the tokenizer still works


def test_lone_surrogates_through_the_library(make_llm):
    llm = make_llm()
    with pytest.raises(RequestError, match="lone surrogate"):
        llm.generate(["hi \ud800"], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="lone surrogate"):
        llm.chat([{"role": "user", "content": "\udcff"}], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()


# -- the CLI: a prompt that is not UTF-8 -------------------------------------------------------


def _cli(args: list, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyserve.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "args, stdin",
    [
        ([b"caf\xe9 au lait"], None),  # Latin-1 in argv: Python hands it over surrogate-escaped
        ([b"\xff\xfe"], None),
        ([], b"hello \xc3("),  # a broken UTF-8 sequence on stdin
        (["--chat", "--system", b"\x80x", "hi"], None),
    ],
)
def test_cli_prompt_not_utf8(args, stdin):
    r = _cli(["generate", *args, "--model", str(TINY), "-b", "numpy", "--max-tokens", "2"], stdin)
    err = r.stderr.decode("utf-8", "replace").strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(err) == 1 and err[0].startswith("tinyserve: error:") and "UTF-8" in err[0], err
    assert r.stdout == b""


def test_cli_utf8_stdin_still_works():
    r = _cli(
        ["generate", "--model", str(TINY), "-b", "numpy", "--max-tokens", "2"], "héllo".encode()
    )
    assert r.returncode == 0, r.stderr


# -- logits that go NaN / Inf while generating -------------------------------------------------


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory) -> Path:
    """The tiny checkpoint with a final norm of 1e38: every weight is finite (the load check
    passes), but the hidden state times the head overflows to +-Inf and sums to NaN."""
    d = tmp_path_factory.mktemp("overflow") / "model"
    shutil.copytree(TINY, d)
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], 1e38)
    save_file(tensors, d / "model.safetensors")
    return d


@pytest.fixture(scope="module")
def overflowing_gguf(overflowing, tmp_path_factory) -> Path:
    """The same as a GGUF with a Q8_0 head: the cpu backend's native argmax path."""
    from gguf import GGMLQuantizationType
    from gguf_util import write_gguf_from_hf_dir

    out = tmp_path_factory.mktemp("overflow_gguf") / "tiny.gguf"
    return write_gguf_from_hf_dir(overflowing, out, lambda name, arr: GGMLQuantizationType.Q8_0)


BACKENDS = [b.name for b in list_backends() if b.available and b.name in ("numpy", "cpu", "torch")]
CASES = {
    "greedy": SamplingParams(max_tokens=4, temperature=0),
    "sampled": SamplingParams(max_tokens=4, temperature=1.0, seed=1),
    "n=2": SamplingParams(max_tokens=4, temperature=1.0, n=2, seed=1),
    "logprobs": SamplingParams(max_tokens=4, temperature=0, logprobs=2),
    "prompt_logprobs": SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["safetensors", "gguf-q8_0"])
def test_non_finite_logits_finish_with_error(overflowing, overflowing_gguf, backend, case, fmt):
    path = overflowing if fmt == "safetensors" else overflowing_gguf
    llm = LLM(str(path), backend=backend)
    (out,) = llm.generate([[5, 6, 7]], CASES[case])
    assert [o.finish_reason for o in out.outputs] == ["error"] * CASES[case].n
    assert all(o.token_ids == [] for o in out.outputs)
    assert llm.engine.kv_manager.n_used_blocks == 0 and not llm.engine.has_unfinished()


def test_finite_model_is_not_flagged(make_llm):
    (out,) = make_llm().generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0))
    assert out.outputs[0].finish_reason == "length"


def test_cli_non_finite_logits(overflowing, capsys):
    rc = main(["generate", "hi", "--model", str(overflowing), "-b", "numpy", "--max-tokens", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and "NaN or infinite" in err[0] and "error" in err[0], err


def test_server_non_finite_logits_and_lone_surrogates(overflowing):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from tinyserve.serving import ServerConfig, create_app

    app = create_app(LLM(str(overflowing), backend="numpy"), ServerConfig(model_name="m"))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "error"
        body = '{"model": "m", "prompt": "hi \\ud800", "max_tokens": 3}'
        r = client.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"]
        chunks = client.post(
            "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True}
        ).text.split("\n\n")
        reasons = [
            json.loads(c[6:])["choices"][0]["finish_reason"]
            for c in chunks
            if c.startswith("data: {")
        ]
        assert reasons[-1] == "error"
        r = client.post("/v1/responses", json={"model": "m", "input": "hi", "max_output_tokens": 3})
        assert r.status_code == 200 and r.json()["status"] == "failed", r.json()
