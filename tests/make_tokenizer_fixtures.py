"""Generate reference token ids for tests/test_tokenizer.py with independent implementations.

Two references, each run offline (CI only reads the committed JSON):

  transformers (the reference the tokenizers must equal), with transformers + torch + gguf +
  sentencepiece + protobuf:
      python tests/make_tokenizer_fixtures.py transformers
    writes corpus.json (the curated strings plus seeded random ones), spm_llama/ (a tiny
    Llama-2-style tokenizer.model, trained here when it is not there) and transformers_ids.json:
    for each model, the ids and decodes transformers gives on every corpus string (for a GGUF:
    AutoTokenizer.from_pretrained(dir, gguf_file=NAME), as it is).
  llama.cpp (a second opinion on SmolLM2, which splits digits first: it differs from
  transformers where whitespace meets a digit), with the peers venv (llama-cpp-python):
      ~/.cache/tinyserve-peers/venv/bin/python tests/make_tokenizer_fixtures.py llamacpp GGUF
    writes smollm2_llamacpp_ids.json for tricky_texts.json. GGUF defaults to
    $TINYSERVE_SMOLLM2_GGUF.
"""

import hashlib
import json
import os
import random
import sys
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"
MODELS = Path(__file__).parent.parent / "models"
GGUFS = {
    "smollm2": MODELS / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": MODELS / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf",
}

# Curated: the classes a tokenizer gets wrong first. Spaces before digits and punctuation,
# newlines and tabs, code indentation, multilingual text, special tokens inside text.
CURATED = [
    "x    =     1;",
    "a  1",
    "a   12 and    345",
    "\t\t1",
    "\n\n1. First\n\n2. Second",
    "Steps:\n1) boil\n2) eat",
    "price:   $ 100 ,  200 !",
    "wait ...   ?!  ;;",
    "line\n\n\nbreaks\r\n\r\nand\ttabs\t \t\n",
    "  two leading",
    "trailing two  ",
    "\n",
    "\n ",
    " \n",
    "def f(x):\n\treturn x\n",
    "class A:\n    def f(self):\n        if self:\n            return [1, 2,  3]\n",
    "    for i in range(10):\n        print(i)  # 10 times\n",
    "int main() {\n  return 0;\n}\n",
    "x" + " " * 32 + "1",
    " " * 40 + "deep = 1\n" + "\t" * 6 + "tabs\n" + " " * 17 + "+ 2",
    "a \t 1 \n 2\t\t3  \n\n  4   .   5",
    'json = {"a": 1, "b": [true, null], "c": "d"}',
    "Héllo wörld, ça va? naïve café, Ångström",
    "e\u0301 combining, \u00a0nbsp, zero\u200bwidth, \ufeffbom",
    "日本語のテキスト、中文字符。한국어 텍스트",
    "مرحبا بالعالم — שלום עולם (RTL) \u200fmixed\u200e",
    "Привет, мир! Ελληνικά. हिन्दी. ไทย",
    "emoji 👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flags 🇫🇷🇯🇵 ❤️ 🏳️\u200d🌈",
    "I'm, you're, they'll've, DON'T, it's, We'D",
    "<s> </s> <unk>",
    "hi <s> there",
    "a </s> b",
    "x  </s>  y",
    "</s><s>[INST] hi [/INST] answer </s><s>[INST] more [/INST]",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "x<|im_end|>y <|im_start|> z",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    " ",
    "   ",
    "",
]
RANDOM_ALPHABET = (
    list(" \t\n\r  0123456789abcXYZ.,;:!?'\"()[]{}<>-_=+*/\\|#@$%&~`^")
    + list("éüßçñÅ日本語中文한국어مرحباשלוםПривет")
    + ["👍🏽", "🇫🇷", "\u200d", "\u00a0", "\u0301", "    ", "\n\n", "\t\t"]
    + ["<s>", "</s>", "<unk>", "<|im_end|>", "<|im_start|>", "<start_of_turn>", "<end_of_turn>"]
)


