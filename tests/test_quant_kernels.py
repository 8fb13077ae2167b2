"""Quantized matmul kernels (ext/quant.pxi in tinyserve._ext.kernels) against the NumPy reference.

Reference: QuantTensor.dequantize (tinyserve/loading/gguf_file.py, itself checked against gguf-py)
and x @ W.T in float64. The kernels quantize each activation row to int8 blocks (32 values for
the legacy types, 256 for K-quants) with d = max|x_block| / 127, so each activation carries a
rounding error of at most d/2: the kernel's result must lie within
sum_blocks (d_b / 2) * sum_{i in b} |W_i| of the reference (plus float32 accumulation slack), its
relative Frobenius error must be ~1/127/sqrt(12) of the block range (asserted < 1e-2), and
activations that are exactly representable as int8 blocks must give the reference up to float32
rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve.loading.gguf_file import QuantTensor

quant = pytest.importorskip(  # the quantized matmuls live in the one native module
    "tinyserve._ext.kernels",
    reason="native kernels not built (pip install -e . --no-build-isolation)",
)

LEGACY = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # blocks of 32, gguf.quants can quantize these
K_QUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]  # super-blocks of 256, built from random bytes
ALL = LEGACY + K_QUANTS
# byte offsets of each block's f16 fields (ggml-common.h): random bytes there could be inf/nan
F16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}  # fmt: skip


def random_blocks(qtype, rows, cols, rng, scale=1.0):
    """(rows, bytes_per_row) uint8 of random blocks whose f16 fields are finite."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_size
    data = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        f16 = np.clip(rng.standard_normal(n_blocks) * scale, -65504, 65504).astype(np.float16)
        data[:, off : off + 2] = f16.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


def weight(qtype, rows, cols, rng, scale=1.0) -> QuantTensor:
    """A QuantTensor: quantized from Gaussian floats where gguf can, else random blocks."""
    if qtype in LEGACY:
        w = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        data = quantize(w, qtype)
    else:
        data = random_blocks(qtype, rows, cols, rng, scale)
        if qtype in (Q.Q4_K, Q.Q5_K):
            center_k_blocks(data, qtype)
    return QuantTensor(qtype, (rows, cols), data)


def center_k_blocks(data, qtype):
    """Q4_K/Q5_K blocks made zero-mean like real ones: min_j = scale_j, dmin = d * mid-level.

    Random bytes give each sub-block an offset (dmin * m_j) unrelated to its spread, so x @ W.T
    becomes a small difference of large terms and no relative error bound is meaningful."""
    blocks = data.reshape(-1, GGML_QUANT_SIZES[qtype][1])  # a view: edits land in data
    s = blocks[:, 4:16]
    s[:, 4:8] = s[:, 0:4]  # low 6 bits (and the top 2 bits for j + 4) of mins = scales
    s[:, 8:12] = (s[:, 8:12] & 0x0F) * 17  # high nibble (mins j + 4) = low nibble (scales)
    d = np.abs(blocks[:, 0:2].copy().view(np.float16).astype(np.float32))
    blocks[:, 0:2] = d.astype(np.float16).view(np.uint8)
    mid = 7.5 if qtype == Q.Q4_K else 15.5
    blocks[:, 2:4] = (d * mid).astype(np.float16).view(np.uint8)


def reference(x, qt: QuantTensor) -> np.ndarray:
    """(N, K), QuantTensor (M, K) -> (N, M) float64 = x @ W.T from the NumPy dequantizer."""
    return x.astype(np.float64) @ qt.dequantize().astype(np.float64).T


