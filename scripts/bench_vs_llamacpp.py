"""tinyserve's cpu backend beside llama.cpp's own llama-bench: same GGUF, machine and threads.

    python scripts/bench_vs_llamacpp.py [--models smollm2-135m-instruct,gemma3-270m] [--threads 2]
        [--repeats 3] [--prompt-lens 128,512] [--output-len 64] [--llama-bench PATH] [--json]

Per model, prompt length P and repeat, the two engines run one after the other (the order flips
every repeat, so drift and noise hit both); every figure is the median over the repeats:
- prefill tok/s: tinyserve, P / TTFT of a greedy request with max_tokens=1 on seeded random ids;
  llama-bench `-p P -n 0` (its own tokens: the same ids are not possible).
- TPOT (ms per output token after the first), decoding after a P-token prompt: tinyserve, the
  request's own metrics (ignore_eos, max_tokens=output_len+1); llama-bench `-n N -d P` where this
  build has depth (`-d`), else `-n N` on an empty context (said in the output).
- peak RSS: each measurement is its own child process, read back with os.wait4; the largest over
  a model's runs. A child's ru_maxrss also counts the parent's RSS at spawn, so the parent here
  stays plain Python (no NumPy, no model): the models are resolved and the bandwidth measured in
  a child too. tinyserve's KV cache is sized to the request (P + max_tokens, in whole blocks), as
  llama-bench sizes its context to the test, and its prompt ids come from the stdlib's random
  (numpy.random would be harness weight: the library's greedy path never imports it).
- quiet: the share of the machine's CPU other processes took during each run (/proc/stat less
  the child's own rusage); a pair with a noisy run is run again (twice at most), then flagged.
  llama.cpp's spinning thread pool slows many times over when a core is shared, so a busy
  machine flatters tinyserve.
- ISA (/proc/cpuinfo flags), read bandwidth (NumPy sum over 512 MiB, --threads threads, best of
  5) and the floor: weight bytes a decode step reads / that bandwidth.

Children run with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (some machines set both to dodge
old OpenBLAS bugs); the tinyserve child reports the BLAS threadpoolctl found. Both engines get
each child warm-up: llama-bench its own warm-up run, tinyserve a request of the same shape.
llama-bench: build it with ../shared/peers/build_llama_cpp_tools.sh (paths from the repo root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# stdlib only at the top: the parent's RSS is a floor under every child's ru_maxrss

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO.parent / "shared" / "peers" / "build_llama_cpp_tools.sh"
DEFAULT_BIN = Path.home() / ".cache/tinyserve-peers/llama.cpp/src/vendor/llama.cpp/build/bin"
CHILD_ENV_DROP = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
DEFAULT_MODELS = "smollm2-135m-instruct,gemma3-270m"

# the issue 12 targets, against llama.cpp on the same run
TPOT_TARGET = 0.8  # tinyserve TPOT <= 0.8 x llama.cpp's
PREFILL_TARGET = {"smollm2-135m-instruct": 2.0, "gemma3-270m": 1.5}  # prefill >= N x
RSS_TARGET = 1.2  # peak RSS <= 1.2 x llama.cpp's
ENGINES = ("tinyserve", "llama.cpp")
NOISY = 0.05  # a run during which other processes took more of the CPU than this is flagged
REDO_NOISY = 2  # a pair of runs with a noisy one is run again, at most this many times


# -- children (each a fresh `python this_script --child ...`) --------------------------------------


def info_child(a) -> dict:
    """Resolve the models, their weight bytes per token, and the read bandwidth."""
    from tinyserve import catalog

    models = []
    for name in a.models.split(","):
        path = catalog.resolve(name).resolve()
        pulled = {n: catalog.model_path(n) for n in catalog.list_models()}
        known = [n for n, f in pulled.items() if f is not None and f.resolve() == path]
        models.append(
            {
                "name": known[0] if known else name,
                "path": str(path),
                "file_bytes": path.stat().st_size,
                "weight_bytes_per_token": weight_bytes_per_token(path),
            }
        )
    return {"models": models, "read_gb_s": read_bandwidth(a.threads)}


def weight_bytes_per_token(path) -> int:
    """Bytes of every matrix a decode step reads: the layers, the norms and the output head."""
    from tinyserve.loading.gguf_file import read_gguf  # the tensors only: no config needed

    tensors = read_gguf(path).tensors
    total = 0
    for name, t in tensors.items():
        if name == "model.embed_tokens.weight" and "lm_head.weight" in tensors:
            continue  # one row per token; read whole only where it doubles as the head
        total += t.nbytes if hasattr(t, "nbytes") else t.bits.nbytes
    return total


def read_bandwidth(threads: int, size_mb: int = 512) -> float:
    """GB/s of summing a large array split over `threads` threads (NumPy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.ones(size_mb * 2**20 // 8, dtype=np.int64)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def tinyserve_child(a) -> dict:
    """One measurement: prefill (TTFT of max_tokens=1) or decode (TPOT) at prompt length P."""
    import random

    from tinyserve import LLM, SamplingParams

    P, n_out = a.prompt_len, a.output_len
    max_tokens = 1 if a.kind == "prefill" else n_out + 1
    block = 16  # LLM's default block_size
    llm = LLM(
        a.model,
        backend="cpu",
        backend_options={"num_threads": a.threads},
        # the KV cache holds the request, in whole blocks, as llama-bench's context holds its test
        # (n_ctx = P, or P + N with -d): the library's default sizes it for many requests
        kv_cache_tokens=-(-(P + max_tokens) // block) * block,
        block_size=block,
        enable_prefix_caching=False,
    )
    # the ids from the stdlib's generator: numpy.random (and the OpenSSL it loads) would add
    # megabytes of harness to this child's RSS that the library's greedy path never imports
    rng = random.Random(f"{P}/{a.repeat}")
    warm_ids, ids = ([rng.randrange(llm.config.vocab_size) for _ in range(P)] for _ in range(2))
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate([warm_ids], greedy)  # warm-up of the same shape (other ids: no cache hit)
    m = llm.generate([ids], greedy)[0].metrics
    out = {"blas": blas_info(), "describe": llm.backend.describe()}
    if a.kind == "prefill":
        out["prefill_tok_s"] = P / m.ttft
    else:
        assert len(m.token_times) == n_out + 1, f"{len(m.token_times)} tokens, not {n_out + 1}"
        out["tpot_ms"] = m.tpot * 1e3
    return out


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    found = [
        f"{d.get('internal_api')} {d.get('version')} {d.get('architecture')}, "
        f"{d.get('num_threads')} threads"
        for d in threadpool_info()
        if d.get("user_api") == "blas"
    ]
    return "; ".join(found) or "none loaded"


# -- the parent: spawning and reading back ---------------------------------------------------------


def child_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in CHILD_ENV_DROP}


def run(cmd: list[str]) -> tuple[str, dict]:
    """(stdout, {peak RSS MiB, share of the machine's CPU others used meanwhile}) of one child."""
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: no deadlock on a full pipe
        busy0, t0 = busy_cpu_s(), time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=child_env(), text=True)
        stdout = p.stdout.read()  # not communicate(): it would reap the child before wait4
        p.stdout.close()
        _, status, usage = os.wait4(p.pid, 0)
        wall, busy = time.perf_counter() - t0, busy_cpu_s() - busy0
        p.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            raise SystemExit(f"child failed ({code}): {' '.join(cmd)}\n{err.read()[-3000:]}")
    others = max(0.0, busy - usage.ru_utime - usage.ru_stime) / (wall * os.cpu_count())
    return stdout, {"rss_mib": usage.ru_maxrss / 1024, "others_cpu": others}


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run_py_child(a, *args) -> tuple[dict, dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(a.threads), *args]
    stdout, stats = run(cmd)
    return json.loads(stdout.strip().splitlines()[-1]), stats


def find_llama_bench(given: str | None) -> Path:
    """--llama-bench as given, else llama-bench on $PATH, else the build script's bin folder."""
    if given:
        if not (Path(given).is_file() and os.access(given, os.X_OK)):
            raise SystemExit(f"--llama-bench {given}: not an executable file")
        return Path(given)
    for cand in (shutil.which("llama-bench"), DEFAULT_BIN / "llama-bench"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    build = os.path.relpath(BUILD_SCRIPT, Path.cwd())
    raise SystemExit(
        f"llama-bench not found (--llama-bench PATH, $PATH, "
        f"~/{DEFAULT_BIN.relative_to(Path.home())}). Build it with:\n"
        f"    bash {build}    (~12 min on 2 cores; prints the bin folder)"
    )


def llama_bench_features(exe: Path) -> dict:
    """Which flags this llama-bench has: depth (-d) and the form -fa takes."""
    h = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, env=child_env(), check=False
    )
    text = h.stdout + h.stderr
    fa_words = "on|off" in text.split("--flash-attn", 1)[-1].splitlines()[0]
    return {"depth": "--n-depth" in text, "fa": "on" if fa_words else "1"}


def llama_bench(a, exe: Path, feats: dict, model: str, kind: str, P: int) -> tuple[dict, dict]:
    cmd = [str(exe), "-m", model, "-t", str(a.threads), "-r", "1", "-fa", feats["fa"], "-o", "json"]
    if kind == "prefill":
        cmd += ["-p", str(P), "-n", "0"]
    else:
        cmd += ["-p", "0", "-n", str(a.output_len)] + (["-d", str(P)] if feats["depth"] else [])
    stdout, stats = run(cmd)
    (test,) = json.loads(stdout)
    ts = test["avg_ts"]
    res = {"build": f"{test.get('build_commit')} ({test.get('build_number')})"}
    res.update({"prefill_tok_s": ts} if kind == "prefill" else {"tpot_ms": 1e3 / ts})
    return res, stats


def cpu_isa() -> dict:
    flags, name = set(), "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        elif line.startswith("model name") and name == "?":
            name = line.split(":", 1)[1].strip()
    return {
        "cpu": name,
        "cores": os.cpu_count(),
        "AVX2": "avx2" in flags,
        "AVX-512": "avx512f" in flags,
        "VNNI": bool({"avx512_vnni", "avx_vnni"} & flags),
        "flags": sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))),
    }


