"""The checks: a backend's ops, logits, greedy decoding, batching and paging against NumPy."""

from __future__ import annotations

import math

import numpy as np

from ..backends.numpy_backend import NumpyBackend
from ..backends.numpy_ops import NumpyOps
from ..batch import Batch
from ..engine import Engine, EngineConfig
from ..loading import Checkpoint
from ..models import build_model
from ..models.rope import rope_inv_freq
from ..sampling import SamplingParams
from .checkpoints import ARCHITECTURES, MOE_ARCHITECTURES, tiny_checkpoint
from .routing import _pinned_routing
from .tolerances import _dtype, _logits_atol, tolerance

# -- helpers --------------------------------------------------------------------------------------


def _engine(ckpt: Checkpoint, backend, **config) -> Engine:
    config = {"block_size": 4, "kv_cache_tokens": 1024, "max_num_seqs": 8, **config}
    return Engine(ckpt, None, backend, EngineConfig(**config))


def _prompts(seed: int, lengths=(11, 5, 23), vocab: int = 128) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=n).tolist() for n in lengths]


def _greedy(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[i] for i in ids]


def _close(got: np.ndarray, want: np.ndarray, atol: float, what: str) -> None:
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    assert got.shape == want.shape, f"{what}: shape {got.shape}, reference {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    assert err <= atol, f"{what}: max |diff| {err:.3g} > tolerance {atol:.3g}"


# -- the checks -----------------------------------------------------------------------------------


def check_ops(backend, seed: int = 0) -> None:
    """Every op of backend.ops against NumpyOps on random inputs rounded to the backend's dtype."""
    ops, ref, tol = backend.ops, NumpyOps(), tolerance(backend)
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def put(x):  # an activation on the backend, and the float32 values it actually holds
        t = ops.from_numpy(x)
        return t, np.asarray(ops.to_numpy(t), dtype=np.float32)

    def same(got, want, what, scale=1.0):
        np.testing.assert_allclose(
            np.asarray(ops.to_numpy(got), dtype=np.float32),
            want,
            rtol=tol.rtol,
            atol=tol.atol * scale,
            err_msg=f"op {what}",
        )

    ids = rng.integers(0, 50, size=9)
    w = ops.weight(rand(50, 24))
    same(ops.embedding(ops.from_numpy(ids), w), ref.embedding(ids, ops.to_numpy(w)), "embedding")
    for n, k, m in ((1, 8, 5), (7, 64, 33), (16, 96, 64)):
        x, xr = put(rand(n, k))
        w = ops.weight(rand(m, k) / math.sqrt(k))
        same(ops.matmul(x, w), ref.matmul(xr, ops.to_numpy(w)), f"matmul {n}x{k}x{m}", scale=4)
    for shape in ((1, 8), (3, 5, 64), (7, 96)):
        x, xr = put(rand(*shape) * 3)
        g = ops.vector(rand(shape[-1]))
        same(
            ops.rms_norm(x, g, 1e-6),
            ref.rms_norm(xr, ops.to_numpy(g), 1e-6),
            f"rms_norm {shape}",
            4,
        )
    cfg = tiny_checkpoint("llama").config
    for rotary in (16, 8):  # full and partial rotary
        inv = rope_inv_freq(cfg, rotary_dim=rotary)
        pos = np.array([0, 1, 2, 7, 100, 255, 3, 4000], dtype=np.int64)
        x, xr = put(rand(8, 3, 16))
        want = ref.rope(xr, pos, inv)
        same(ops.rope(x, ops.from_numpy(pos), ops.vector(inv)), want, f"rope R={rotary}", 4)
    gate, gr = put(rand(5, 96) * 3)
    up, ur = put(rand(5, 96))
    same(ops.silu_mul(gate, up), ref.silu_mul(gr, ur), "silu_mul", 4)
    same(ops.gelu_tanh_mul(gate, up), ref.gelu_tanh_mul(gr, ur), "gelu_tanh_mul", 4)
    x, xr = put(rand(4, 3, 17) * 4)
    same(ops.softmax(x), ref.softmax(xr), "softmax")
    x, xr = put(rand(6, 50) * 20)
    same(ops.softcap(x, 10.0), ref.softcap(xr, 10.0), "softcap", 4)
    x, xr = put(rand(7, 3, 24) / 3)
    w = ops.vector(rand(3, 10, 24))  # MLA's absorbed projections are held as vectors (float32)
    same(ops.head_matmul(x, w), ref.head_matmul(xr, ops.to_numpy(w)), "head_matmul", 4)
    _check_moe(ops, rng, put, same)
    _check_kv_ops(backend, rng, same)


