"""The `tinyserve` command on the tiny fixture model."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import TINY

from tinyserve import LLM, SamplingParams
from tinyserve.cli import main


def test_generate_streams_the_same_text_as_the_api(capsys):
    assert (
        main(
            [
                "generate",
                "hello there",
                "--model",
                str(TINY),
                "-b",
                "numpy",
                "--max-tokens",
                "12",
                "--stats",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    expected = LLM(str(TINY), backend="numpy").generate(
        "hello there", SamplingParams(max_tokens=12, temperature=0)
    )
    assert out == expected[0].outputs[0].text + "\n"
    assert "TTFT=" in err and "TPOT=" in err and "tok/s" in err


def test_generate_chat_uses_the_template(capsys):
    llm = LLM(str(TINY), backend="numpy")
    ids = llm.chat_prompt([{"role": "user", "content": "hi"}])
    assert llm.tokenizer.decode(ids, skip_special_tokens=False).startswith(
        "<|im_start|>user\nhi<|im_end|>"
    )
    want = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
    assert (
        main(["generate", "hi", "--chat", "--model", str(TINY), "-b", "numpy", "--max-tokens", "8"])
        == 0
    )
    assert capsys.readouterr().out == want + "\n"


def test_chat_is_interactive():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinyserve.cli",
            "chat",
            "--model",
            str(TINY),
            "-b",
            "numpy",
            "--max-tokens",
            "5",
        ],
        input="hello\nagain\n\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 3  # two turns, then the empty line ends it


def test_info_and_backends(capsys):
    assert main(["info", str(TINY)]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "vocab" in out and "384" in out and "tied embeddings" in out
    assert main(["backends"]) == 0
    assert "numpy" in capsys.readouterr().out


def test_help_imports_nothing_heavy():
    code = "import sys, tinyserve.cli as c; c.build_parser(); print(sorted(m for m in ('torch', 'tokenizers', 'gguf', 'jinja2') if m in sys.modules))"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_generate_takes_a_structured_output_constraint(capsys, tmp_path):
    pytest.importorskip("llguidance")
    base = ["generate", "hello", "--model", str(TINY), "-b", "numpy", "--max-tokens", "24"]
    assert main([*base, "--choice", "yes", "--choice", "no", "--temperature", "1"]) == 0
    assert capsys.readouterr().out in ("yes\n", "no\n")
    assert main([*base, "--regex", "[0-9]{4}"]) == 0
    assert re.fullmatch(r"[0-9]{4}\n", capsys.readouterr().out)
    schema = tmp_path / "schema.json"
    schema.write_text('{"enum": ["red", "blue"]}')
    assert main([*base, "--json-schema", str(schema)]) == 0
    assert capsys.readouterr().out in ('"red"\n', '"blue"\n')
    assert main([*base, "--json-schema", '{"type": "nonsense"}']) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("tinyserve: error: invalid or unsupported JSON schema") and "\n" == err[-1]
    )
    assert main([*base, "--regex", "a", "--choice", "a"]) == 1
    assert "exactly one" in capsys.readouterr().err


@pytest.mark.real_model
def test_generate_chat_choice_on_the_default_model(capsys):
    """Issue 14's command, byte for byte on stdout: greedy, then sampled with a few seeds."""
    pytest.importorskip("llguidance")
    from conftest import default_model_gguf

    base = ["generate", "--chat", "Is Mars red?", "--choice", "yes", "--choice", "no"]
    base += ["--model", str(default_model_gguf())]
    got = []
    for extra in ([], *(["--temperature", "1", "--seed", str(s)] for s in range(4))):
        assert main([*base, *extra]) == 0
        got.append(capsys.readouterr().out)
    assert set(got) <= {"yes\n", "no\n"}, got
