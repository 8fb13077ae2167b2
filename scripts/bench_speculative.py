"""Speculative decoding's TPOT against plain decoding, same model, same run, interleaved.

    python scripts/bench_speculative.py [--model NAME_OR_PATH] [--repeats 5] [--tokens 96]

Two prompts: code whose lines repeat (where prompt lookup pays) and plain prose (where it should
cost almost nothing), each decoded greedily alone with and without
`{"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4, "prompt_lookup_min": 2}`,
the two engines alternating, medians of the repeats. Prints the CPU's ISA and the measured read
bandwidth (these machines are shared and noisy: compare ratios from one run, not across runs).
The greedy tokens of both must agree, else the run says so."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_llamacpp import cpu_isa, read_bandwidth  # noqa: E402

from tinyserve import LLM, SamplingParams  # noqa: E402

CODE = "".join(
    f"def get_{name}(self):\n    return self._{name}\n\n"
    for name in ("width", "height", "depth", "color", "weight")
)
CODE += "def get_"
PROSE = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based inks and a screw press. Within decades"
)


def tpot_ms(llm: LLM, prompt: str, tokens: int) -> tuple[float, list[int], float | None]:
    out = llm.generate([prompt], SamplingParams(max_tokens=tokens, temperature=0))[0]
    m = out.metrics
    return m.tpot * 1e3, out.outputs[0].token_ids, m.acceptance_rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the catalog's default model")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("-k", type=int, default=3, help="num_speculative_tokens")
    a = ap.parse_args(argv)
    config = {
        "method": "ngram",
        "num_speculative_tokens": a.k,
        "prompt_lookup_max": 4,
        "prompt_lookup_min": 2,
    }
    plain = LLM(a.model, backend=a.backend)
    spec = LLM(a.model, backend=a.backend, speculative_config=config)
    isa = cpu_isa()
    print(
        f"{isa['cpu']}, {isa['cores']} cores, AVX2 {isa['AVX2']}, AVX-512 {isa['AVX-512']}, "
        f"VNNI {isa['VNNI']}; read bandwidth {read_bandwidth(isa['cores'] or 1):.1f} GB/s"
    )
    print(f"{plain.checkpoint.path.name} on {a.backend}, {a.tokens} tokens greedy, {config}")
    for label, prompt in (("repeating code", CODE), ("prose", PROSE)):
        for llm in (plain, spec):  # warm-up: first-call costs stay out
            llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0))
        runs = {"plain": [], "ngram": []}
        same, acceptance = True, None
        for _ in range(a.repeats):
            t_plain, ids_plain, _ = tpot_ms(plain, prompt, a.tokens)
            t_spec, ids_spec, acceptance = tpot_ms(spec, prompt, a.tokens)
            runs["plain"].append(t_plain)
            runs["ngram"].append(t_spec)
            same &= ids_plain == ids_spec
        p, s = statistics.median(runs["plain"]), statistics.median(runs["ngram"])
        acc = "-" if acceptance is None else f"{100 * acceptance:.0f}%"
        print(
            f"  {label:15s} TPOT plain {p:6.2f} ms  ngram {s:6.2f} ms  ratio {s / p:5.2f}x  "
            f"acceptance {acc}  same tokens: {same}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