def _check_moe(ops, rng, put, same) -> None:
    """moe with router output as the models pass it (NumPy ids and weights), one expert unused."""
    ref = NumpyOps()
    N, D, F, E, K = 11, 32, 24, 5, 2
    x, xr = put(rng.standard_normal((N, D), dtype=np.float32))
    experts = [
        tuple(
            ops.weight(rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[1]))
            for shape in ((F, D), (F, D), (D, F))
        )
        for _ in range(E)
    ]
    dense = [tuple(np.asarray(ops.to_numpy(m), np.float32) for m in e) for e in experts]
    ids = np.stack([rng.choice(E - 1, K, replace=False) for _ in range(N)])  # (N, K): E-1 unused
    weights = rng.random((N, K)).astype(np.float32)
    for act in ("silu", "gelu_tanh"):
        want = ref.moe(xr, ids, weights, dense, act)
        same(ops.moe(x, ids, weights, experts, act), want, f"moe ({act})", 4)


def _check_kv_ops(backend, rng, same) -> None:
    """write_kv, copy_blocks and paged_attention over a fragmented pool, mixed prefill + decode."""
    ops, ref = backend.ops, NumpyOps()
    NB, BS, KVH, Dh, H = 12, 4, 2, 16, 4
    (pools,) = backend.allocate_kv([{"k": (KVH, Dh), "v": (KVH, Dh)}], NB, BS)
    k_ref = np.zeros((NB, BS, KVH, Dh), np.float32)
    v_ref = np.zeros_like(k_ref)
    # three sequences: 6 new prompt tokens, 1 decode token after 9, 3 more after 2; scattered blocks
    tables = [[7, 2], [0, 11, 5], [9, 1]]
    chunks = [(list(range(6)), 0, tables[0]), ([1], 9, tables[1]), ([4, 5, 6], 2, tables[2])]
    history = Batch.build([([0] * 9, 0, tables[1]), ([0] * 2, 0, tables[2])], BS)
    batch = Batch.build(chunks, BS)
    for b in (history, batch):
        k_new = rng.standard_normal((b.n_tokens, KVH, Dh), dtype=np.float32)
        v_new = rng.standard_normal((b.n_tokens, KVH, Dh), dtype=np.float32)
        k_t, v_t = ops.from_numpy(k_new), ops.from_numpy(v_new)
        ops.write_kv(pools["k"], k_t, ops.from_numpy(b.slots))
        ops.write_kv(pools["v"], v_t, ops.from_numpy(b.slots))
        ref.write_kv(k_ref, np.asarray(ops.to_numpy(k_t), np.float32), b.slots)
        ref.write_kv(v_ref, np.asarray(ops.to_numpy(v_t), np.float32), b.slots)
    same(pools["k"], k_ref, "write_kv")
    q = ops.from_numpy(rng.standard_normal((batch.n_tokens, H, Dh), dtype=np.float32))
    qr = np.asarray(ops.to_numpy(q), np.float32)
    for window in (None, 3):
        got = ops.paged_attention(q, pools["k"], pools["v"], batch, 0.25, window)
        want = ref.paged_attention(qr, k_ref, v_ref, batch, 0.25, window)
        same(got, want, f"paged_attention (window {window})", 2)
    # MLA (DeepSeek): one pool of [k_rope, c_kv] per token; values are a strided view of it
    (mla,) = backend.allocate_kv([{"kv": (1, Dh + 8)}], NB, BS)
    latent = ops.from_numpy(rng.standard_normal((batch.n_tokens, 1, Dh + 8), dtype=np.float32))
    ops.write_kv(mla["kv"], latent, ops.from_numpy(batch.slots))
    mla_ref = np.asarray(ops.to_numpy(mla["kv"]), np.float32)
    qm = ops.from_numpy(rng.standard_normal((batch.n_tokens, H, Dh + 8), dtype=np.float32))
    got = ops.paged_attention(qm, mla["kv"], mla["kv"][..., 8:], batch, 0.25)
    want = ref.paged_attention(
        np.asarray(ops.to_numpy(qm), np.float32), mla_ref, mla_ref[..., 8:], batch, 0.25
    )
    same(got, want, "paged_attention (strided value view)", 2)
    backend.copy_blocks([pools], [7, 0], [3, 4])
    ref.copy_blocks(v_ref, np.array([7, 0]), np.array([3, 4]))
    same(pools["v"], v_ref, "copy_blocks")


