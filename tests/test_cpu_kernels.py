"""Every native kernel (ext/kernels.pyx) against its NumPy reference, one fixture for both.

The `ops` fixture yields the reference NumpyOps and, when the extension is built, the cpu
backend's CpuOps; each test compares `ops` against the reference on seeded random inputs with odd
sizes, sizes that are not multiples of the SIMD width or the KV block size, extreme values,
fragmented block tables, sliding windows and GQA / MQA head layouts.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tinyserve.backends.numpy_ops import NumpyOps
from tinyserve.batch import Batch
from tinyserve.sampling import SamplingParams
from tinyserve.settings import settings

REF = NumpyOps()


def _cpu_ops():
    from tinyserve.backends.cpu import CpuBackend

    ok, reason = CpuBackend.availability()
    if not ok:
        pytest.skip(reason)
    return CpuBackend(num_threads=2).ops


@pytest.fixture(params=["numpy", "cpu"])
def ops(request):
    return REF if request.param == "numpy" else _cpu_ops()


@pytest.fixture
def kernels():
    _cpu_ops()
    from tinyserve._ext import kernels

    return kernels


def test_extension_loaded_unless_pure_python():
    """CI runs the suite twice: once asserting the extension is active, once without it."""
    from tinyserve.backends.cpu import CpuBackend

    ok, reason = CpuBackend.availability()
    if settings().pure_python:
        assert not ok and "TINYSERVE_PURE_PYTHON" in reason
    elif settings().require_native:
        assert ok, reason


@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 64), (7, 289), (2, 1, 1)])
def test_rms_norm(ops, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    w = rng.standard_normal(shape[-1], dtype=np.float32)
    np.testing.assert_allclose(
        ops.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6
    )


def test_rms_norm_extreme_values(ops):
    x = np.array([[1e18, -1e18, 3e17], [1e-20, 0.0, -1e-20], [0.0, 0.0, 0.0]], dtype=np.float32)
    w = np.array([1.0, 2.0, -0.5], dtype=np.float32)
    np.testing.assert_allclose(
        ops.rms_norm(x, w, 1e-5), REF.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize(
    "n, h, dh, rot", [(1, 9, 64, 64), (5, 3, 64, 64), (7, 2, 48, 32), (4, 1, 10, 6)]
)
def test_rope(ops, n, h, dh, rot):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, h, dh), dtype=np.float32)
    positions = rng.integers(0, 40000, n)  # large positions: f64 angles matter
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)
    got = ops.rope(x, positions, inv_freq)
    np.testing.assert_allclose(got, REF.rope(x, positions, inv_freq), rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(got[..., rot:], x[..., rot:])  # partial rotary passes the rest


@pytest.mark.parametrize("shape", [(1, 1536), (3, 77), (2, 5)])
def test_silu_mul(ops, shape):
    rng = np.random.default_rng(2)
    gate = rng.standard_normal(shape, dtype=np.float32) * 30  # saturating both ends of the sigmoid
    up = rng.standard_normal(shape, dtype=np.float32)
    np.testing.assert_allclose(ops.silu_mul(gate, up), REF.silu_mul(gate, up), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 2048), (3, 77), (2, 5)])
def test_gelu_tanh_mul(ops, shape):
    rng = np.random.default_rng(5)
    gate = rng.standard_normal(shape, dtype=np.float32) * 6  # both tails of the tanh, and its middle
    up = rng.standard_normal(shape, dtype=np.float32)
    np.testing.assert_allclose(
        ops.gelu_tanh_mul(gate, up), REF.gelu_tanh_mul(gate, up), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("shape", [(1, 7), (4, 3, 129), (2, 49152)])
def test_softmax(ops, shape):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape, dtype=np.float32) * 50
    x.reshape(-1, shape[-1])[0, 0] = -np.inf  # a masked entry
    np.testing.assert_allclose(ops.softmax(x), REF.softmax(x), rtol=1e-5, atol=1e-7)


def test_write_kv_fragmented_slots(ops):
    rng = np.random.default_rng(4)
    pool, want = np.zeros((6, 4, 3, 5), np.float32), np.zeros((6, 4, 3, 5), np.float32)
    x = rng.standard_normal((9, 3, 5), dtype=np.float32)
    slots = rng.permutation(24)[:9]
    ops.write_kv(pool, x, slots)
    REF.write_kv(want, x, slots)
    np.testing.assert_array_equal(pool, want)


def test_write_kv_rejects_bad_slot(kernels):
    pool = np.zeros((2, 4, 1, 8), np.float32)
    with pytest.raises(IndexError, match="slot out of range"):
        kernels.write_kv(pool, np.ones((1, 1, 8), np.float32), np.array([8]))


def _paged_case(rng, chunks_spec, H, KVH, Dh, BS, NB=64):
    """Sequences (n_new, n_cached) over a shuffled (fragmented) pool, K/V filled at random."""
    k_pool = rng.standard_normal((NB, BS, KVH, Dh), dtype=np.float32)
    v_pool = rng.standard_normal((NB, BS, KVH, Dh), dtype=np.float32)
    free = list(rng.permutation(NB))
    chunks = []
    for n_new, n_cached in chunks_spec:
        n_blocks = -(-(n_new + n_cached) // BS)
        table = [int(free.pop()) for _ in range(n_blocks)]
        chunks.append((list(range(n_new)), n_cached, table))
    batch = Batch.build(chunks, BS)
    q = rng.standard_normal((batch.n_tokens, H, Dh), dtype=np.float32) * 3
    return q, k_pool, v_pool, batch


@pytest.mark.parametrize(
    "spec, H, KVH, Dh, BS, window",
    [
        ([(1, 0)], 9, 3, 64, 16, None),  # first decode step
        ([(1, 130), (1, 16), (1, 5)], 9, 3, 64, 16, None),  # batched decode, GQA
        ([(23, 0)], 4, 1, 32, 16, None),  # prefill, MQA
        (
            [(7, 41), (19, 0), (1, 99)],
            6,
            2,
            24,
            8,
            None,
        ),  # prefill chunks over earlier chunks + decode
        ([(30, 10), (1, 77)], 4, 4, 16, 16, 8),  # sliding window, MHA
        ([(5, 3)], 8, 2, 64, 5, 3),  # block size 5, window 3
    ],
)
def test_paged_attention(ops, spec, H, KVH, Dh, BS, window):
    rng = np.random.default_rng(5)
    q, k_pool, v_pool, batch = _paged_case(rng, spec, H, KVH, Dh, BS)
    scale = 1.0 / np.sqrt(Dh)
    got = ops.paged_attention(q, k_pool, v_pool, batch, scale, window)
    want = REF.paged_attention(q, k_pool, v_pool, batch, scale, window)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize(
    "spec, H, KVH, Dh, BS, window",
    [
        ([(1, 300)], 9, 3, 64, 16, None),  # one long decode: keys split over the threads
        ([(1, 400)], 9, 3, 64, 16, 150),  # split inside a sliding window
        ([(1, 260)], 4, 1, 20, 16, None),  # head dim not a multiple of 8: the plain loops
    ],
)
def test_paged_attention_split_decode(kernels, threads, spec, H, KVH, Dh, BS, window):
    """Few tokens with long contexts: each token's keys are cut into pieces (flash-decoding)
    whose partial softmaxes are merged; the result is the reference's at any thread count."""
    rng = np.random.default_rng(8)
    q, k_pool, v_pool, batch = _paged_case(rng, spec, H, KVH, Dh, BS)
    old = kernels.get_num_threads()
    kernels.set_num_threads(threads)
    try:
        assert kernels._attn_spans(batch.n_tokens, KVH, int(batch.seq_lens.max())) > 1
        got = kernels.paged_attention(q, k_pool, v_pool, batch, 0.125, window)
    finally:
        kernels.set_num_threads(old)
    want = REF.paged_attention(q, k_pool, v_pool, batch, 0.125, window)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [None, 300])
