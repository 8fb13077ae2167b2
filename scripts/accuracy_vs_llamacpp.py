"""tinyserve's int8 path beside llama.cpp's, each against the float reference on the same token ids.

    python scripts/accuracy_vs_llamacpp.py [--models smollm2-135m-instruct,gemma3-270m]
        [--text-file FILE] [--peer-python PATH] [--threads 2] [--row-kernels]
        [--write-fixture] [--json]

Per model the text (default tests/fixtures/int8_accuracy_text.txt) is tokenized once, by
tinyserve's tokenizer (Gemma's BOS included), and the same ids go to every engine:
- reference: the numpy backend (the GGUF's weights dequantized to float32, float activations);
- tinyserve: the cpu backend as it ships (activations quantized to int8 per row, the packed
  kernels); --row-kernels adds the row kernels (`pack_weights=False`) as a second column;
- llama.cpp: llama-cpp-python in the peers' venv (built by ../shared/peers/setup.sh, paths from
  the repo root), a child process that reads the ids from a .npy, evaluates them with no BOS of
  its own and `logits_all=True`, and writes every position's logits back; otherwise its
  defaults (f16 KV cache, flash attention off in llama-cpp-python, int8 activations wherever its
  CPU kernels have an integer dot product for the weight type).
Each engine against the reference, by tinyserve.testing.accuracy (the definitions the test uses):
mean KL(reference || engine), top-1 agreement, perplexity of the text, and, where an engine's
argmax differs from the reference's, the reference's own top-1 minus top-2 log-probability (a
near-tie flips on any rounding). An engine whose top-1 is below 0.5 is misaligned (a BOS shift,
another vocab order), not inaccurate: that stops the run.

--write-fixture records llama.cpp's side in tests/fixtures/llamacpp_accuracy.json, per model: its
figures, the llama-cpp-python version, the machine's ISA, and sha256 of the token ids and of the
GGUF; tests/test_int8_accuracy.py holds tinyserve to them. Only the default text is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from tinyserve import LLM, catalog
from tinyserve.backends import native
from tinyserve.testing.accuracy import Accuracy, compare, file_digest, ids_digest, paired_gap

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = REPO / "tests" / "fixtures" / "int8_accuracy_text.txt"
FIXTURE = REPO / "tests" / "fixtures" / "llamacpp_accuracy.json"
# where ../shared/peers/setup.sh puts its venv (it honours PEERS_VENV too)
PEER_VENV = Path(os.environ.get("PEERS_VENV", Path.home() / ".cache/tinyserve-peers/venv"))
DEFAULT_MODELS = "smollm2-135m-instruct,gemma3-270m"
MISALIGNED_TOP1 = 0.5  # an engine this far from the reference is reading other tokens
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")

PEER_SETTINGS = "llama-cpp-python defaults (f16 KV cache, flash attention off), n_batch 512"
# Runs in the peers' venv, never in tinyserve's: argv = model, ids.npy, logits.npy, threads.
PEER_PROGRAM = """
import json, sys
import numpy as np
import llama_cpp

model, ids_path, out_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ids = np.load(ids_path).tolist()
llm = llama_cpp.Llama(model_path=model, n_ctx=max(512, len(ids)), n_batch=512, n_threads=threads,
                      n_threads_batch=threads, logits_all=True, verbose=False)
llm.eval(ids)  # the ids as given: eval adds no BOS
np.save(out_path, np.asarray(llm.scores[: llm.n_tokens], dtype=np.float32))  # (T, V)
print(json.dumps({"version": llama_cpp.__version__, "n_vocab": llm.n_vocab(),
                  "system_info": llama_cpp.llama_print_system_info().decode().strip()}))