def check_logits(backend, arch: str, seed: int = 0) -> None:
    """The backend's logits of every position match the numpy backend's on a random checkpoint:
    one prompt of 29 tokens, one of 11 (Phi-3's LongRoPE: both sides of its switch at 16).

    Mixtures of experts below float32, or with quantized weights (whose activations a backend may
    round to 8 bits), get the reference's expert choices (_pinned_routing): a near-tie between
    two experts may flip under rounding and move whole rows, a discrete event that says nothing
    about the backend's arithmetic."""
    ckpt = tiny_checkpoint(arch, seed)
    quantized = ARCHITECTURES[arch][1].startswith("Q")
    pin = arch in MOE_ARCHITECTURES and (_dtype(backend) != "float32" or quantized)
    for ids in _prompts(seed + 1, lengths=(29, 11)):
        choices: list[np.ndarray] = []
        with _pinned_routing(choices, replay=False):
            want = _engine(ckpt, NumpyBackend()).logits(ids)  # (T, V)
        with _pinned_routing(choices if pin else None, replay=True):
            got = _engine(ckpt, backend).logits(ids)
        _close(np.asarray(got), want, _logits_atol(backend, want, arch), f"{arch} logits")


def check_greedy(backend, arch: str = "llama", n_tokens: int = 12, seed: int = 0) -> None:
    """Greedy decoding through the engine picks, at every step, the reference's argmax (up to the
    dtype's tolerance when two logits are that close). Below float32, a mixture of experts may
    legitimately fail this where a router's near-tie flips (check_logits pins the routing)."""
    ckpt = tiny_checkpoint(arch, seed)
    prompts = _prompts(seed + 2)
    got = _greedy(_engine(ckpt, backend), prompts, n_tokens)
    reference = _engine(ckpt, NumpyBackend())
    for prompt, out in zip(prompts, got):
        assert len(out) == n_tokens, f"{arch}: {len(out)} tokens generated, wanted {n_tokens}"
    _assert_argmax_steps(reference, prompts, got, lambda logits: _logits_atol(backend, logits, arch),
                         arch)  # fmt: skip


def _assert_argmax_steps(reference: Engine, prompts, outs, atol_of, what: str) -> None:
    """Each greedy token of outs is the reference's argmax along that same path, up to the
    tolerance atol_of(logits) where two logits are that close (a near-tie may flip)."""
    for prompt, out in zip(prompts, outs):
        logits = reference.logits(prompt + out[:-1])[len(prompt) - 1 :]  # (n, V) what it saw
        margin = atol_of(logits)
        for i, (row, token) in enumerate(zip(logits, out)):
            best = int(np.argmax(row))
            assert row[token] >= row[best] - margin, (
                f"{what}: greedy step {i} chose {token} ({row[token]:.4f}) but the reference's "
                f"argmax is {best} ({row[best]:.4f})"
            )


def check_batched_equals_alone(backend, arch: str = "qwen2", seed: int = 0) -> None:
    """Sequences batched with others (prefill chunks and decodes mixed) get the logits they get alone."""
    ckpt = tiny_checkpoint(arch, seed)
    model = build_model(ckpt.config, ckpt.tensors, backend.ops)
    BS = 4
    prompts = _prompts(seed + 3, lengths=(9, 3, 14))
    tables = [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]

    def run(seqs: list[int]) -> list[np.ndarray]:
        """Prefill the given sequences together, then decode one token each together."""
        kv = backend.allocate_kv(model.kv_layout(), 12, BS)
        first = Batch.build([(prompts[s], 0, tables[s]) for s in seqs], BS)
        out = [np.asarray(backend.forward(model, first, kv))]
        second = Batch.build([([7 + s], len(prompts[s]), tables[s]) for s in seqs], BS)
        out.append(np.asarray(backend.forward(model, second, kv)))
        return out

    together = run([0, 1, 2])
    for s in range(3):
        alone = run([s])
        atol = _logits_atol(backend, alone[0], arch)
        _close(together[0][s : s + 1], alone[0], atol, f"prefill of sequence {s} batched vs alone")
        _close(together[1][s : s + 1], alone[1], atol, f"decode of sequence {s} batched vs alone")
    engine = _engine(ckpt, backend)
    batched = _greedy(engine, prompts, 6)
    if _dtype(backend) == "float32":
        alone = [_greedy(engine, [p], 6)[0] for p in prompts]
        assert batched == alone, f"{arch}: greedy batched {batched} != alone {alone}"