def git_commit() -> str:
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        )

    head = git("rev-parse", "--short", "HEAD").stdout.strip() or "?"
    dirty = git("diff", "--quiet", "HEAD", "--", "tinyserve", "ext", "setup.py").returncode
    return head + (" (+ uncommitted changes in tinyserve/ or ext/)" if dirty else "")


def median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


# -- main ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="catalog names or GGUF paths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-lens", default="128,512")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--llama-bench", help="the llama-bench binary (default: $PATH, then the cache)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON, no table")
    for hidden in ("--child", "--model", "--kind"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(info_child(a) if a.child == "info" else tinyserve_child(a)))
        return 0
    if a.threads < 1 or a.repeats < 1 or a.output_len < 2:
        raise SystemExit("--threads and --repeats must be >= 1, --output-len >= 2")

    exe = find_llama_bench(a.llama_bench)
    feats = llama_bench_features(exe)
    lens = [int(x) for x in a.prompt_lens.split(",")]
    load_start = os.getloadavg()
    log = sys.stderr
    print("resolving models, measuring read bandwidth ...", file=log)
    info, info_stats = run_py_child(a, "--child", "info", "--models", a.models)
    r = {
        "commit": git_commit(),
        "llama_bench": str(exe),
        "llama_bench_depth": feats["depth"],
        "flash_attn": feats["fa"],
        "isa": cpu_isa(),
        "read_gb_s": info["read_gb_s"],
        "read_others_cpu": info_stats["others_cpu"],
        "threads": a.threads,
        "repeats": a.repeats,
        "output_len": a.output_len,
        "unset_in_children": [k for k in CHILD_ENV_DROP if k in os.environ],
        "parent_rss_mib": parent_rss_mib(),
        "load_avg_start": load_start,
        "models": [],
    }
    for m in info["models"]:
        samples: dict = {e: {} for e in ENGINES}
        rss: dict = {e: [] for e in ENGINES}
        others: list[float] = []  # per kept run: the machine's CPU share other processes took
        redone = 0
        for rep in range(a.repeats):
            for P in lens:
                for kind in ("prefill", "decode"):
                    print(f"[{m['name']}] repeat {rep + 1}: {kind} P={P}", file=log)
                    pair, n_redone = measure_pair(a, exe, feats, m, kind, P, rep)
                    redone += n_redone
                    for engine, (value, stats) in pair.items():
                        samples[engine].setdefault(f"{kind}_{P}", []).append(value)
                        rss[engine].append(stats["rss_mib"])
                        others.append(stats["others_cpu"])
        m["samples"] = samples
        m["median"] = {e: {k: median(v) for k, v in samples[e].items()} for e in ENGINES}
        m["peak_rss_mib"] = {e: max(rss[e]) for e in ENGINES}
        m["others_cpu"], m["redone_pairs"] = others, redone
        m["verdicts"] = verdicts(m, lens)
        r["models"].append(m)
    r["load_avg_end"] = os.getloadavg()
    print(json.dumps(r, indent=1) if a.json else report(r, lens))
    return 0


