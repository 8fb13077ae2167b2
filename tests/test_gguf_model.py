"""A GGUF written from a tiny checkpoint (q/k permuted as llama.cpp does) gives its twin's logits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HF_DIR
from gguf import GGMLQuantizationType as Q
from gguf_util import write_gguf_from_hf_dir

from tinyserve import LLM

IDS = [5, 17, 200, 33, 91, 7, 150, 150, 64, 12, 300, 8]


@pytest.mark.parametrize("name", ["llama", "llama_mqa", "smollm2", "qwen2", "qwen3"])
def test_f32_gguf_equals_safetensors(tmp_path, name):
    path = write_gguf_from_hf_dir(HF_DIR / name, tmp_path / f"{name}.gguf")
    st = LLM(str(HF_DIR / name), backend="numpy")
    gg = LLM(str(path), backend="numpy")
    assert (
        gg.config.n_kv_heads == st.config.n_kv_heads
        and gg.config.tie_word_embeddings == st.config.tie_word_embeddings
    )
    np.testing.assert_allclose(gg.logits(IDS), st.logits(IDS), rtol=1e-5, atol=1e-5)
    assert gg.tokenizer.encode("hello world 123") == st.tokenizer.encode("hello world 123")


def test_quantized_gguf_tracks_safetensors(tmp_path):
    """Q8_0 weights: logits close to float32 (quantization error only), the same top token."""
    name = "smollm2"
    path = write_gguf_from_hf_dir(
        HF_DIR / name, tmp_path / "q8.gguf", qtype_for=lambda n, a: Q.Q8_0
    )
    st, gg = LLM(str(HF_DIR / name), backend="numpy"), LLM(str(path), backend="numpy")
    a, b = st.logits(IDS), gg.logits(IDS)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


# Packages a load-and-generate never needs: the gguf package (we parse GGUF ourselves; gguf
# imports yaml, tqdm and sentencepiece), sentencepiece (only for a bare tokenizer.model), jinja2
# (only to render a chat template), importlib.metadata (only to find plugin backends),
# subprocess (only for `pull`) and numpy.random with the OpenSSL it imports (only to sample at
# random; this test decodes greedily). Each costs resident memory for the life of the process.
NOT_IMPORTED = (
    "gguf", "sentencepiece", "yaml", "tqdm", "jinja2", "importlib.metadata", "subprocess",
    "numpy.random", "_hashlib",
)  # fmt: skip


@pytest.mark.parametrize("source", ["gguf", "tokenizer.json"])
def test_load_and_generate_imports_no_optional_package(tmp_path, source):
    import subprocess
    import sys

    if source == "gguf":
        model = write_gguf_from_hf_dir(
            HF_DIR / "smollm2", tmp_path / "q8.gguf", qtype_for=lambda n, a: Q.Q8_0
        )
    else:
        model = HF_DIR / "smollm2"
    code = (
        "import sys\n"
        "from tinyserve import LLM, SamplingParams\n"
        f"llm = LLM({str(model)!r}, backend='cpu')\n"
        "out = llm.generate(['hello world'], SamplingParams(max_tokens=3, temperature=0))\n"
        "assert len(out[0].outputs[0].token_ids) == 3\n"
        f"print([m for m in {NOT_IMPORTED!r} if m in sys.modules])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
