"""The kernels' bf16 level (ext/quant_bf16.h): bf16 weights against bf16-rounded activations.

Oracles: a NumPy model of the arithmetic the header documents (each activation rounded to bf16,
nearest even; per 32-value block, lane j adds w*x of values 2j+1 then 2j, each an f32 add; blocks
alternating between two accumulators; a fixed halving reduction), which the kernel must equal bit
for bit; the float64 reference, within the rounding of the activations; the kernel itself at
other row and thread counts (batch invariance); and VNNI's kernels, whose bits the level keeps for
everything but bf16 weights. Levels a CPU lacks are skipped; which levels it has is checked
against /proc/cpuinfo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_quant_kernels import ALL, cols_for, weight

kernels = pytest.importorskip(
    "tinyserve._ext.kernels",
    reason="native kernels not built (pip install -e . --no-build-isolation)",
)
HAS_BF16 = "bf16" in kernels.available_isas()
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="CPU without AVX-512 BF16")


@pytest.fixture
def bf16_level():
    before = kernels.get_isa()
    kernels.set_isa("bf16")
    yield
    kernels.set_isa(before)


@pytest.fixture(params=[1, 2])
def threads(request):
    before = kernels.get_num_threads()
    kernels.set_num_threads(request.param)
    yield request.param
    kernels.set_num_threads(before)


# -- the NumPy model -------------------------------------------------------------------------------


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits as vcvtne2ps2bf16: nearest even, nan quieted, denormals to zero."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32)
    nearest = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    quiet_nan = ((b >> 16) | 0x40).astype(np.uint16)
    out = np.where((b & 0x7FFFFFFF) > 0x7F800000, quiet_nan, nearest)
    return np.where((b & 0x7F800000) == 0, (b >> 16) & 0x8000, out).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 bits -> float32, denormals read as zero (the instruction's inputs)."""
    bits = np.where((bits & 0x7F80) == 0, bits & 0x8000, bits).astype(np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def flush(a: np.ndarray) -> np.ndarray:
    """f32 denormal results to (signed) zero."""
    return np.where(np.abs(a) < np.finfo(np.float32).tiny, a * np.float32(0), a)


def dpbf16_model(x: np.ndarray, w_bits: np.ndarray) -> np.ndarray:
    """(N, K) float32, (M, K) bf16 bits -> (N, M) float32, in the kernel's order of operations."""
    n, k = x.shape
    kp = -(-k // 32) * 32  # zero-padded to whole 32-value blocks
    xb = np.zeros((n, kp), np.uint16)
    xb[:, :k] = to_bf16(x)
    wb = np.zeros((w_bits.shape[0], kp), np.uint16)
    wb[:, :k] = w_bits
    xf = from_bf16(xb).reshape(n, 1, kp // 32, 16, 2)  # (N, 1, blocks, lanes, pair)
    wf = from_bf16(wb).reshape(1, -1, kp // 32, 16, 2)  # (1, M, blocks, lanes, pair)
    acc = np.zeros((2, n, wb.shape[0], 16), np.float32)  # (parity, N, M, lanes)
    with np.errstate(invalid="ignore", over="ignore"):
        for b in range(kp // 32):
            p = xf[:, :, b] * wf[:, :, b]  # (N, M, 16, 2): bf16 x bf16 is exact in f32
            acc[b & 1] = flush(acc[b & 1] + p[..., 1])
            acc[b & 1] = flush(acc[b & 1] + p[..., 0])
        v = acc[0] + acc[1]  # (N, M, 16)
        for half in (8, 4, 2, 1):
            v = v[..., :half] + v[..., half : 2 * half]
    return v[..., 0]


def bf16_weight(m: int, k: int, rng, spread: float = 0.0) -> np.ndarray:
    """(M, K) bf16 bits of Gaussian values, their magnitudes spread over e^+-spread."""
    w = rng.standard_normal((m, k)) * np.exp(rng.uniform(-spread, spread, (m, k)))
    return (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


# -- which levels the CPU has ----------------------------------------------------------------------


def test_levels_follow_the_cpu_flags():
    """The best level is the best the CPU runs: bf16 exactly where AVX-512 BF16 and VNNI's set
    are present (the kernels are compiled for x86 with GCC; elsewhere only scalar)."""
    cpuinfo = Path("/proc/cpuinfo")
    isas = kernels.available_isas()
    if not cpuinfo.exists() or kernels.get_isa() == "scalar" and len(isas) == 1:
        pytest.skip("no x86 /proc/cpuinfo, or a portable build")
    flags = set(cpuinfo.read_text().split("flags")[1].split("\n")[0].split())
    vnni = {"avx512_vnni", "avx512vl", "avx512bw"} <= flags
    assert ("vnni" in isas) == vnni
    assert ("bf16" in isas) == (vnni and "avx512_bf16" in flags)
    assert isas == ["scalar", "avx2", "vnni", "bf16"][: len(isas)]


# -- the bf16 tile ---------------------------------------------------------------------------------


@needs_bf16
@pytest.mark.parametrize("k", [1, 31, 32, 33, 64, 100, 576, 577])  # tails and odd block counts
@pytest.mark.parametrize("n", [1, 3, 9, 17])  # tiles of 8 and their remainders
def test_equals_the_numpy_model(k, n, bf16_level, threads):
    rng = np.random.default_rng(k * 31 + n)
    bits = bf16_weight(37, k, rng, spread=6.0)
    x = (rng.standard_normal((n, k)) * np.exp(rng.uniform(-6, 6, (n, k)))).astype(np.float32)
    np.testing.assert_array_equal(kernels.matmul_bf16(x, bits), dpbf16_model(x, bits))


@needs_bf16
@pytest.mark.parametrize("k", [100, 576])
def test_within_the_activation_rounding_of_float64(k, bf16_level):
    """|err| <= sum |w| |x| 2^-8 (half a unit of bf16's 8 bits) + f32 accumulation slack; the
    f32-activation kernels meet 1e-5 of that sum, this level only the rounding bound."""
    rng = np.random.default_rng(k)
    bits = bf16_weight(41, k, rng)
    x = rng.standard_normal((9, k)).astype(np.float32)
    w = from_bf16(bits).astype(np.float64)
    got = kernels.matmul_bf16(x, bits)
    err = np.abs(got - x.astype(np.float64) @ w.T)
    scale = np.abs(x.astype(np.float64)) @ np.abs(w).T
    assert np.all(err <= scale * (2.0**-8 + 1e-5))
    assert err.max() > 1e-4 * scale.max()  # the activations were rounded: not the f32 path


@needs_bf16
@pytest.mark.parametrize("k", [200, 576])  # 200: a tail after 6 blocks
def test_batched_equals_alone_and_threads_agree(k, bf16_level):
    """Batch invariance within the level: rows of 1, 7, 64, 65, 512 (the matvec, ragged tiles,
    one and several 64-row tasks), on 1 and 2 threads, give each row's alone bits."""
    rng = np.random.default_rng(k + 1)
    bits = bf16_weight(203, k, rng)
    x = rng.standard_normal((512, k)).astype(np.float32)
    before = kernels.get_num_threads()
    try:
        kernels.set_num_threads(1)
        alone = np.concatenate([kernels.matmul_bf16(x[i : i + 1], bits) for i in range(len(x))])
        for nt in (1, 2):
            kernels.set_num_threads(nt)
            for n in (1, 7, 64, 65, 512):
                np.testing.assert_array_equal(kernels.matmul_bf16(x[:n], bits), alone[:n])
    finally:
        kernels.set_num_threads(before)
    np.testing.assert_array_equal(alone[:9], dpbf16_model(x[:9], bits))


@needs_bf16
def test_nan_and_inf_propagate(bf16_level):
    """A nan activation makes its row nan; an inf one gives +-inf (nan where it meets a zero
    weight or an opposite inf); finite values past bf16's largest round to inf, as the
    conversion defines; nan/inf weights reach their columns. Other rows are untouched."""
    rng = np.random.default_rng(5)
    k = 77
    bits = bf16_weight(11, k, rng)
    bits[3, 40] = 0x7FC0  # nan weight
    bits[4, 2] = 0xFF80  # -inf weight
    bits[5, 70] = 0  # a zero meeting row 2's inf
    x = rng.standard_normal((5, k)).astype(np.float32)
    x[0, 5] = np.nan
    x[2, 70] = np.inf
    x[3, 0] = 3.4e38  # rounds to inf in bf16
    got = kernels.matmul_bf16(x, bits)
    np.testing.assert_array_equal(got, dpbf16_model(x, bits))  # nan == nan here
    assert np.all(np.isnan(got[0]))
    assert np.isnan(got[2, 5]) and np.all(np.isinf(np.delete(got[2], [3, 4, 5])))
    assert np.all(np.isinf(got[3, [0, 1, 2, 6]])) and np.all(np.isnan(got[:, 3]))
    assert np.all(np.isfinite(got[[1, 4]][:, [0, 1, 2, 5, 6, 7, 8, 9, 10]]))
    np.testing.assert_array_equal(got[1:2], kernels.matmul_bf16(x[1:2], bits))


@needs_bf16
def test_strided_rows_and_out_buffer(bf16_level):
    rng = np.random.default_rng(8)
    wide = rng.standard_normal((5, 160)).astype(np.float32)
    x = wide[:, 16:116]  # rows strided: read in place
    bits = np.zeros((23, 128), np.uint16)[:, :100]  # weight rows strided too
    bits[:] = bf16_weight(23, 100, rng)
    out = np.full((5, 23), np.nan, np.float32)
    assert kernels.matmul_bf16(x, bits, out) is out
    np.testing.assert_array_equal(out, dpbf16_model(np.ascontiguousarray(x), bits))


# -- everything else on the bf16 level is VNNI's ---------------------------------------------------


@needs_bf16
def test_other_kernels_keep_vnnis_bits():
    """float32 weights stay on the exact f32 tiles (rounding them to bf16 would lose 16 bits of
    each), and every int8 kernel, row-major, packed and argmax, is VNNI's."""
    rng = np.random.default_rng(12)
    w32 = rng.standard_normal((45, 200)).astype(np.float32)
    x32 = rng.standard_normal((19, 200)).astype(np.float32)
    runs = []
    for qtype in ALL:
        cols = cols_for(qtype)[-1]
        qt = weight(qtype, 48, cols, rng)
        x = rng.standard_normal((19, cols)).astype(np.float32)
        runs.append(lambda qt=qt, x=x, c=cols: kernels.matmul_q(x, qt.data, int(qt.qtype), c))
        runs.append(
            lambda qt=qt, x=x, c=cols: kernels.matmul_q_argmax(x, qt.data, int(qt.qtype), c)
        )
        if int(qtype) in kernels.PACKABLE_QTYPES:
            packed = kernels.repack(qt.data, int(qtype), cols)
            code = int(qtype) | kernels.PACKED
            runs.append(lambda p=packed, x=x, c=cols, q=code: kernels.matmul_q(x, p, q, c))
    runs.append(lambda: kernels.matmul_f32(x32, w32))
    bits = bf16_weight(45, 200, rng)
    before = kernels.get_isa()
    try:
        kernels.set_isa("bf16")
        got, got_bf16 = [run() for run in runs], kernels.matmul_bf16(x32, bits)
        kernels.set_isa("vnni")
        for g, run in zip(got, runs):
            np.testing.assert_array_equal(g, run())
        assert not np.array_equal(got_bf16, kernels.matmul_bf16(x32, bits))  # the one that moves
    finally:
        kernels.set_isa(before)