"""


def read_text(path: Path) -> str:
    """A text file as the model reads it: one trailing newline (an editor's) dropped."""
    return path.read_text(encoding="utf-8").removesuffix("\n")


def machine_isa() -> str:
    """The x86 vector flags the int8 kernels of either engine pick from, as /proc/cpuinfo lists."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(flag for flag in ISA_FLAGS if flag in flags) or "none of " + "/".join(ISA_FLAGS)


def tinyserve_isa() -> str:
    k = native.kernels
    return f"{k.simd_level()}, {k.get_isa()} quantized matmul" if k is not None else "not built"


def llama_cpp_logits(peer_python: Path, model: Path, ids: list[int], threads: int):
    """(T, V) logits of llama.cpp on exactly these ids, and what the child said about itself."""
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, out_path = Path(tmp) / "ids.npy", Path(tmp) / "logits.npy"
        np.save(ids_path, np.asarray(ids, dtype=np.int32))
        argv = [str(peer_python), "-c", PEER_PROGRAM, str(model), str(ids_path), str(out_path)]
        done = subprocess.run(argv + [str(threads)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"llama.cpp child failed ({peer_python}):\n{done.stderr[-2000:]}")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        return np.load(out_path), info


def measure(name: str, text: str, a) -> dict:
    """One model: the reference, tinyserve's engines and llama.cpp on the same ids."""
    path = catalog.resolve(name).resolve()
    t0 = time.perf_counter()
    ref = LLM(str(path), backend="numpy", enable_prefix_caching=False)
    ids = ref.tokenizer.encode(text)
    ref_logits = ref.logits(ids)  # (T, V) float reference
    del ref
    print(
        f"{name}: {len(ids)} positions, reference in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )

    engines = {"tinyserve": {}}
    if a.row_kernels:
        engines["tinyserve rows"] = {"pack_weights": False}
    results: dict[str, Accuracy] = {}
    for engine, options in engines.items():
        llm = LLM(str(path), backend="cpu", enable_prefix_caching=False, backend_options=options)
        results[engine] = compare(ref_logits, llm.logits(ids), ids)
        del llm
    logits, peer = llama_cpp_logits(a.peer_python, path, ids, a.threads)
    if logits.shape != ref_logits.shape:
        raise SystemExit(f"llama.cpp gave logits {logits.shape}, the reference {ref_logits.shape}")
    results["llama.cpp"] = compare(ref_logits, logits, ids)
    for engine, acc in results.items():
        if acc.top1 < MISALIGNED_TOP1:
            raise SystemExit(
                f"{name}: {engine}'s top-1 against the reference is {acc.top1:.3f}: its logits are "
                "not over the same positions or vocab order (a BOS shift?), not merely inexact"
            )
    return {"name": name, "path": path, "ids": ids, "peer": peer, "results": results}


def report(m: dict) -> str:
    results: dict[str, Accuracy] = m["results"]
    ref_ppl = next(iter(results.values())).reference_perplexity
    title = f"{m['name']} ({m['path'].name}), {len(m['ids'])} positions"
    lines = [
        f"{title}, reference perplexity {ref_ppl:.3f}",
        "| engine | mean KL | top-1 | perplexity | disagreements: reference margin median (nats) |",
        "|---|---|---|---|---|",
    ]
    for engine, acc in results.items():
        margin = f"{np.median(acc.margins):.3f}" if len(acc.margins) else "-"
        lines.append(
            f"| {engine} | {acc.kl:.3e} | {acc.top1:.4f} | {acc.perplexity:.3f} | "
            f"{len(acc.disagree)}: {margin} |"
        )
    # paired over the same positions, so that the gap reads against its own noise: a per-position
    # standard error for KL, and the positions only one engine gets wrong for top-1
    ours, theirs = results["tinyserve"], results["llama.cpp"]
    gap = paired_gap(ours.kls, ours.disagree, theirs.kls, theirs.disagree)
    lines.append(
        f"tinyserve - llama.cpp: mean KL {gap.kl:+.2e} (paired s.e. {gap.kl_se:.1e}), top-1 "
        f"{gap.top1:+.4f} (s.e. {gap.top1_se:.4f}; argmax off the reference's at "
        f"{gap.only_first_off} positions where llama.cpp's is not, {gap.only_second_off} the "
        f"other way); no worse beyond 2 s.e.: {gap.no_worse()}"
    )
    return "\n".join(lines)


def fixture_entry(m: dict, text_file: Path) -> dict:
    acc = m["results"]["llama.cpp"]
    return {
        "gguf": m["path"].name,
        "gguf_sha256": file_digest(m["path"]),
        "text": text_file.relative_to(REPO).as_posix(),
        "positions": acc.positions,
        "ids_sha256": ids_digest(m["ids"]),
        "peer": f"llama-cpp-python {m['peer']['version']}",
        "peer_settings": PEER_SETTINGS,
        "peer_system_info": m["peer"]["system_info"],
        "machine_isa": machine_isa(),
        "kl": acc.kl,
        "top1": acc.top1,
        "perplexity": acc.perplexity,
        "reference_perplexity": acc.reference_perplexity,
        # per position, for the test's paired comparison
        "kls": [float(f"{v:.6g}") for v in acc.kls],
        "disagree": [int(t) for t in acc.disagree],
    }


def write_fixture(measured: list[dict], text_file: Path) -> None:
    """Merge these models' entries into the fixture, keeping the other models' as they are."""
    models = json.loads(FIXTURE.read_text())["models"] if FIXTURE.exists() else {}
    for m in measured:
        models[m["name"]] = fixture_entry(m, text_file)
    data = {
        "about": "llama.cpp's int8 accuracy against tinyserve's numpy backend on the same token "
        "ids; written by scripts/accuracy_vs_llamacpp.py --write-fixture",
        "models": models,
    }
    FIXTURE.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {FIXTURE.relative_to(REPO)}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="catalog names, comma-separated")
    ap.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--peer-python", type=Path, default=PEER_VENV / "bin" / "python")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    ap.add_argument("--row-kernels", action="store_true", help="also the unpacked row kernels")
    ap.add_argument("--write-fixture", action="store_true", help="record llama.cpp's side")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout instead")
    a = ap.parse_args(argv)
    text_file = a.text_file.resolve()
    if a.write_fixture and text_file != DEFAULT_TEXT:
        ap.error(f"--write-fixture records only the default text ({DEFAULT_TEXT.name})")
    if not a.peer_python.exists():
        ap.error(f"no peer python at {a.peer_python}: run ../shared/peers/setup.sh first")

    text = read_text(text_file)
    measured = [measure(name, text, a) for name in a.models.split(",")]
    isa = {"machine": machine_isa(), "tinyserve": tinyserve_isa()}
    if a.json:
        out = {
            "isa": isa,
            "text": str(a.text_file),
            "models": {
                m["name"]: {
                    "positions": len(m["ids"]),
                    "peer": m["peer"],
                    **{
                        engine: {"kl": r.kl, "top1": r.top1, "perplexity": r.perplexity}
                        for engine, r in m["results"].items()
                    },
                    "reference_perplexity": m["results"]["llama.cpp"].reference_perplexity,
                }
                for m in measured
            },
        }
        print(json.dumps(out, indent=2))
    else:
        print(f"text: {a.text_file}")
        print(f"CPU flags: {isa['machine']}; tinyserve kernels: {isa['tinyserve']}")
        print(f"llama.cpp: {measured[0]['peer']['system_info']}")
        for m in measured:
            print()
            print(report(m))
    if a.write_fixture:
        write_fixture(measured, text_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