def measure_pair(a, exe, feats, m: dict, kind: str, P: int, rep: int) -> tuple[dict, int]:
    """Both engines' runs, the order flipped every repeat; run again while one was noisy."""
    order = ENGINES if rep % 2 == 0 else ENGINES[::-1]
    for attempt in range(1 + REDO_NOISY):
        pair = {e: measure(a, exe, feats, m, e, kind, P, rep) for e in order}
        if max(stats["others_cpu"] for _, stats in pair.values()) <= NOISY:
            break
        if attempt < REDO_NOISY:
            print("  other work ran meanwhile: this pair again, after a pause", file=sys.stderr)
            time.sleep(5)
    return pair, attempt


def measure(a, exe, feats, m: dict, engine: str, kind: str, P: int, rep: int):
    """(prefill tok/s or TPOT ms, run()'s stats) of one run; notes each engine's build in `m`."""
    if engine == "tinyserve":
        res, stats = run_py_child(
            a, "--child", "tinyserve", "--model", m["path"], "--kind", kind,
            "--prompt-len", str(P), "--output-len", str(a.output_len), "--repeat", str(rep),
        )  # fmt: skip
        m["tinyserve_blas"], m["tinyserve_describe"] = res["blas"], res["describe"]
    else:
        res, stats = llama_bench(a, exe, feats, m["path"], kind, P)
        m["llama_build"] = res["build"]
    return res["prefill_tok_s" if kind == "prefill" else "tpot_ms"], stats