def check_paged_equals_contiguous(backend, arch: str = "mistral", seed: int = 0) -> None:
    """A sequence in scattered blocks of a pool full of other data == the same in blocks 0, 1, 2, ...;
    and prefill in chunks with cached decode == one forward over everything."""
    ckpt = tiny_checkpoint(arch, seed)
    model = build_model(ckpt.config, ckpt.tensors, backend.ops)
    BS, NB = 4, 16
    n_tokens = 22
    rs = ckpt.config.rope_scaling or {}
    if rs.get("rope_type") == "longrope":
        # LongRoPE picks its factors from the sequence's length at each forward, so chunks shorter
        # than the switch would rotate differently from the whole (as in transformers): stay below
        n_tokens = int(rs["original_max_position_embeddings"])
    ids = _prompts(seed + 4, lengths=(n_tokens,))[0]
    n_blocks = -(-len(ids) // BS)
    rows = list(range(len(ids)))

    kv = backend.allocate_kv(model.kv_layout(), NB, BS)
    contiguous = np.asarray(
        backend.forward(model, Batch.build([(ids, 0, list(range(n_blocks)))], BS, rows), kv)
    )

    kv = backend.allocate_kv(model.kv_layout(), NB, BS)
    noise = _prompts(seed + 5, lengths=(NB * BS,))[
        0
    ]  # fill every block with another sequence first
    backend.forward(model, Batch.build([(noise, 0, list(range(NB)))], BS), kv)
    scattered = list(np.random.default_rng(seed).permutation(NB)[:n_blocks])
    paged = np.asarray(backend.forward(model, Batch.build([(ids, 0, scattered)], BS, rows), kv))
    atol = _logits_atol(backend, contiguous, arch)
    _close(paged, contiguous, atol, f"{arch}: fragmented pool vs contiguous")

    kv = backend.allocate_kv(model.kv_layout(), NB, BS)
    stepwise, start = [], 0
    for n in (5, 8, 1, 7, 1):  # chunked prefill, then decodes reading the cached K/V
        chunk = ids[start : start + n]
        if not chunk:
            break
        b = Batch.build([(chunk, start, scattered)], BS, list(range(len(chunk))))
        stepwise.append(np.asarray(backend.forward(model, b, kv)))
        start += len(chunk)
    _close(np.concatenate(stepwise), contiguous, atol, f"{arch}: chunked vs full")


def check_lowering_equals_op_by_op(
    backend_name: str,
    arch: str,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
) -> str | None:
    """The backend's fast form of a model (its lowering, `lower=True`) gives the logits of the
    model file run op by op on the same backend (`lower=False`), and in float32 greedy tokens
    that are the op-by-op argmax at every step (up to the logits tolerance at near-ties). Returns the name of the lowering that ran (None: the model has none there).

    Skips (pytest.skip) a backend whose constructor takes no `lower` argument."""
    import inspect

    import pytest

    from ..backends import create_backend, get_backend_class

    cls = get_backend_class(backend_name)
    if "lower" not in inspect.signature(cls.__init__).parameters:
        pytest.skip(f"backend {backend_name!r} takes no `lower` argument: one way to run a model")
    ckpt = tiny_checkpoint(arch, seed)
    lowered, op_by_op = (
        create_backend(backend_name, device=device, dtype=dtype, lower=lower)
        for lower in (True, False)
    )
    for b in (lowered, op_by_op):
        assert callable(getattr(b, "lowering", None)), f"{backend_name}: no lowering(model) method"
    name = lowered.lowering(build_model(ckpt.config, ckpt.tensors, lowered.ops))
    off = op_by_op.lowering(build_model(ckpt.config, ckpt.tensors, op_by_op.ops))
    assert off is None, f"{backend_name} lower=False still lowers {arch} ({off!r})"
    print(f"{backend_name}: {arch} runs as {name or 'op by op'}")
    for ids in _prompts(seed + 6, lengths=(29, 11)):
        want = _engine(ckpt, op_by_op).logits(ids)  # (T, V)
        got = _engine(ckpt, lowered).logits(ids)
        what = f"{arch} logits, {backend_name} lowering {name!r} vs op by op"
        _close(np.asarray(got), np.asarray(want), _logits_atol(lowered, want, arch), what)
    if _dtype(lowered) == "float32":
        # the lowering's greedy tokens are the op-by-op argmax along their own path, up to the
        # logits tolerance at near-ties (two int8 routes to one model may flip one of those)
        prompts = _prompts(seed + 7)
        got_ids = _greedy(_engine(ckpt, lowered), prompts, 8)
        _assert_argmax_steps(_engine(ckpt, op_by_op), prompts, got_ids,
                             lambda logits: _logits_atol(lowered, logits, arch),
                             f"{arch}: greedy with lowering {name!r} vs op by op")  # fmt: skip
    return name
