# Quantized and bf16 matmul kernels (included by kernels.pyx: one module, one pool, one ISA state).
#
# Quantized and bf16 matmul kernels over ggml blocks as they lie in a GGUF file (no repack).
#
# matmul_q(x, data, qtype, cols) computes x @ dequantize(data).T the way llama.cpp does: each
# activation row is quantized once per call to int8 blocks, scale d = max|x_block| / 127 (blocks
# of 32 for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 like llama.cpp's Q8_0/Q8_1, of 256 for Q4_K/Q5_K/Q6_K like
# Q8_K), and every weight block meets its activation block in an integer dot product scaled in
# float. The error against the float reference is the activation rounding, at most d/2 per
# element: a relative error of a block's dot product of order 1/127, which averages down over
# blocks (relative Frobenius error ~5e-3 on Gaussian data).
#
# The work is in ext/quant.h (driver, C API) with quant_scalar.h (portable C) and quant_simd.h
# (+ quant_simd_wide.h, quant_simd_k.h): portable C, AVX2 and AVX-512 VNNI twins picked at run
# time (get_isa / set_isa; TINYSERVE_QUANT_ISA through tinyserve.settings), the kernel thread
# pool (ext/pool.h) over chunks of output rows, each weight row read once for a tile of 4 (AVX2)
# or 8 (VNNI) activation rows. The level above VNNI, bf16 (AVX-512 BF16), runs VNNI's kernels
# except for bf16 weights, which meet bf16-rounded activations in vdpbf16ps (ext/quant_bf16.h):
# levels may differ in their results, a level never does from one call to the next. The wrappers
# here only check arguments (ValueError) and release the GIL.

# gguf.GGMLQuantizationType value -> name, for the types these kernels run
QTYPES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
SUPPORTED_QTYPES = tuple(QTYPES)
_ISA_NAMES = ("scalar", "avx2", "vnni", "bf16")

cdef int _best_isa = ts_best_isa()
cdef int _isa = _best_isa
def available_isas() -> list:
    """Implementations this CPU runs, best last: a prefix of ['scalar', 'avx2', 'vnni', 'bf16']."""
    return list(_ISA_NAMES[: _best_isa + 1])


def get_isa() -> str:
    """The implementation in use ('scalar', 'avx2', 'vnni' or 'bf16')."""
    return _ISA_NAMES[_isa]


def set_isa(str name) -> None:
    """Force an implementation (tests, benchmarks); one this CPU lacks raises ValueError."""
    global _isa
    if name not in _ISA_NAMES[: _best_isa + 1]:
        raise ValueError(
            f"implementation {name!r} not available here (available: {available_isas()})"
        )
    _isa = _ISA_NAMES.index(name)


def set_blas_min_rows(Py_ssize_t n, bint per_thread=True) -> bool:
    """Quantized matmuls of >= n activation rows dequantize the weight and call BLAS sgemm
    (0: never). per_thread: our pool threads each run single-threaded sgemms on their own
    weight panels, where the BLAS has a per-thread thread count (OpenBLAS 0.3.27+); False: one
    sgemm on BLAS's own threads. -> whether a usable cblas_sgemm was found."""
    if n < 0:
        raise ValueError(f"row threshold must be >= 0, got {n}")
    addr, ilp64 = find_sgemm()
    local = find_blas_local_threads() if per_thread else 0
    return bool(ts_set_sgemm(<void *><size_t>addr, ilp64, n, <void *><size_t>local)) and n > 0


def blas_per_thread() -> bool:
    """Whether large matmuls run per-thread single-threaded sgemms (see set_blas_min_rows)."""
    return ts_blas_local_ptr != NULL


def get_blas_min_rows() -> int:
    """The row count from which sgemm is used; 0 when never (none found, or disabled)."""
    return ts_blas_min_n


# registered, unused: the integer path for every row count until a backend asks for exact
# prefill (cpu.CpuBackend(exact_prefill=True) sets blas_min_rows() rows per step)
set_blas_min_rows(0)
if quant_isa():
    set_isa(quant_isa())