def parent_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the report ------------------------------------------------------------------------------------


def report(r: dict, lens: list[int]) -> str:
    isa, yes = r["isa"], {True: "yes", False: "no"}
    unset = ", ".join(r["unset_in_children"]) or "neither was set here"
    if r["llama_bench_depth"]:
        decode = f"-p 0 -n {r['output_len']} -d P (decode after a P-token context, as tinyserve)"
    else:
        decode = f"-p 0 -n {r['output_len']}: no -d in this build, tg on an empty context"
    out = [
        f"tinyserve {r['commit']}; llama-bench {r['llama_bench']}",
        f"CPU: {isa['cpu']}, {isa['cores']} cores; AVX2 {yes[isa['AVX2']]}, "
        + f"AVX-512 {yes[isa['AVX-512']]}, VNNI {yes[isa['VNNI']]} ({' '.join(isa['flags'])})",
        f"read bandwidth {r['read_gb_s']:.1f} GB/s "
        + f"(NumPy sum over 512 MiB, {r['threads']} threads, best of 5; other processes took "
        + f"{r['read_others_cpu']:.0%} of the CPU meanwhile)",
        f"{r['threads']} threads, greedy, EOS ignored, {r['output_len']} output tokens timed; "
        + f"medians of {r['repeats']} interleaved repeats (order flipped each repeat); "
        + "each run its own process",
        f"children ran with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset ({unset})",
        f"llama-bench: -fa {r['flash_attn']} -r 1 (after its own warm-up run); "
        + f"prefill -p P -n 0; decode {decode}",
        f"load average {fmt_load(r['load_avg_start'])} before, {fmt_load(r['load_avg_end'])} "
        + f"after; parent RSS {r['parent_rss_mib']:.0f} MiB (a floor under each child's maxrss)",
    ]
    for m in r["models"]:
        t, ll = m["samples"]["tinyserve"], m["samples"]["llama.cpp"]
        out += [
            "",
            f"## {m['name']}: {Path(m['path']).name} ({m['file_bytes'] / 2**20:.1f} MiB)",
            f"tinyserve: {m.get('tinyserve_describe')}; BLAS: {m.get('tinyserve_blas')}",
            f"llama.cpp build {m.get('llama_build')}",
            busy_note(m["others_cpu"], m["redone_pairs"]),
            "",
            "| metric | tinyserve | llama.cpp | ratio | target | met |",
            "|---|---|---|---|---|---|",
        ]
        for v in m["verdicts"]:
            fmt = {"tok/s": "{:.0f}", "ms": "{:.2f}", "MiB": "{:.0f}"}[v["unit"]]
            out.append(
                f"| {v['metric']} ({v['unit']}) | {cell(v['tinyserve'], fmt)} | "
                + f"{cell(v['llama.cpp'], fmt)} | {v['ratio']:.2f}x | {v['target']} | {v['met']} |"
            )
        floor_ms = m["weight_bytes_per_token"] / (r["read_gb_s"] * 1e9) * 1e3
        out += [
            "",
            f"floor: {m['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token / "
            + f"{r['read_gb_s']:.1f} GB/s = {floor_ms:.2f} ms per token; TPOT / floor:",
        ]
        for P in lens:
            k = f"decode_{P}"
            out.append(
                f"  after P={P}: tinyserve {median(t[k]) / floor_ms:.2f}x, "
                + f"llama.cpp {median(ll[k]) / floor_ms:.2f}x"
            )
    judged = [v["met"] for m in r["models"] for v in m["verdicts"] if v["met"] != "-"]
    noisy = max(x for m in r["models"] for x in m["others_cpu"]) > NOISY
    out += [
        "",
        f"issue 12 targets met: {judged.count('met')} of {len(judged)}"
        + (" (on a machine that was NOT quiet: rerun before quoting)" if noisy else ""),
    ]
    return "\n".join(out)


