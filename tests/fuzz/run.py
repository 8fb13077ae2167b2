"""Run the fuzz targets (tests/fuzz/targets.py) with atheris, each for a bounded, seeded time.

    python tests/fuzz/run.py                      # every target, 60 s each, seed 1
    python tests/fuzz/run.py gguf protocol --seconds 300 --seed 7

Each target runs in its own process from its committed seed corpus (tests/fuzz/corpus/<name>/,
never written to: new inputs go to a scratch corpus). A crash (any exception that is not the
target's typed error), a timeout or running out of memory fails the run and leaves the input in
--artifacts; turn it into a regression test in the normal suite. Without atheris this exits 1:
a CI step that fuzzes nothing must not pass.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))  # the checkout's tinyserve, as the tests import it

from targets import CORPUS, TARGETS

# the modules whose branches guide the fuzzer (atheris instruments them as they are imported)
INSTRUMENTED = [
    "tinyserve.loading.gguf_header", "tinyserve.loading.gguf_file", "tinyserve.loading.finite",
    "tinyserve.loading.safetensors_file", "tinyserve.loading.json_file",
    "tinyserve.loading.model_config", "tinyserve.models.registry", "tinyserve.config",
    "tinyserve.tokenizer", "tinyserve.gguf_vocab", "tinyserve.tokenizer_engines",
    "tinyserve.detokenizer", "tinyserve.chat_template", "tinyserve.serving.protocol",
    "tinyserve.sampling",
]  # fmt: skip


def child(name: str, seconds: int, seed: int, artifacts: Path) -> None:
    """Fuzz one target in this process (libFuzzer exits when the time is up or on a crash)."""
    import importlib

    import atheris

    with atheris.instrument_imports(include=["tinyserve"]):
        for module in INSTRUMENTED:
            importlib.import_module(module)
    import targets

    scratch = tempfile.mkdtemp(prefix=f"fuzz-{name}-")
    argv = [sys.argv[0], f"-max_total_time={seconds}", f"-seed={seed}", "-timeout=30",
            "-rss_limit_mb=4096", "-max_len=65536", "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/{name}-", scratch, str(CORPUS / name)]  # fmt: skip
    atheris.Setup(argv, lambda data: targets.run_one(name, data))
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("targets", nargs="*", default=list(TARGETS), help="default: all")
    ap.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--artifacts", type=Path, default=None, help="where crashing inputs go")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="tinyserve-fuzz-artifacts-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child, args.seconds, args.seed, artifacts)
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError as e:
        print(f"fuzz: atheris is not installed ({e}): pip install -e '.[fuzz]'", file=sys.stderr)
        return 1
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        print(f"fuzz: unknown targets {unknown}; known: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    failed = []
    for name in args.targets:
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, __file__, "--child", name, "--seconds", str(args.seconds),
             "--seed", str(args.seed), "--artifacts", str(artifacts)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            check=False,
        )  # fmt: skip
        runs = re.findall(r"stat::number_of_executed_units: (\d+)", r.stdout)
        crashes = sorted(p.name for p in artifacts.glob(f"{name}-*"))
        status = "ok" if r.returncode == 0 and not crashes else "CRASH"
        print(f"fuzz {name:<14} {status:<5} {runs[-1] if runs else '?':>9} runs in "
              f"{time.monotonic() - t0:5.0f} s (seed {args.seed})", flush=True)  # fmt: skip
        if status != "ok":
            failed.append(name)
            tail = "\n".join(r.stdout.strip().splitlines()[-40:])
            print(f"{tail}\ncrashing inputs: {[str(artifacts / c) for c in crashes]}", flush=True)
    if failed:
        print(f"fuzz: {len(failed)} target(s) crashed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