def test_paged_attention_rows_do_not_depend_on_the_step(kernels, window):
    """A token's attention is the same bits alone (one decode: its keys split over the threads),
    beside other sequences (one item per token), as part of a prefill chunk, and at any thread
    count: its keys are cut at fixed positions and the pieces merged in order."""
    rng = np.random.default_rng(11)
    H, KVH, Dh, BS = 9, 3, 64, 16
    # sequence 0: 40 new tokens after 560 cached (its last token sees 600 keys: 3 pieces)
    spec = [(40, 560), (1, 90), (1, 300), (8, 20)]
    q, k_pool, v_pool, batch = _paged_case(rng, spec, H, KVH, Dh, BS, NB=72)
    table = batch.block_tables[0][: -(-600 // BS)].tolist()
    old = kernels.get_num_threads()
    got = {}
    try:
        for threads in (1, 2):
            kernels.set_num_threads(threads)
            got["batch", threads] = kernels.paged_attention(q, k_pool, v_pool, batch, 0.125, window)
            for i in (0, 39):  # the chunk's first and last token, each alone as a decode step
                one = Batch.build([([0], 560 + i, table)], BS)
                out = kernels.paged_attention(q[i : i + 1], k_pool, v_pool, one, 0.125, window)
                got["alone", threads, i] = out[0]
    finally:
        kernels.set_num_threads(old)
    np.testing.assert_array_equal(got["batch", 1], got["batch", 2])
    for i in (0, 39):
        for threads in (1, 2):
            np.testing.assert_array_equal(got["alone", threads, i], got["batch", 1][i])
    want = REF.paged_attention(q, k_pool, v_pool, batch, 0.125, window)
    np.testing.assert_allclose(got["batch", 1], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("isa", ["avx2", "vnni"])  # vnni and up: the AVX-512 score kernel
@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("G, Dh", [(1, 64), (2, 64), (4, 256), (3, 40)])
@pytest.mark.parametrize("window", [None, 37])
def test_prefill_tokens_attend_as_they_would_alone(kernels, isa, kv_dtype, G, Dh, window):
    """A prefill chunk's tokens attend in tiles of one sequence's tokens (each block of keys read
    once for the tile): every token's output is the bits it gets alone (a decode step, its keys
    split over the threads past one piece), at any thread count, and near the reference. Mixed
    lengths over earlier chunks, a block size that divides none of them, a decode in the step."""
    if isa not in kernels.available_isas():
        pytest.skip(f"this CPU has no {isa} level")
    rng = np.random.default_rng(12)
    KVH, BS = 2, 12
    spec = [(45, 0), (3, 20), (1, 50), (40, 290)]  # the last: keys past a piece cut (256)
    q, k_pool, v_pool, batch = _paged_case(rng, spec, G * KVH, KVH, Dh, BS, NB=72)
    k_pool, v_pool = k_pool.astype(kv_dtype), v_pool.astype(kv_dtype)
    assert kernels._attn_spans(batch.n_tokens, KVH, int(batch.seq_lens.max())) == 1
    old, old_isa = kernels.get_num_threads(), kernels.get_isa()
    kernels.set_isa(isa)
    try:
        got = {}
        for threads in (1, 2):
            kernels.set_num_threads(threads)
            got[threads] = kernels.paged_attention(q, k_pool, v_pool, batch, 0.125, window)
        alone = np.empty_like(got[1])
        for s, (n_new, n_cached) in enumerate(spec):
            table = batch.block_tables[s].tolist()
            for i in range(n_new):
                t = int(batch.query_start[s]) + i
                one = Batch.build([([0], n_cached + i, table)], BS)
                out = kernels.paged_attention(q[t : t + 1], k_pool, v_pool, one, 0.125, window)
                alone[t] = out[0]
    finally:
        kernels.set_num_threads(old)
        kernels.set_isa(old_isa)
    np.testing.assert_array_equal(got[1], got[2])
    np.testing.assert_array_equal(got[1], alone)
    k32, v32 = k_pool.astype(np.float32), v_pool.astype(np.float32)
    want = REF.paged_attention(q, k32, v32, batch, 0.125, window)
    np.testing.assert_allclose(got[1], want, rtol=1e-4, atol=1e-5)


def test_float16_pools_round_like_numpy_and_attend_like_float32(kernels):
    """A float16 KV cache: write_kv rounds as numpy's float16 cast does (nearest even, subnormals
    and overflow included), and attention over half pools equals attention over the same values
    widened to float32 (the split decode path included)."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((7, 3, 64)).astype(np.float32) * np.float32(1e3)
    x[0, 0, :4] = [1e-6, -3e-8, 7e4, -1e5]  # subnormal, underflow, overflow to +-inf
    pool = np.zeros((4, 4, 3, 64), np.float16)
    slots = rng.permutation(16)[:7]
    kernels.write_kv(pool, x, slots)
    want = np.zeros_like(pool)
    REF.write_kv(want, x.astype(np.float16), slots)
    np.testing.assert_array_equal(pool.view(np.uint16), want.view(np.uint16))
    # rows of 15 values: 7 of each row take the portable C conversion (ties to even included)
    x = rng.standard_normal((9, 3, 5)).astype(np.float32) * np.float32(3e4)
    x[0, 0] = [1 + 2.0**-11, 1 + 3 * 2.0**-11, 2.0**-25, 6.5e4, -7e-8]
    pool, want = np.zeros((4, 4, 3, 5), np.float16), np.zeros((4, 4, 3, 5), np.float16)
    slots = rng.permutation(16)[:9]
    kernels.write_kv(pool, x, slots)
    REF.write_kv(want, x.astype(np.float16), slots)
    np.testing.assert_array_equal(pool.view(np.uint16), want.view(np.uint16))

    for spec in ([(1, 300)], [(5, 40), (1, 99)]):
        q, k_pool, v_pool, batch = _paged_case(rng, spec, 9, 3, 64, 16)
        k16, v16 = k_pool.astype(np.float16), v_pool.astype(np.float16)
        got = kernels.paged_attention(q, k16, v16, batch, 0.125)
        want = REF.paged_attention(q, k16.astype(np.float32), v16.astype(np.float32), batch, 0.125)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.paged_attention(q, k16, v_pool, batch, 0.125)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "spec, H, KVH, Dh, BS, window",
    [
        ([(150, 0)], 4, 1, 64, 16, None),  # a prefill: tiles of sgemm, the last one short
        ([(70, 45), (1, 30), (33, 0), (31, 5)], 9, 3, 32, 16, None),  # mixed with decodes and a
        # run one token short of the sgemm path
        ([(130, 20), (2, 60)], 4, 2, 24, 8, 37),  # sliding window cutting through the tiles
        ([(64, 0)], 8, 8, 40, 5, 1),  # window 1: each query sees itself only
    ],
)
def test_paged_attention_prefill_through_sgemm(kernels, threads, spec, H, KVH, Dh, BS, window):
    """Runs of >= 32 new tokens of one sequence attend through sgemm (scores and values as two
    matrix products per tile), the other tokens per token: both equal the reference."""
    rng = np.random.default_rng(10)
    q, k_pool, v_pool, batch = _paged_case(rng, spec, H, KVH, Dh, BS, NB=96)
    old = kernels.get_num_threads()
    kernels.set_num_threads(threads)
    try:
        got = kernels.paged_attention(q, k_pool, v_pool, batch, 0.125, window)
    finally:
        kernels.set_num_threads(old)
    want = REF.paged_attention(q, k_pool, v_pool, batch, 0.125, window)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_paged_attention_equals_dense_causal_attention(ops):
    """A second route: the same tokens attended densely with a plain causal mask."""
    rng = np.random.default_rng(6)
    T, H, Dh, BS = 21, 2, 8, 4
    q, k_pool, v_pool, batch = _paged_case(rng, [(T, 0)], H, H, Dh, BS)
    table = batch.block_tables[0, : -(-T // BS)]
    k = k_pool[table].reshape(-1, H, Dh)[:T]  # (T, H, Dh)
    v = v_pool[table].reshape(-1, H, Dh)[:T]
    scores = np.einsum("thd,chd->htc", q, k) / np.sqrt(Dh) + np.triu(np.full((T, T), -np.inf), 1)
    want = np.einsum("htc,chd->thd", REF.softmax(scores), v)
    got = ops.paged_attention(q, k_pool, v_pool, batch, 1.0 / np.sqrt(Dh))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_new, n_cached", [(1, 40), (40, 9)])  # decode, and prefill via sgemm
def test_paged_attention_values_as_a_view_of_the_keys(kernels, n_new, n_cached):
    """MLA attends one latent head whose values are the key rows after their rope dims: a strided
    view into the key pool, read in place through its strides, equal to the reference."""
    rng = np.random.default_rng(11)
    dr, r = 8, 24
    q, pool, _, batch = _paged_case(rng, [(n_new, n_cached)], 4, 1, dr + r, 16)
    values = pool[..., dr:]  # (NB, BS, 1, r) strided
    assert not values.flags.c_contiguous
    got = kernels.paged_attention(q, pool, values, batch, 0.2)
    want = REF.paged_attention(q, pool, values, batch, 0.2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_paged_attention_extreme_scores(ops):
    """Huge logits: the online softmax must rescale without overflow."""
    rng = np.random.default_rng(7)
    q, k_pool, v_pool, batch = _paged_case(rng, [(3, 40)], 2, 1, 16, 16)
    q *= 400.0
    got = ops.paged_attention(q, k_pool, v_pool, batch, 0.25)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(
        got, REF.paged_attention(q, k_pool, v_pool, batch, 0.25), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=50),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=1.3, top_k=1000, top_p=0.5, min_p=0.05),
        SamplingParams(temperature=0.5, top_k=1),
        SamplingParams(temperature=2.0, top_p=1e-6),
        SamplingParams(temperature=1.0, min_p=0.3),
    ],
)
def test_filtered_probs(kernels, params):
    from tinyserve import sampling

    rng = np.random.default_rng(8)
    logits = rng.standard_normal(4099) * 4
    logits[::7] = logits[3]  # ties: the stable order decides who survives top-p / top-k
    want = sampling.filtered_probs_reference(logits, params)
    got = kernels.filtered_probs(logits, params)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got > 0, want > 0)


def test_sampling_uses_the_twin_unless_pure_python(kernels):
    from tinyserve import sampling

    assert sampling.filtered_probs is kernels.filtered_probs


def test_importing_the_kernels_leaves_the_environment_alone():
    """libgomp gets OMP_WAIT_POLICY=PASSIVE when it loads, but processes started afterwards must
    not inherit it (it made llama.cpp 3.6x slower per token beside us)."""
    import subprocess
    import sys

    code = (
        "import os; os.environ.pop('OMP_WAIT_POLICY', None); import tinyserve, tinyserve._ext; "
        "print('OMP_WAIT_POLICY' in os.environ)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert r.stdout.strip() == "False"