def rounding_bound(x, qt: QuantTensor) -> np.ndarray:
    """(N, M): the most the int8 rounding of x can move x @ W.T, plus float32 slack.

    Activations share one scale per 32 values for the legacy types (llama.cpp's Q8_0) and per
    256 for K-quants (Q8_K)."""
    n, k = x.shape
    qk = 256 if qt.qtype in K_QUANTS else 32
    w = np.abs(qt.dequantize().astype(np.float64))  # (M, K)
    d = np.abs(x.astype(np.float64)).reshape(n, k // qk, qk).max(axis=2) / 127  # (N, K/qk)
    w_blocks = w.reshape(w.shape[0], k // qk, qk).sum(axis=2)  # (M, K/qk)
    return 0.5 * 1.001 * d @ w_blocks.T + 1e-5 * np.abs(x.astype(np.float64)) @ w.T


def cols_for(qtype) -> list[int]:
    """K values: 352 = 11 blocks walks the 8-block, 2-block and 1-block loops of the kernels."""
    return [96, 160, 352] if qtype in LEGACY else [256, 512]


@pytest.fixture(autouse=True)
def integer_path():
    """The integer kernels everywhere (big batches would otherwise go to sgemm); the sgemm route
    has its own tests below, which switch it on."""
    before = quant.get_blas_min_rows()
    quant.set_blas_min_rows(0)
    yield
    quant.set_blas_min_rows(before)


# The bf16 level runs VNNI's int8 and f32-weight kernels (tests/test_bf16_kernels.py checks the
# bits) and its own bf16 tile (tested there): not run again here.
ISAS = [name for name in quant.available_isas() if name != "bf16"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Each implementation this CPU runs (scalar, avx2, vnni): all must meet the reference."""
    before = quant.get_isa()
    quant.set_isa(request.param)
    yield request.param
    quant.set_isa(before)


@pytest.fixture(params=[1, 2])
def threads(request):
    before = quant.get_num_threads()
    quant.set_num_threads(request.param)
    yield request.param
    quant.set_num_threads(before)


# -- matmul_q vs the reference -----------------------------------------------------------------


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
@pytest.mark.parametrize("n", [1, 3, 17])
def test_matmul_within_rounding_bound(qtype, n, isa, threads):
    for cols in cols_for(qtype):
        rng = np.random.default_rng(int(qtype) * 100 + n + cols)
        qt = weight(qtype, 37, cols, rng)  # odd M
        x = rng.standard_normal((n, cols)).astype(np.float32)
        got = quant.matmul_q(x, qt.data, int(qtype), cols)
        assert got.dtype == np.float32 and got.shape == (n, 37)
        ref = reference(x, qt)
        assert np.all(np.abs(got - ref) <= rounding_bound(x, qt))
        assert np.linalg.norm(got - ref) <= 1e-2 * np.linalg.norm(ref)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    qtype=st.sampled_from(ALL),
    n=st.integers(1, 20),
    m=st.integers(1, 70),
    blocks=st.integers(1, 12),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_shape_within_rounding_bound(qtype, n, m, blocks, threads, seed):
    # shapes the hand-picked cases miss: every tile remainder, task split and block-loop tail
    cols = blocks * GGML_QUANT_SIZES[qtype][0]
    rng = np.random.default_rng(seed)
    qt = QuantTensor(qtype, (m, cols), random_blocks(qtype, m, cols, rng))
    x = (rng.standard_normal((n, cols)) * rng.uniform(0.01, 100)).astype(np.float32)
    before = quant.get_num_threads()
    quant.set_num_threads(threads)
    try:
        got = quant.matmul_q(x, qt.data, int(qtype), cols)
    finally:
        quant.set_num_threads(before)
    assert np.all(np.abs(got - reference(x, qt)) <= rounding_bound(x, qt))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_int8_representable_x_is_exact(qtype, isa):
    # x = q / 8 with q int8 and a +-127 in every block: d = 1/8 exactly, no rounding error left
    rng = np.random.default_rng(int(qtype))
    cols = cols_for(qtype)[-1]
    qt = weight(qtype, 37, cols, rng)
    q = rng.integers(-127, 128, (5, cols))
    q[:, ::32] = rng.choice([-127, 127], (5, cols // 32))
    x = (q / 8).astype(np.float32)
    got = quant.matmul_q(x, qt.data, int(qtype), cols)
    ref = reference(x, qt)
    slack = 2e-6 * np.abs(x.astype(np.float64)) @ np.abs(qt.dequantize().astype(np.float64)).T
    assert np.all(np.abs(got - ref) <= slack)  # ~1e4 times tighter than the rounding bound


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
@pytest.mark.parametrize("w_scale,x_scale", [(6e4, 1.0), (1e-7, 1e3), (1.0, 1e-30), (1.0, 3e4)])
def test_extreme_scales(qtype, w_scale, x_scale, isa):
    # f16 scales near the top of the range, f16 subnormal scales, tiny and large activations
    rng = np.random.default_rng(int(qtype) * 1000 + int(np.log10(w_scale)) + 10)
    cols = cols_for(qtype)[0]
    qt = QuantTensor(qtype, (9, cols), random_blocks(qtype, 9, cols, rng, w_scale))
    x = (rng.standard_normal((3, cols)) * x_scale).astype(np.float32)
    got = quant.matmul_q(x, qt.data, int(qtype), cols)
    ref = reference(x, qt)
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got - ref) <= rounding_bound(x, qt))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_zero_rows_give_exact_zeros(qtype, isa):
    rng = np.random.default_rng(3)
    cols = cols_for(qtype)[0]
    data = random_blocks(qtype, 6, cols, rng)
    data[2] = 0  # an all-zero weight row (d = m = 0)
    x = rng.standard_normal((4, cols)).astype(np.float32)
    x[1] = 0.0  # an all-zero activation row (d = 0: q must be 0, not nan)
    got = quant.matmul_q(x, data, int(qtype), cols)
    assert np.all(got[:, 2] == 0) and np.all(got[1] == 0)
    assert np.count_nonzero(got) == 3 * 5


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_nan_and_inf_activations_propagate(qtype, isa):
    # the int8 rounding must not turn a nan/inf row into finite numbers
    rng = np.random.default_rng(4)
    cols = cols_for(qtype)[0]
    qt = weight(qtype, 5, cols, rng)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    x[0, 7], x[2, -1] = np.nan, np.inf
    got = quant.matmul_q(x, qt.data, int(qtype), cols)
    assert np.all(np.isnan(got[0])) and np.all(np.isnan(got[2]))
    assert np.all(np.abs(got[1] - reference(x[1:2], qt)[0]) <= rounding_bound(x[1:2], qt)[0])


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_implementations_agree(qtype):
    # same integer dot products on every ISA: only the float summation order may differ
    rng = np.random.default_rng(int(qtype) + 50)
    cols = cols_for(qtype)[-1]
    qt = weight(qtype, 23, cols, rng)
    x = rng.standard_normal((7, cols)).astype(np.float32)
    before = quant.get_isa()
    try:
        outs = []
        for name in quant.available_isas():
            quant.set_isa(name)
            outs.append(quant.matmul_q(x, qt.data, int(qtype), cols))
    finally:
        quant.set_isa(before)
    scale = np.abs(x) @ np.abs(qt.dequantize()).T
    for other in outs[1:]:
        assert np.all(np.abs(other - outs[0]) <= 1e-5 * scale)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_batched_equals_alone_and_threads_agree(qtype, isa):
    """Batch invariance: each output is summed in one fixed order whatever the row count (1, 7,
    64, 65, 512: the matvec, ragged tiles, one and several 64-row tasks), tile or thread count."""
    rng = np.random.default_rng(7)
    cols = 512
    qt = weight(qtype, 301, cols, rng)  # big enough for the parallel path
    x = rng.standard_normal((512, cols)).astype(np.float32)
    before = quant.get_num_threads()
    try:
        quant.set_num_threads(1)
        alone = np.concatenate([quant.matmul_q(x[i : i + 1], qt.data, int(qtype), cols)
                                for i in range(len(x))])  # fmt: skip
        quant.set_num_threads(2)
        for n in (1, 7, 64, 65, 512):
            np.testing.assert_array_equal(
                quant.matmul_q(x[:n], qt.data, int(qtype), cols), alone[:n]
            )
    finally:
        quant.set_num_threads(before)


@pytest.mark.parametrize("kind", ["f32", "bf16"])
def test_float_weights_batched_equal_alone(kind, isa):
    """The float-weight kernels are row invariant too (BLAS is not: sgemv at one row)."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((203, 200)).astype(np.float32)  # 200: a tail after the 8/16 lanes
    x = rng.standard_normal((70, 200)).astype(np.float32)
    if kind == "f32":
        run = lambda rows: quant.matmul_f32(rows, w)
    else:
        bits = (w.view(np.uint32) >> 16).astype(np.uint16)
        run = lambda rows: quant.matmul_bf16(rows, bits)
    before = quant.get_num_threads()
    try:
        quant.set_num_threads(2)
        many = run(x)
        quant.set_num_threads(1)
        for i in (0, 3, 69):
            np.testing.assert_array_equal(run(x[i : i + 1]), many[i : i + 1])
    finally:
        quant.set_num_threads(before)
    if kind == "f32":
        np.testing.assert_allclose(many, x @ w.T, rtol=1e-4, atol=1e-4)


def test_out_buffer_reused_and_strided_rows_read_in_place(tmp_path):
    rng = np.random.default_rng(11)
    qt = weight(Q.Q4_1, 40, 96, rng)
    path = tmp_path / "w.bin"
    padded = np.zeros((40, 64), np.uint8)  # rows with a stride wider than their 60 bytes
    padded[:, : qt.data.shape[1]] = qt.data
    padded.tofile(path)
    mm = np.memmap(path, np.uint8, "r", shape=(40, 64))[:, :60]
    wide = rng.standard_normal((3, 128)).astype(np.float32)
    x = wide[:, 16:112]  # rows strided: read in place, no copy
    out = np.full((3, 40), np.nan, np.float32)
    got = quant.matmul_q(x, mm, int(Q.Q4_1), 96, out)
    assert got is out
    np.testing.assert_array_equal(out, quant.matmul_q(x.copy(), qt.data, int(Q.Q4_1), 96))
    bits = (rng.standard_normal((40, 96)).astype(np.float32).view(np.uint32) >> 16).astype(
        np.uint16
    )
    np.testing.assert_array_equal(quant.matmul_bf16(x, bits), quant.matmul_bf16(x.copy(), bits))


# -- dequantize_rows and matmul_bf16 -----------------------------------------------------------


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
@pytest.mark.parametrize("scale", [1.0, 6e4, 1e-7])
def test_dequantize_rows_matches_numpy(qtype, scale):
    rng = np.random.default_rng(int(qtype) + 9)
    cols = cols_for(qtype)[-1]
    qt = QuantTensor(qtype, (11, cols), random_blocks(qtype, 11, cols, rng, scale))
    ids = [10, 0, 3, 3]
    got = quant.dequantize_rows(qt.data, int(qtype), cols, np.array(ids))
    np.testing.assert_array_equal(got, qt.dequantize_rows(ids))


@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("cols", [100, 120, 576])  # tails after the 16- and 8-wide loops
def test_matmul_bf16_matches_reference(n, cols, isa, threads):
    rng = np.random.default_rng(n + cols)
    w = rng.standard_normal((37, cols)).astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bf16
    w_bf16 = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    got = quant.matmul_bf16(x, bits)
    ref = x.astype(np.float64) @ w_bf16.T
    assert np.all(np.abs(got - ref) <= 1e-5 * np.abs(x.astype(np.float64)) @ np.abs(w_bf16).T)


# -- real weights ------------------------------------------------------------------------------


def test_default_model_head_and_ffn():
    from tests.conftest import default_model_gguf
    from tinyserve.loading import load_checkpoint

    tensors = load_checkpoint(default_model_gguf()).tensors
    rng = np.random.default_rng(0)
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
        qt = tensors[name]
        rows = min(1000, qt.shape[0])
        sub = QuantTensor(qt.qtype, (rows, qt.shape[1]), qt.data[:rows])  # a view of the mmap
        x = rng.standard_normal((2, qt.shape[1])).astype(np.float32)
        got = quant.matmul_q(x, sub.data, int(qt.qtype), qt.shape[1])
        ref = reference(x, sub)
        assert np.all(np.abs(got - ref) <= rounding_bound(x, sub))
        assert np.linalg.norm(got - ref) <= 1e-2 * np.linalg.norm(ref)


# -- bad input -------------------------------------------------------------------------------


def test_bad_input_raises_clear_value_errors():
    rng = np.random.default_rng(0)
    data = random_blocks(Q.Q8_0, 4, 64, rng)  # (4, 68)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="not supported"):
        quant.matmul_q(x, data, int(Q.Q2_K), 64)
    with pytest.raises(ValueError, match="not supported"):
        quant.matmul_q(x, data, 99, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.matmul_q(x, data, int(Q.Q8_0), 60)
    with pytest.raises(ValueError, match="take 34 bytes, but data rows have 68"):
        quant.matmul_q(x[:, :32].copy(), data, int(Q.Q8_0), 32)
    with pytest.raises(ValueError, match="float32"):
        quant.matmul_q(x.astype(np.float64), data, int(Q.Q8_0), 64)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        quant.matmul_q(np.asfortranarray(x), data, int(Q.Q8_0), 64)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        quant.matmul_q(np.repeat(x, 2, axis=1)[:, ::2], data, int(Q.Q8_0), 64)
    with pytest.raises(ValueError, match="x has 32 columns"):
        quant.matmul_q(np.zeros((2, 32), np.float32), data, int(Q.Q8_0), 64)
    with pytest.raises(ValueError, match="uint8"):
        quant.matmul_q(x, data.view(np.int8), int(Q.Q8_0), 64)
    with pytest.raises(ValueError, match="shape"):
        quant.matmul_q(x, data, int(Q.Q8_0), 64, out=np.empty((2, 5), np.float32))
    with pytest.raises(ValueError, match="out of range"):
        quant.dequantize_rows(data, int(Q.Q8_0), 64, [0, 4])
    with pytest.raises(ValueError, match="uint16"):
        quant.matmul_bf16(x, np.zeros((3, 64), np.float32))
    with pytest.raises(TypeError):
        quant.matmul_q(None, data, int(Q.Q8_0), 64)
    with pytest.raises(TypeError):
        quant.matmul_q(x.tolist(), data, int(Q.Q8_0), 64)
    with pytest.raises(ValueError, match=">= 1"):
        quant.set_num_threads(0)
    with pytest.raises(ValueError, match="not available"):
        quant.set_isa("neon")


def test_thread_count_from_environment():
    def threads_in_child(env):
        code = "from tinyserve._ext import kernels; print(kernels.get_num_threads())"
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
        )
        return run.stdout.strip() or run.stderr

    env = {k: v for k, v in os.environ.items() if k != "TINYSERVE_NUM_THREADS"}
    assert threads_in_child(dict(env, TINYSERVE_NUM_THREADS="3")) == "3"
    assert threads_in_child(env) == str(os.cpu_count())
    bad = threads_in_child(dict(env, TINYSERVE_NUM_THREADS="0"))
    assert "ConfigError: TINYSERVE_NUM_THREADS must be a positive integer, got '0'" in bad


# -- large batches: dequantize + BLAS sgemm ------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_sgemm_route_matches_float_reference(qtype, threads):
    # from the threshold on, float activations times the dequantized weight: float32 rounding
    # only, no int8 activation error (and the rows below the threshold keep the integer tiles)
    if not quant.set_blas_min_rows(16):
        pytest.skip("no cblas_sgemm loaded in this process")
    rng = np.random.default_rng(int(qtype) + 90)
    cols = cols_for(qtype)[-1]
    qt = weight(qtype, 77, cols, rng)
    x = rng.standard_normal((40, cols)).astype(np.float32)
    got = quant.matmul_q(x, qt.data, int(qtype), cols)
    want = reference(x, qt)
    scale = np.abs(x.astype(np.float64)) @ np.abs(qt.dequantize().astype(np.float64)).T
    assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-30)
    small = quant.matmul_q(x[:15].copy(), qt.data, int(qtype), cols)  # below: integer tiles
    assert np.all(np.abs(small - want[:15]) <= rounding_bound(x[:15], qt))
    assert not np.array_equal(small, got[:15])  # a different route, not the same numbers


def test_sgemm_route_strided_rows_and_out_buffer():
    if not quant.set_blas_min_rows(4):
        pytest.skip("no cblas_sgemm loaded in this process")
    rng = np.random.default_rng(12)
    qt = weight(Q.Q4_0, 33, 64, rng)
    wide = rng.standard_normal((9, 100)).astype(np.float32)
    x = wide[:, 10:74]  # (9, 64) rows 100 floats apart, read in place
    out = np.full((9, 33), np.nan, dtype=np.float32)
    assert quant.matmul_q(x, qt.data, int(Q.Q4_0), 64, out) is out
    np.testing.assert_allclose(out, reference(np.ascontiguousarray(x), qt), rtol=1e-4, atol=1e-4)


def test_sgemm_per_thread_panels_match_one_sgemm(threads):
    # each pool thread's single-threaded sgemm over its own weight panels (uneven last panel)
    # vs one sgemm over the whole dequantized weight: the same products, float rounding apart
    before = quant.get_blas_min_rows()
    if not quant.set_blas_min_rows(8, per_thread=True) or not quant.blas_per_thread():
        quant.set_blas_min_rows(before)
        pytest.skip("no BLAS with a per-thread thread count loaded in this process")
    rng = np.random.default_rng(31)
    qt = weight(Q.Q4_1, 601, 64, rng)
    x = rng.standard_normal((70, 64)).astype(np.float32)
    blas_threads = _blas_threads()
    panels = quant.matmul_q(x, qt.data, int(Q.Q4_1), 64)
    assert _blas_threads() == blas_threads  # BLAS's own thread count is restored afterwards
    quant.set_blas_min_rows(8, per_thread=False)
    whole = quant.matmul_q(x, qt.data, int(Q.Q4_1), 64)
    quant.set_blas_min_rows(before)
    np.testing.assert_allclose(panels, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(panels, reference(x, qt), rtol=1e-4, atol=1e-4)


def _blas_threads() -> list[int]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [d["num_threads"] for d in threadpool_info() if d.get("user_api") == "blas"]


def test_blas_threshold_is_checked():
    with pytest.raises(ValueError, match="threshold"):
        quant.set_blas_min_rows(-1)
    quant.set_blas_min_rows(0)
    assert quant.get_blas_min_rows() == 0


def test_thread_pool_many_jobs_any_thread_count():
    # ext/pool.h under churn: hundreds of back-to-back jobs of every size (1 task .. many), thread
    # counts above the core count (workers that start late find their share taken over) and
    # changing between calls; every result equals the one-thread result bit for bit
    rng = np.random.default_rng(12)
    cols = 256
    qt = weight(Q.Q4_1, 300, cols, rng)
    xs = [rng.standard_normal((n, cols)).astype(np.float32) for n in (1, 2, 9, 70)]
    before = quant.get_num_threads()
    try:
        quant.set_num_threads(1)
        want = [quant.matmul_q(x, qt.data, int(Q.Q4_1), cols) for x in xs]
        for i in range(400):
            quant.set_num_threads(1 + i % 5)
            j = i % len(xs)
            got = quant.matmul_q(xs[j], qt.data, int(Q.Q4_1), cols)
            np.testing.assert_array_equal(got, want[j])
    finally:
        quant.set_num_threads(before)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("n", [1, 16, 70])
def test_argmax_equals_argmax_of_the_integer_path(qtype, n, isa, threads):
    # the greedy head: ids equal numpy's argmax of matmul_q's integer-path outputs, ties included
    rng = np.random.default_rng(13 + n)
    cols = 256
    qt = weight(qtype, 1000, cols, rng)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    dup = qt.data.copy()
    dup[777] = dup[123]  # an exact tie: the first index wins
    before = quant.get_blas_min_rows()
    try:
        quant.set_blas_min_rows(0)  # the integer path at every n, as matmul_q_argmax
        for data in (qt.data, dup):
            want = quant.matmul_q(x, data, int(qtype), cols).argmax(axis=1)
            np.testing.assert_array_equal(quant.matmul_q_argmax(x, data, int(qtype), cols), want)
    finally:
        quant.set_blas_min_rows(before)
    x[0] = 0.0  # every output of row 0 is 0: index 0
    assert quant.matmul_q_argmax(x, qt.data, int(qtype), cols)[0] == 0


def test_two_python_threads_in_the_kernels_at_once():
    # the pool has one owner at a time: a second Python thread inside a kernel meanwhile runs its
    # tasks itself (scratch of its own); both get the one-thread results, bit for bit
    import threading

    rng = np.random.default_rng(14)
    cols = 512
    qt = weight(Q.Q4_1, 600, cols, rng)
    xs = [rng.standard_normal((n, cols)).astype(np.float32) for n in (1, 5, 33)]
    before = quant.get_num_threads()
    try:
        quant.set_num_threads(1)
        want = [quant.matmul_q(x, qt.data, int(Q.Q4_1), cols) for x in xs]
        quant.set_num_threads(3)
        errors = []

        def hammer(seed):
            for i in range(150):
                j = (i + seed) % len(xs)
                got = quant.matmul_q(xs[j], qt.data, int(Q.Q4_1), cols)
                if not np.array_equal(got, want[j]):
                    errors.append((seed, i))

        threads = [threading.Thread(target=hammer, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
    finally:
        quant.set_num_threads(before)


# -- packed groups of 8 rows (ext/quant_packed.h) ---------------------------------------------------

PACKABLE = ALL


def packed_cols(qtype, legacy: int) -> int:
    """A column count for a packed test: legacy for 32-value blocks, 3 super-blocks for K."""
    return legacy if qtype in LEGACY else 768


def _fma32(a, b, c):
    """float32 fma(a, b, c): the product of two float32 is exact in float64, one rounding."""
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def _fma_blocks(isum, d_w, d_x, a=None, b=None) -> np.ndarray:
    """The packed kernels' float steps, output (t, r) in block order: acc = fma(isum, d_w * d_x,
    acc), then (a, b given, both (n, m, nb) float32) acc = fma(a, b, acc)."""
    n, m, nb = isum.shape
    out = np.zeros((n, m), np.float32)
    for t in range(n):
        for r in range(m):
            acc = np.float32(0)
            for k in range(nb):
                acc = _fma32(np.float32(isum[t, r, k]), d_w[r, k] * d_x[t, k], acc)
                if a is not None:
                    acc = _fma32(a[t, r, k], b[t, r, k], acc)
            out[t, r] = acc
    return out


def packed_model(x: np.ndarray, qt: QuantTensor) -> np.ndarray:
    """NumPy model of the packed kernels' arithmetic, operation for operation."""
    return (packed_model_k if qt.qtype in K_QUANTS else packed_model_legacy)(x, qt)


def packed_model_legacy(x: np.ndarray, qt: QuantTensor) -> np.ndarray:
    """NumPy model of the packed kernels' arithmetic, operation for operation: each activation
    block quantized (d = amax / 127, q = round-half-even(x / d)), the exact integer dot per
    32-block (Q4_0 / Q5_0: minus 8 / 16 * sum(q)), then acc = fma(isum, d_w * d_x, acc) and with
    mins (Q4_1, Q5_1) acc = fma(m_w, d_x * sum(q), acc), in block order."""
    n, k = x.shape
    m, nb = qt.shape[0], k // 32
    blocks = qt.data.reshape(m, nb, -1)
    d_w = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (m, nb)
    has_min, five = qt.qtype in (Q.Q4_1, Q.Q5_1), qt.qtype in (Q.Q5_0, Q.Q5_1)
    if qt.qtype == Q.Q8_0:
        w_q = blocks[:, :, 2:].view(np.int8).astype(np.int64)
    else:
        at = (4 if has_min else 2) + (4 if five else 0)
        qs = blocks[:, :, at:]
        w_q = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.int64)  # (m, nb, 32)
        if five:
            qh = blocks[:, :, at - 4 : at].copy().view(np.uint32)[..., 0].astype(np.int64)
            w_q |= ((qh[..., None] >> np.arange(32)) & 1) << 4
    m_w = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    xb = x.reshape(n, nb, 32)
    amax = np.abs(xb).max(axis=2)
    d_x = (amax / np.float32(127)).astype(np.float32)  # (n, nb)
    inv = np.where(d_x == 0, np.float32(0), np.float32(1) / np.where(d_x == 0, 1, d_x))
    x_q = np.rint(xb * inv[:, :, None].astype(np.float32)).astype(np.int64)  # (n, nb, 32)
    bs = x_q.sum(axis=2)
    s_x = (d_x * bs.astype(np.float32)).astype(np.float32)
    isum = np.einsum("nbi,mbi->nmb", x_q, w_q)  # exact
    if not has_min and qt.qtype != Q.Q8_0:
        isum = isum - (16 if five else 8) * bs[:, None, :]
    if not has_min:
        return _fma_blocks(isum, d_w, d_x)
    shape = isum.shape
    return _fma_blocks(
        isum, d_w, d_x, np.broadcast_to(m_w, shape), np.broadcast_to(s_x[:, None, :], shape)
    )


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 12) ggml Q4_K/Q5_K scale bytes -> (..., 8) 6-bit scales and mins (get_scale_min_k4)."""
    s = s.astype(np.int64)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | (s[..., 0:4] >> 6) << 4], -1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | (s[..., 4:8] >> 6) << 4], -1)
    return sc, mn


def packed_model_k(x: np.ndarray, qt: QuantTensor) -> np.ndarray:
    """The K-quant packed kernels' arithmetic (ext/quant_packed_k.h): each activation row
    quantized per 256 values (d = amax / 127), per super-block the exact integer isum = sum over
    sub-blocks of scale * dot and (Q4_K / Q5_K) imin = sum of min * sum(x_q) per 32 values, then
    acc = fma(isum, d_w * d_x, acc) and acc = fma(-imin, dmin_w * d_x, acc), in block order."""
    n, k = x.shape
    m, nb = qt.shape[0], k // 256
    blocks = qt.data.reshape(m, nb, -1)

    def f16(at: int) -> np.ndarray:
        return blocks[:, :, at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32)

    if qt.qtype == Q.Q6_K:
        ql, qh = blocks[:, :, :128].astype(np.int64), blocks[:, :, 128:192].astype(np.int64)
        w_q = np.empty((m, nb, 256), np.int64)
        for h in range(2):
            for j in range(4):
                low = (
                    ql[:, :, 64 * h + 32 * (j & 1) : 64 * h + 32 * (j & 1) + 32] >> 4 * (j >> 1)
                ) & 15
                top = (qh[:, :, 32 * h : 32 * h + 32] >> 2 * j) & 3
                w_q[:, :, 128 * h + 32 * j : 128 * h + 32 * j + 32] = (low | top << 4) - 32
        scale = np.repeat(blocks[:, :, 192:208].view(np.int8).astype(np.int64), 16, axis=2)
        d_w, dmin_w, mins = f16(208), None, None
    else:
        five = qt.qtype == Q.Q5_K
        sc, mins = _k_scales_mins(blocks[:, :, 4:16])  # (m, nb, 8)
        qs = blocks[:, :, 48:176] if five else blocks[:, :, 16:144]
        parts = []
        for j in range(4):
            chunk = qs[:, :, 32 * j : 32 * j + 32].astype(np.int64)
            parts += [chunk & 15, chunk >> 4]
        w_q = np.concatenate(parts, axis=2)  # (m, nb, 256): sub-block s at 32 s
        if five:
            qh = blocks[:, :, 16:48].astype(np.int64)  # bit s of qh[l]: value l of sub-block s
            w_q |= np.concatenate([(qh >> s_) & 1 for s_ in range(8)], axis=2) << 4
        scale = np.repeat(sc, 32, axis=2)
        d_w, dmin_w = f16(0), f16(2)
    xb = x.reshape(n, nb, 256)
    d_x = (np.abs(xb).max(axis=2) / np.float32(127)).astype(np.float32)  # (n, nb)
    inv = np.where(d_x == 0, np.float32(0), np.float32(1) / np.where(d_x == 0, 1, d_x))
    x_q = np.rint(xb * inv[:, :, None].astype(np.float32)).astype(np.int64)  # (n, nb, 256)
    isum = np.einsum("nbi,mbi->nmb", x_q, w_q * scale)  # exact
    if mins is not None:
        bs = x_q.reshape(n, nb, 8, 32).sum(axis=3)  # (n, nb, 8)
        imin = np.einsum("nbs,mbs->nmb", bs, mins)
    if mins is None:
        return _fma_blocks(isum, d_w, d_x)
    return _fma_blocks(isum, d_w, d_x, -imin.astype(np.float32), dmin_w[None] * d_x[:, None, :])


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda q: q.name)
def test_packed_equals_the_numpy_model_of_its_integer_arithmetic(qtype, isa):
    rng = np.random.default_rng(21)
    cols = packed_cols(qtype, 96)
    qt = weight(qtype, 24, cols, rng)  # a pair of groups (VNNI's 512-bit tile) and one alone
    x = rng.standard_normal((11, cols)).astype(np.float32)  # a tile of 8 rows and one of 3
    packed = quant.repack(qt.data, int(qtype), cols)
    got = quant.matmul_q(x, packed, int(qtype) | quant.PACKED, cols)
    np.testing.assert_array_equal(got, packed_model(x, qt))


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_packed_k_integer_sums_are_exact_at_their_extremes(qtype, isa):
    """Every weight value and scale at its largest magnitude against |x| = 127 activations:
    the int16 partial sums of the AVX2 twin and the int32 totals must not wrap. 24 rows: a pair
    of groups (VNNI's 512-bit tile) and a group alone."""
    cols = 512
    data = np.zeros((24, cols // 256 * GGML_QUANT_SIZES[qtype][1]), np.uint8)
    blocks = data.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    one = np.array([1], np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        blocks[:, :192] = 0  # every value 0 - 32 = -32
        blocks[:, 192:208] = np.uint8(0x80)  # scale -128
        blocks[:, 208:210] = one
    else:
        blocks[:, 0:2] = blocks[:, 2:4] = one
        blocks[:, 4:16] = 0xFF  # scales and mins 63
        blocks[:, 16:] = 0xFF  # values 15 (Q4_K) / 31 (Q5_K, 5th bits set)
    qt = QuantTensor(qtype, (24, cols), data)
    x = np.full((3, cols), 127.0, np.float32)
    x[1] *= -1
    packed = quant.repack(data, int(qtype), cols)
    got = quant.matmul_q(x, packed, int(qtype) | quant.PACKED, cols)
    np.testing.assert_array_equal(got, packed_model(x, qt))
    np.testing.assert_allclose(got, reference(x, qt), rtol=1e-6)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_packed_k_blocks_come_back_whole(qtype):
    """Unpacking (the exact-prefill route) returns each row's original bytes: dequantizing the
    packed groups equals dequantizing the file's blocks."""
    rng = np.random.default_rng(26)
    qt = weight(qtype, 16, 512, rng)
    packed = quant.repack(qt.data, int(qtype), 512)
    x = np.eye(512, dtype=np.float32)[:40]
    before = quant.get_blas_min_rows()
    if not quant.set_blas_min_rows(8):
        pytest.skip("no usable cblas_sgemm in this process")
    try:
        got = quant.matmul_q(x, packed, int(qtype) | quant.PACKED, 512)
    finally:
        quant.set_blas_min_rows(before)
    np.testing.assert_array_equal(got, qt.dequantize()[:, :40].T)


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda q: q.name)
def test_packed_rows_do_not_depend_on_the_step(qtype, isa):
    """Bitwise: 1, 7, 64, 65 and 512 activation rows, on 1 and 2 threads, give each row what it
    gets alone; within the int8 rounding bound of the float reference; the argmax head too."""
    rng = np.random.default_rng(22)
    cols = packed_cols(qtype, 352)
    qt = weight(qtype, 304, cols, rng)
    packed, code = quant.repack(qt.data, int(qtype), cols), int(qtype) | quant.PACKED
    x = rng.standard_normal((512, cols)).astype(np.float32)
    before = quant.get_num_threads()
    try:
        quant.set_num_threads(1)
        alone = np.concatenate(
            [quant.matmul_q(x[i : i + 1], packed, code, cols) for i in range(512)]
        )
        quant.set_num_threads(2)
        for n in (1, 7, 64, 65, 512):
            np.testing.assert_array_equal(quant.matmul_q(x[:n], packed, code, cols), alone[:n])
        ids = quant.matmul_q_argmax(x[:70], packed, code, cols)
    finally:
        quant.set_num_threads(before)
    np.testing.assert_array_equal(ids, np.argmax(alone[:70], axis=1))
    assert np.all(np.abs(alone - reference(x, qt)) <= rounding_bound(x, qt))


def test_packed_implementations_agree():
    """The scalar twin does the AVX2 kernel's operations: the same bits."""
    rng = np.random.default_rng(23)
    before = quant.get_isa()
    try:
        for qtype in PACKABLE:
            cols = packed_cols(qtype, 160)
            qt = weight(qtype, 24, cols, rng)
            packed, code = quant.repack(qt.data, int(qtype), cols), int(qtype) | quant.PACKED
            x = rng.standard_normal((9, cols)).astype(np.float32)
            outs = []
            for isa in quant.available_isas():
                quant.set_isa(isa)
                outs.append(quant.matmul_q(x, packed, code, cols))
            for o in outs[1:]:
                np.testing.assert_array_equal(o, outs[0])
    finally:
        quant.set_isa(before)


def test_packed_sgemm_route_reads_the_groups():
    """Exact prefill dequantizes packed groups back to the rows they came from."""
    rng = np.random.default_rng(24)
    qt = weight(Q.Q4_1, 64, 160, rng)
    packed = quant.repack(qt.data, int(Q.Q4_1), 160)
    x = rng.standard_normal((20, 160)).astype(np.float32)
    before = quant.get_blas_min_rows()
    if not quant.set_blas_min_rows(8):
        pytest.skip("no usable cblas_sgemm in this process")
    try:
        got = quant.matmul_q(x, packed, int(Q.Q4_1) | quant.PACKED, 160)
    finally:
        quant.set_blas_min_rows(before)
    np.testing.assert_allclose(got, x @ qt.dequantize().T, rtol=1e-4, atol=1e-4)


def test_packing_is_refused_where_it_does_not_apply():
    rng = np.random.default_rng(25)
    with pytest.raises(ValueError, match="multiple of 8"):
        quant.repack(weight(Q.Q8_0, 12, 64, rng).data, int(Q.Q8_0), 64)
    with pytest.raises(ValueError, match="not a packed code"):
        quant.repack(weight(Q.Q6_K, 8, 256, rng).data, int(Q.Q6_K) | quant.PACKED, 256)
    data = weight(Q.Q8_0, 16, 64, rng).data
    packed = quant.repack(data, int(Q.Q8_0), 64)
    x = np.zeros((1, 64), np.float32)
    with pytest.raises(ValueError, match="take"):  # Q8_0's bytes read as packed Q6_K
        quant.matmul_q(x, data, int(Q.Q6_K) | quant.PACKED, 256)
    with pytest.raises(ValueError, match="take"):  # row-major blocks read as groups
        quant.matmul_q(x, data, int(Q.Q8_0) | quant.PACKED, 64)
    with pytest.raises(ValueError, match="packed"):
        quant.dequantize_rows(packed, int(Q.Q8_0) | quant.PACKED, 64, [0])
