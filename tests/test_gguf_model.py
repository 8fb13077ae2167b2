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