def make_corpus(n_random: int = 400) -> list[str]:
    rng = random.Random(0)
    texts = list(CURATED)
    for _ in range(n_random):
        texts.append("".join(rng.choice(RANDOM_ALPHABET) for _ in range(rng.randint(1, 40))))
    return texts


def train_spm_llama(out: Path) -> None:
    """A tiny Llama-2-style sentencepiece BPE (byte fallback, identity normalization, dummy prefix)."""
    import sentencepiece as spm

    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(0)
    rng = random.Random(0)
    words = (  # noqa: SIM905 - a sentence reads better than a list of 40 strings
        "the quick brown fox jumps over lazy dog hello world token model cache block café naïve "
        "straße über return def class import numpy value index it's don't they'll INST SYS"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out / "tokenizer"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=0.99,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink()
    # Llama-2's tokenizer_config.json spells out these flags; legacy is the transformers default.
    cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")


def _reference(tok, texts: list[str]) -> dict:
    ids = [tok.encode(t, add_special_tokens=True) for t in texts]
    plain = [tok.encode(t, add_special_tokens=False) for t in texts]
    return {
        "ids": ids,
        "decode": [tok.decode(i) for i in plain],
        "decode_skip": [tok.decode(i, skip_special_tokens=True) for i in plain],
    }


def transformers_fixtures() -> int:
    import transformers
    from transformers import AutoTokenizer

    texts = make_corpus()
    (FIXTURES / "corpus.json").write_text(
        json.dumps({"texts": texts}, ensure_ascii=False, indent=0) + "\n", encoding="utf-8"
    )
    if not (FIXTURES / "spm_llama" / "tokenizer.model").exists():  # committed: training a new
        train_spm_llama(FIXTURES / "spm_llama")  # one can differ by a byte across versions
    out = {"source": f"transformers {transformers.__version__}", "models": {}}
    spm_dir = FIXTURES / "spm_llama"
    tok = AutoTokenizer.from_pretrained(str(spm_dir))
    out["models"]["spm_llama"] = {
        "how": f"AutoTokenizer.from_pretrained(spm_llama/) -> {type(tok).__name__}",
        "sha256": hashlib.sha256((spm_dir / "tokenizer.model").read_bytes()).hexdigest(),
        **_reference(tok, texts),
    }
    for name, gguf in GGUFS.items():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The GGUF route, as it is: for SmolLM2 (tokenizer.ggml.pre "smollm") transformers splits
        # with GPT-2's regex alone, not digit by digit first as the model's tokenizer.json and
        # llama.cpp do. transformers is the reference all the same.
        out["models"][name] = {
            "how": f"AutoTokenizer.from_pretrained(dir, gguf_file={gguf.name!r})",
            "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
            **_reference(tok, texts),
        }
    path = FIXTURES / "transformers_ids.json"
    path.write_text(json.dumps(out, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path} ({len(texts)} texts, models: {', '.join(out['models'])})")
    return 0


def llamacpp_fixtures(argv: list[str]) -> int:
    from llama_cpp import Llama

    gguf = argv[0] if argv else os.environ.get("TINYSERVE_SMOLLM2_GGUF")
    if not gguf:
        print("usage: make_tokenizer_fixtures.py llamacpp PATH_TO_SmolLM2.gguf", file=sys.stderr)
        return 2
    texts = json.loads((FIXTURES / "tricky_texts.json").read_text(encoding="utf-8"))["texts"]
    llm = Llama(model_path=gguf, vocab_only=True, verbose=False)
    ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
    import llama_cpp

    out = {
        "source": "llama-cpp-python "
        + llama_cpp.__version__
        + ": tokenize(add_bos=False, special=True)",
        "gguf_sha256": hashlib.sha256(Path(gguf).read_bytes()).hexdigest(),
        "texts": texts,
        "ids": ids,
    }
    path = FIXTURES / "smollm2_llamacpp_ids.json"
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path} ({len(texts)} texts)")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["transformers"]:
        return transformers_fixtures()
    if argv[:1] == ["llamacpp"]:
        return llamacpp_fixtures(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