cdef inline int _check_qtype(int qtype) except -1:
    if ts_block_size(qtype) == 0 or qtype & ~0xFF and (qtype & ~0xFF != TS_PACKED
                                                       or not ts_packs(qtype & 0xFF)):
        names = ", ".join(QTYPES.values())
        raise ValueError(
            f"quantization type {qtype} is not supported by the kernels (supported: {names}; "
            f"packed: | PACKED for {', '.join(QTYPES[q] for q in PACKABLE_QTYPES)})"
        )
    return 0


cdef inline Py_ssize_t _rows_per(int qtype) noexcept:
    """Weight rows per row of data: a packed group's, or 1."""
    return TS_GROUP if qtype & TS_PACKED else 1


PACKED = TS_PACKED  # or-ed into a qtype: the data is repack()'s groups of rows
PACKABLE_QTYPES = tuple(q for q in QTYPES if ts_packs(q))


def packed_bytes(int qtype, Py_ssize_t cols) -> int:
    """Bytes of one packed group of 8 rows of cols values (a row of repack()'s output)."""
    _check_qtype(qtype | TS_PACKED)
    return cols // ts_block_size(qtype) * ts_packed_rec(qtype)


def repack(cnp.ndarray data not None, int qtype, Py_ssize_t cols):
    """(M, bytes_per_row) ggml blocks, M a multiple of 8, -> (M / 8, packed_bytes) uint8: the
    rows in groups of 8 (ext/quant_packed.h, ext/quant_packed_k.h), read by matmul_q / matmul_q_argmax with
    qtype | PACKED: the same products in fewer instructions, bit for bit at any row count."""
    _check_qtype(qtype)
    if qtype & TS_PACKED:
        raise ValueError("repack takes the blocks' own quantization type, not a packed code")
    _check_blocks(data, qtype, cols)
    cdef Py_ssize_t m = data.shape[0], nb = cols // ts_block_size(qtype)
    if m % TS_GROUP:
        raise ValueError(f"packing needs a multiple of {TS_GROUP} rows, got {m}")
    out = np.empty((m // TS_GROUP, nb * ts_packed_rec(qtype)), np.uint8)
    cdef const uint8_t *wp = <const uint8_t *>cnp.PyArray_DATA(data)
    cdef uint8_t *op = <uint8_t *><size_t>out.ctypes.data
    cdef int64_t w_stride = data.strides[0]
    with nogil:
        ts_repack(qtype, wp, m, w_stride, nb, op)
    return out


cdef inline int _check_blocks(cnp.ndarray data, int qtype, Py_ssize_t cols) except -1:
    """data must be (rows, cols / block_size * type_size) uint8 with contiguous rows."""
    cdef int bs = ts_block_size(qtype)
    if cols <= 0 or cols % bs:
        raise ValueError(
            f"{QTYPES[qtype & 0xFF]} needs cols to be a positive multiple of {bs}, got {cols}"
        )
    if cnp.PyArray_TYPE(data) != cnp.NPY_UINT8 or cnp.PyArray_NDIM(data) != 2:
        raise ValueError(
            f"data must be 2-D uint8 ggml blocks, got {data.dtype} {(<object>data).shape}"
        )
    cdef Py_ssize_t bpr = cols // bs * (
        ts_packed_rec(qtype) if qtype & TS_PACKED else ts_type_size(qtype))
    if data.shape[1] != bpr:
        raise ValueError(
            f"{QTYPES[qtype & 0xFF]} rows of {cols} values take {bpr} bytes, "
            f"but data rows have {data.shape[1]}"
        )
    if data.strides[1] != 1 or data.strides[0] < bpr:
        raise ValueError(f"data rows must be contiguous bytes, strides {(<object>data).strides}")
    return 0


cdef inline int64_t _check_x(cnp.ndarray x, Py_ssize_t cols) except -1:
    """x must be (N, cols) float32 with contiguous rows; -> its row stride in floats."""
    if cnp.PyArray_TYPE(x) != cnp.NPY_FLOAT32 or cnp.PyArray_NDIM(x) != 2:
        raise ValueError(f"x must be a 2-D float32 array, got {x.dtype} {(<object>x).shape}")
    if x.shape[1] != cols:
        raise ValueError(f"x has {x.shape[1]} columns, the weight has {cols}")
    if x.shape[0] <= 1:
        return cols  # a single row's stride is meaningless
    if x.strides[1] != 4 or x.strides[0] % 4 or x.strides[0] < 4 * cols:
        raise ValueError(f"x rows must be contiguous float32, got strides {(<object>x).strides}")
    return x.strides[0] // 4


cdef cnp.ndarray _out(object out, Py_ssize_t n, Py_ssize_t m):
    cdef cnp.npy_intp dims[2]
    if out is None:
        dims[0] = n
        dims[1] = m
        return cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a float32 ndarray, got {type(out).__name__}")
    cdef cnp.ndarray o = out
    if (cnp.PyArray_TYPE(o) != cnp.NPY_FLOAT32 or cnp.PyArray_NDIM(o) != 2
            or o.shape[0] != n or o.shape[1] != m or not cnp.PyArray_IS_C_CONTIGUOUS(o)):
        raise ValueError(
            f"out must be a C-contiguous float32 array of shape {(n, m)}, "
            f"got {o.dtype} {(<object>o).shape}"
        )
    return o


def matmul_q(cnp.ndarray x not None, cnp.ndarray data not None, int qtype, Py_ssize_t cols,
             out=None):
    """(N, K) float32, (M, bytes_per_row) uint8 ggml blocks -> (N, M) float32 x @ W.T; K = cols.
    qtype | PACKED: data is repack()'s (M / 8, ...) groups."""
    _check_qtype(qtype)
    _check_blocks(data, qtype, cols)
    cdef int64_t x_stride = _check_x(x, cols)
    cdef Py_ssize_t n = x.shape[0], m = data.shape[0] * _rows_per(qtype)
    cdef cnp.ndarray o = _out(out, n, m)
    if n == 0 or m == 0:
        return o
    cdef const float *xp = <const float *>cnp.PyArray_DATA(x)
    cdef const uint8_t *wp = <const uint8_t *>cnp.PyArray_DATA(data)
    cdef float *op = <float *>cnp.PyArray_DATA(o)
    cdef int64_t w_stride = data.strides[0]
    cdef int rc
    with nogil:
        rc = ts_matmul_q_strided(xp, n, cols, x_stride, wp, m, w_stride, qtype, op,
                                 ts_threads(), _isa)
    if rc != 0:
        raise MemoryError(f"cannot allocate {n * cols} bytes for the quantized activations")
    return o


def matmul_q_argmax(cnp.ndarray x not None, cnp.ndarray data not None, int qtype, Py_ssize_t cols):
    """(N, K) float32, (M, bytes_per_row) uint8 ggml blocks -> (N,) int64: argmax of each row of
    x @ W.T as the integer path of matmul_q computes it (the first of equal maxima), without
    materializing the (N, M) outputs: the output head of greedy decoding (M = vocabulary)."""
    _check_qtype(qtype)
    _check_blocks(data, qtype, cols)
    cdef int64_t x_stride = _check_x(x, cols)
    cdef Py_ssize_t n = x.shape[0], m = data.shape[0] * _rows_per(qtype)
    if m == 0:
        raise ValueError("argmax over an empty weight")
    ids = np.zeros(n, dtype=np.int64)
    if n == 0:
        return ids
    cdef const float *xp = <const float *>cnp.PyArray_DATA(x)
    cdef const uint8_t *wp = <const uint8_t *>cnp.PyArray_DATA(data)
    cdef int64_t *ip = <int64_t *>cnp.PyArray_DATA(ids)
    cdef int64_t w_stride = data.strides[0]
    cdef int rc
    with nogil:
        rc = ts_matmul_q_argmax(xp, n, cols, x_stride, wp, m, w_stride, qtype, ip, ts_threads(),
                                _isa)
    if rc != 0:
        raise MemoryError(f"cannot allocate {n * cols} bytes for the quantized activations")
    return ids


def matmul_bf16(cnp.ndarray x not None, cnp.ndarray w_bits not None, out=None):
    """(N, K) float32, (M, K) uint16 bf16 bits -> (N, M) float32 = x @ W.T; on the bf16 level
    x @ W.T with x rounded to bf16 (nearest even) first, as llama.cpp's bf16 dot product."""
    if cnp.PyArray_TYPE(w_bits) != cnp.NPY_UINT16 or cnp.PyArray_NDIM(w_bits) != 2:
        raise ValueError(
            f"w_bits must be 2-D uint16 bf16 bits, got {w_bits.dtype} {(<object>w_bits).shape}"
        )
    if w_bits.strides[1] != 2:
        raise ValueError(f"w_bits rows must be contiguous, got strides {(<object>w_bits).strides}")
    cdef Py_ssize_t k = w_bits.shape[1]
    cdef int64_t x_stride = _check_x(x, k)
    cdef Py_ssize_t n = x.shape[0], m = w_bits.shape[0]
    cdef cnp.ndarray o = _out(out, n, m)
    if n == 0 or m == 0:
        return o
    cdef const float *xp = <const float *>cnp.PyArray_DATA(x)
    cdef const uint16_t *wp = <const uint16_t *>cnp.PyArray_DATA(w_bits)
    cdef float *op = <float *>cnp.PyArray_DATA(o)
    cdef int64_t w_stride = w_bits.strides[0] // 2
    if w_bits.strides[0] % 2:
        raise ValueError(f"w_bits rows are not uint16 aligned (strides {(<object>w_bits).strides})")
    cdef int rc
    with nogil:
        rc = ts_matmul_bf16_strided(xp, n, k, x_stride, wp, m, w_stride, op, ts_threads(), _isa)
    if rc != 0:
        raise MemoryError(f"cannot allocate {2 * n * k} bytes for the bf16 activations")
    return o


def matmul_f32(cnp.ndarray x not None, cnp.ndarray w not None, out=None):
    """(N, K) float32, (M, K) float32 -> (N, M) float32 = x @ W.T, each output one fixed-order
    sum whatever N or the thread count (BLAS's rows change with the row count)."""
    if cnp.PyArray_TYPE(w) != cnp.NPY_FLOAT32 or cnp.PyArray_NDIM(w) != 2:
        raise ValueError(f"w must be 2-D float32, got {w.dtype} {(<object>w).shape}")
    if w.strides[1] != 4 or w.strides[0] % 4:
        raise ValueError(f"w rows must be contiguous float32, got strides {(<object>w).strides}")
    cdef Py_ssize_t k = w.shape[1]
    cdef int64_t x_stride = _check_x(x, k)
    cdef Py_ssize_t n = x.shape[0], m = w.shape[0]
    cdef cnp.ndarray o = _out(out, n, m)
    if n == 0 or m == 0:
        return o
    cdef const float *xp = <const float *>cnp.PyArray_DATA(x)
    cdef const void *wp = cnp.PyArray_DATA(w)
    cdef float *op = <float *>cnp.PyArray_DATA(o)
    cdef int64_t w_stride = w.strides[0]
    with nogil:
        ts_matmul_wf_strided(xp, n, k, x_stride, wp, 1, m, w_stride, op, ts_threads(), _isa)
    return o  # f32 weights take no scratch: never out of memory


def dequantize_rows(cnp.ndarray data not None, int qtype, Py_ssize_t cols, ids):
    """(M, bytes_per_row) uint8 ggml blocks, (n,) row ids -> (n, cols) float32 (embeddings)."""
    if qtype & TS_PACKED:
        raise ValueError("dequantize_rows reads row-major blocks, not packed groups")
    _check_qtype(qtype)
    _check_blocks(data, qtype, cols)
    cdef cnp.ndarray idx = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    cdef Py_ssize_t n = idx.shape[0], m = data.shape[0]
    if n and (idx.min() < 0 or idx.max() >= m):
        bad = idx[(idx < 0) | (idx >= m)][0]
        raise ValueError(f"row id {bad} out of range for {m} rows")
    cdef cnp.ndarray o = _out(None, n, cols)
    if n == 0:
        return o
    cdef const uint8_t *wp = <const uint8_t *>cnp.PyArray_DATA(data)
    cdef const int64_t *ip = <const int64_t *>cnp.PyArray_DATA(idx)
    cdef float *op = <float *>cnp.PyArray_DATA(o)
    cdef int64_t w_stride = data.strides[0]
    with nogil:
        ts_dequantize_rows(wp, w_stride, qtype, cols, ip, n, op, ts_threads())
    return o
