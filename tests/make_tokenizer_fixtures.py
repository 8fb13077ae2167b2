"""Generate reference token ids for tests/test_tokenizer.py with independent implementations.

Run with the peers venv (llama-cpp-python), not in CI; CI only reads the committed JSON:
    ~/.cache/tinyserve-peers/venv/bin/python tests/make_tokenizer_fixtures.py [path/to/SmolLM2.gguf]
The GGUF path defaults to $TINYSERVE_SMOLLM2_GGUF.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"


def main(argv: list[str]) -> int:
    from llama_cpp import Llama

    gguf = argv[0] if argv else os.environ.get("TINYSERVE_SMOLLM2_GGUF")
    if not gguf:
        print(
            "usage: make_tokenizer_fixtures.py PATH_TO_SmolLM2-135M-Instruct.Q4_1.gguf",
            file=sys.stderr,
        )
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
