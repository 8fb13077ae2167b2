"""Shared by the benchmark modules: thread pinning, the tiny random model, what is built here."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[2]
FIXTURE_DIR = REPO / "tests" / "fixtures" / "hf" / "smollm2"
# asv installs tinyserve into its own virtualenv, where the catalog would look in ~/.cache: point it
# at this checkout's models/ (where `tinyserve pull` put the weights) unless told otherwise. Set
# before tinyserve is imported: its settings read the environment once.
if (REPO / "models").is_dir():
    os.environ.setdefault("TINYSERVE_MODELS_DIR", str(REPO / "models"))

from tinyserve.settings import settings

# Every benchmark runs at pinned thread counts (BLAS via threadpoolctl, the cpu backend's pool via
# its num_threads option): 1, the stable figure, and MANY (default 4; TINYSERVE_BENCH_THREADS
# changes it), the parallel path. MANY is skipped on a machine with fewer cores: oversubscribed
# kernel / BLAS pools measure the machine's load, not the code.
MANY = settings().bench_threads
THREADS = sorted({1, MANY})

# A tiny Llama (SmolLM2-shaped: GQA, tied head) big enough that the kernels, not Python, show up.
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 384,  # the fixture tokenizer's vocabulary
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

_limits = None  # the threadpoolctl handle: kept alive so the limits hold


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def use_threads(n: int) -> None:
    """Pin BLAS to n threads (threadpoolctl reaches only pools already loaded: call it again once
    a backend is made). NotImplementedError past the cores."""
    global _limits
    if n > cores():
        raise NotImplementedError(f"{n} threads but only {cores()} cores here")
    from threadpoolctl import threadpool_limits

    _limits = threadpool_limits(limits=n)


def write_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """A HF checkpoint directory with seeded random float32 weights (numpy + safetensors)."""
    from safetensors.numpy import save_file

    c = TINY_CONFIG
    D, F, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": np.ones(D, np.float32)}
    for i in range(L):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.input_layernorm.weight": np.ones(D, np.float32),
            f"{p}.post_attention_layernorm.weight": np.ones(D, np.float32),
            f"{p}.self_attn.q_proj.weight": w(q, D),
            f"{p}.self_attn.k_proj.weight": w(kv, D),
            f"{p}.self_attn.v_proj.weight": w(kv, D),
            f"{p}.self_attn.o_proj.weight": w(D, q),
            f"{p}.mlp.gate_proj.weight": w(F, D),
            f"{p}.mlp.up_proj.weight": w(F, D),
            f"{p}.mlp.down_proj.weight": w(D, F),
        }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(c, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # detokenizing is part of serving
        if (FIXTURE_DIR / name).exists():
            shutil.copy(FIXTURE_DIR / name, path / name)
    return path


def default_model_path() -> str | None:
    """The default catalog model's file when it has been pulled, else None (never downloads)."""
    from tinyserve import catalog

    p = catalog.model_path(DEFAULT_MODEL)
    return None if p is None else str(p)


def backend_unavailable(name: str) -> str | None:
    """Why the named backend cannot run here, or None when it can."""
    from tinyserve.backends import backend_names, get_backend_class

    if name not in backend_names():
        return f"backend {name!r} not registered"
    ok, reason = get_backend_class(name).availability()
    return None if ok else f"backend {name!r}: {reason}"


def backend_for(name: str, threads: int):
    """An instance of the named backend on `threads` threads; NotImplementedError (asv: skipped)
    when it is not built or cannot run here."""
    reason = backend_unavailable(name)
    if reason is not None:
        raise NotImplementedError(reason)
    from tinyserve.backends import create_backend
    from tinyserve.bench import thread_options

    use_threads(threads)
    backend = create_backend(name, **thread_options(name, threads))
    use_threads(threads)
    return backend