def busy_note(others: list[float], redone: int) -> str:
    """How much of the machine other processes took while the kept runs ran."""
    note = (
        f"other processes took {median(others):.0%} of the machine's CPU during a run (median; "
        f"worst kept run {max(others):.0%}; {redone} noisy pairs run again)"
    )
    if max(others) > NOISY:
        note += ": NOT QUIET, other work competes for the cores; rerun before quoting"
    return note


def verdicts(m: dict, lens: list[int]) -> list[dict]:
    """Each table row: both engines' samples, the ratio of medians and the issue 12 target."""
    t, ll, rss = m["samples"]["tinyserve"], m["samples"]["llama.cpp"], m["peak_rss_mib"]
    pf_target = PREFILL_TARGET.get(m["name"])
    rows = [(f"prefill, P={P}", f"prefill_{P}", "tok/s", pf_target, ">=") for P in lens]
    rows += [(f"TPOT after P={P}", f"decode_{P}", "ms", TPOT_TARGET, "<=") for P in lens]
    out = [verdict(name, unit, t[k], ll[k], target, sense) for name, k, unit, target, sense in rows]
    rss_pair = [rss["tinyserve"]], [rss["llama.cpp"]]
    out.append(verdict("peak RSS", "MiB", *rss_pair, RSS_TARGET, "<="))
    return out


def verdict(metric, unit, ours: list, theirs: list, target, sense) -> dict:
    ratio = median(ours) / median(theirs)
    met = "-" if target is None else (ratio >= target if sense == ">=" else ratio <= target)
    return {
        "metric": metric,
        "unit": unit,
        "tinyserve": ours,
        "llama.cpp": theirs,
        "ratio": ratio,
        "target": "-" if target is None else f"{sense} {target}x",
        "met": {True: "met", False: "not met"}.get(met, "-"),
    }


def cell(values: list, fmt: str) -> str:
    spread = f" ({fmt.format(min(values))}-{fmt.format(max(values))})" if len(values) > 1 else ""
    return fmt.format(median(values)) + spread


def fmt_load(load) -> str:
    return "/".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    sys.exit(main())
