"""Crashers the fuzz targets (tests/fuzz/run.py) found, each generalised to its class of input
and kept in the normal suite. (The GGUF header's is in test_hostile_weights.py.)"""

from __future__ import annotations

import pytest

from tinyserve.chat_template import compile_chat_template
from tinyserve.errors import TokenizerError
from tinyserve.tokenizer import Tokenizer

VOCAB = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "gpt-2",
    "tokenizer.ggml.tokens": ["a", "b", "ab", "Ġ"],
    "tokenizer.ggml.token_type": [1, 1, 1, 1],
    "tokenizer.ggml.merges": ["a b"],
}
WRONG = [("bos_token_id", [1, 2]), ("eos_token_id", "2"), ("eot_token_id", 1.0),
         ("add_bos_token", "yes"), ("add_space_prefix", 1), ("tokens", "ab"),
         ("tokens", ["a", 3]), ("merges", [["a", "b"]]), ("token_type", [1, 1, "1", 1]),
         ("scores", ["x"] * 4), ("model", ["gpt2"]), ("pre", 7)]  # fmt: skip


@pytest.mark.parametrize("key, value", WRONG, ids=[f"{k}={v!r}" for k, v in WRONG])
def test_gguf_tokenizer_metadata_of_the_wrong_type(key, value):
    """gguf_vocab target, seed 1: tokenizer.ggml.bos_token_id holding an array reached int()
    (TypeError). Every tokenizer.* key is type-checked before use."""
    full = f"tokenizer.{key}" if key == "chat_template" else f"tokenizer.ggml.{key}"
    with pytest.raises(TokenizerError, match=f"{full} must be"):
        Tokenizer.from_gguf_metadata({**VOCAB, full: value})
    assert Tokenizer.from_gguf_metadata(VOCAB).encode("ab")  # the baseline builds


@pytest.mark.parametrize("opening", ["[", "(", "{", "-", "not "])
def test_deeply_nested_chat_template(opening):
    """chat_template target, seed 1: 'InsertRepeatedBytes' of '[' made jinja2's parser recurse
    past Python's limit (RecursionError)."""
    with pytest.raises(TokenizerError, match="nests too deeply|does not compile"):
        compile_chat_template("{{ " + opening * 5000 + "1 }}")


@pytest.mark.parametrize("merge", ["ba ba", "a c", "x y", "ab ab"])
def test_gguf_merge_outside_the_vocab(merge):
    """gguf_vocab target, seed 2: a merge whose pieces or result are not tokens made tokenizers'
    BPE raise a bare Exception ("Token `baba` out of vocabulary"), or panic in Rust (a
    PyO3 PanicException, not even an Exception) when only the result was missing."""
    with pytest.raises(TokenizerError, match="vocab is inconsistent"):
        Tokenizer.from_gguf_metadata({**VOCAB, "tokenizer.ggml.merges": ["a b", merge]})


@pytest.mark.parametrize("merge", ["▁a ▁a", "▁a b", "x ▁a"])
def test_spm_gguf_merge_outside_the_vocab(merge):
    """gguf_vocab target, seed 1, once an SPM vocab takes the file's merges as transformers does:
    a merge whose union is not a token made tokenizers' BPE panic ("range end index 8 out of
    range"), a PyO3 PanicException."""
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "▁", "a", "▁a", "b"],
        "tokenizer.ggml.token_type": [2, 1, 1, 1, 1],
        "tokenizer.ggml.scores": [0.0, -1.0, -2.0, -3.0, -4.0],
    }
    assert Tokenizer.from_gguf_metadata(meta | {"tokenizer.ggml.merges": ["▁ a"]}).encode("a")
    with pytest.raises(TokenizerError, match="vocab is inconsistent"):
        Tokenizer.from_gguf_metadata(meta | {"tokenizer.ggml.merges": ["▁ a", merge]})


@pytest.mark.parametrize("bos", ["a b", "x:y", "$A", "$B"])
def test_gguf_bos_token_the_template_syntax_cannot_hold(bos):
    """gguf_vocab target, seed 3: a BOS token "a b" split the post-processor's template string
    at its space (ValueError "Missing SpecialToken(s)"); "$A" would silently mean the text."""
    meta = {
        **VOCAB,
        "tokenizer.ggml.tokens": [*VOCAB["tokenizer.ggml.tokens"], bos],
        "tokenizer.ggml.token_type": [1, 1, 1, 1, 3],
        "tokenizer.ggml.bos_token_id": 4,
        "tokenizer.ggml.add_bos_token": True,
    }
    if " " in bos:
        assert Tokenizer.from_gguf_metadata(meta).encode("ab") == [4, 2]
    else:
        with pytest.raises(TokenizerError, match="cannot be added by a tokenizers template"):
            Tokenizer.from_gguf_metadata(meta)


@pytest.mark.parametrize("control", ["break", "continue"])
def test_loop_control_outside_a_loop(control):
    """chat_template target, seed 4: `{% break %}` outside a for loop passed jinja2's parser and
    failed in Python's compile of the generated code (SyntaxError)."""
    with pytest.raises(TokenizerError, match="outside loop|not properly in loop"):
        compile_chat_template("{{ 1 }}{% " + control + " %}")


@pytest.mark.parametrize("name", ["gemma3", "llama", "mixtral", "deepseek_v3"])
def test_config_with_an_astronomical_layer_count(name):
    """model_config target, seed 1: num_hidden_layers = 3333...3 (73 digits) and no layer_types
    made Gemma 3's reader build one layer type per layer (a timeout). The shared readers bound
    the layer count before a family sees it, config.json and GGUF alike."""
    import json
    from pathlib import Path

    from tinyserve.errors import ConfigError
    from tinyserve.loading.model_config import config_from_gguf, config_from_hf

    corpus = Path(__file__).parent / "fuzz" / "corpus" / "model_config" / f"{name}.json"
    hf = json.loads(corpus.read_text())
    hf.pop("layer_types", None)
    assert config_from_hf(hf).n_layers == hf["num_hidden_layers"]  # the baseline reads
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        config_from_hf({**hf, "num_hidden_layers": int("3" * 73)})
    meta = {
        "general.architecture": "gemma3", "gemma3.block_count": 10**12,
        "gemma3.embedding_length": 64, "gemma3.attention.head_count": 4,
        "gemma3.feed_forward_length": 128, "gemma3.vocab_size": 256,
        "gemma3.attention.key_length": 16,
    }  # fmt: skip
    with pytest.raises(ConfigError, match="block_count"):
        config_from_gguf(meta, set())
    assert config_from_gguf({**meta, "gemma3.block_count": 6}, set()).n_layers == 6
