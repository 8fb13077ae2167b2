# The decoder layer stack, included by kernels.pyx (one module with the row ops, paged attention
# and the quantized matmuls it calls). The model files stay the readable reference; this runs the SAME weights through the same maths
# with one Python call per forward instead of ~15 per layer, the quantized matmuls coming from
# ext/quant.h.

DEF W_Q = 0
DEF W_K = 1
DEF W_V = 2
DEF W_O = 3
DEF W_GATE = 4
DEF W_UP = 5
DEF W_DOWN = 6
DEF MAX_ROPES = 4

MAX_ROPE_TABLES = MAX_ROPES  # rope tables one DecoderStack.run takes
DEF ACT_SILU = 0
DEF ACT_GELU_TANH = 1
ACTIVATIONS = {"silu": ACT_SILU, "gelu_tanh": ACT_GELU_TANH}  # DecoderStack's act


cdef struct _Layer:
    # q k v o gate up down: ggml blocks (rows of a fused matrix are row ranges of its blocks)
    const uint8_t *w[7]
    int64_t ws[7]  # bytes per row
    int qt[7]  # ggml type
    int64_t rows[7]  # output features
    const float *attn_norm  # (D,)
    const float *post_attn_norm  # (D,) or NULL: Gemma norms each sublayer's output
    const float *ffn_norm
    const float *post_ffn_norm
    const float *q_bias  # (H*Dh,) or NULL (Qwen2)
    const float *k_bias
    const float *v_bias
    const float *q_norm  # (Dh,) or NULL (Qwen3, Gemma 3)
    const float *k_norm
    int64_t window  # 0: global attention
    int rope  # which of the forward's rope tables rotates this layer
    int has_ffn  # 0: the caller runs this layer's feed-forward (a mixture of experts)


cdef inline void _rms_ptr(const float *x, const float *w, float *out, Py_ssize_t N, Py_ssize_t D,
                          float eps) noexcept nogil:
    cdef _RowJob job
    job.a, job.b, job.out, job.N, job.D, job.eps = x, w, out, N, D, eps
    _rows_run(&job, N * D, _rms_task)


cdef inline void _rope_ptr(float *x, Py_ssize_t N, Py_ssize_t nh, Py_ssize_t Dh, const float *cs,
                           Py_ssize_t half) noexcept nogil:
    cdef _RowJob job
    job.b, job.out, job.N, job.nh, job.D, job.half = cs, x, N, nh, Dh, half
    _rows_run(&job, N * nh * half * 4, _rope_task)


cdef void _gelu_task(void *ctx, int64_t t) noexcept nogil:
    cdef _RowJob *j = <_RowJob *>ctx
    cdef Py_ssize_t n, F = j.D
    for n in range(t * ROWS, min(t * ROWS + ROWS, j.N)):
        ts_gelu_tanh_mul(j.out + n * F, j.a + n * F, j.b + n * F, F)


cdef inline void _act_mul(int act, const float *g, const float *u, float *out, Py_ssize_t N,
                          Py_ssize_t F) noexcept nogil:
    cdef _RowJob job
    job.a, job.b, job.out, job.N, job.D = g, u, out, N, F
    if act == ACT_GELU_TANH:
        _rows_run(&job, N * F * 4, _gelu_task)
    else:
        _rows_run(&job, N * F * 4, _silu_task)


def gelu_tanh_mul(gate, up, out=None):
    """(N, F), (N, F) -> (N, F): gelu_tanh(gate) * up, the GeGLU feed-forward's middle (Gemma)."""
    gate, up = np.asarray(gate), np.asarray(up)
    if gate.shape != up.shape:
        raise ValueError(f"gelu_tanh_mul shapes differ: {gate.shape} vs {up.shape}")
    F = gate.shape[-1]
    if out is None:
        out = np.empty(gate.shape, dtype=np.float32)
    cdef float[:, ::1] g2, u2, o2
    if gate.size:
        g2, u2, o2 = _f32_rows(gate, F), _f32_rows(up, F), out.reshape(-1, F)
        _act_mul(ACT_GELU_TANH, &g2[0, 0], &u2[0, 0], &o2[0, 0], g2.shape[0], F)
    return out


cdef inline int _matmuls(const float *x, Py_ssize_t N, Py_ssize_t K, _Layer *lw, int first, int nw,
                         float **out, int isa) noexcept nogil:
    """Matrices first .. first + nw - 1 of a layer against one x: one activation quantization and
    one parallel region when their types share an activation format (32- or 256-wide blocks)."""
    cdef int j
    cdef bint same = True
    for j in range(nw):
        if (ts_block_size(lw.qt[first + j]) == 256) != (ts_block_size(lw.qt[first]) == 256):
            same = False
    if same:
        return ts_matmul_q_multi(x, N, K, K, nw, &lw.w[first], &lw.rows[first], &lw.ws[first],
                                 &lw.qt[first], out, ts_threads(), isa)
    for j in range(nw):
        if ts_matmul_q_multi(x, N, K, K, 1, &lw.w[first + j], &lw.rows[first + j],
                             &lw.ws[first + j], &lw.qt[first + j], &out[j], ts_threads(), isa):
            return -1
    return 0


cdef inline void _add_rows(float *y, const float *b, Py_ssize_t N, Py_ssize_t W) noexcept nogil:
    """y (N, W) += b (W,) per row."""
    cdef Py_ssize_t n
    for n in range(N):
        ts_axpy(y + n * W, 1.0, b, W)


cdef class DecoderStack:
    """A pre-norm GQA decoder's layers as C structs over the spec's own (quantized) weights.

    run() takes the residual stream (N, D) through layers [first, last) in place. Made by
    tinyserve/backends/cpu_decoder.py from a DecoderSpec; `keep` holds every array the structs
    point into."""

    cdef _Layer *layers
    cdef readonly Py_ssize_t n_layers, D, H, KVH, Dh, F
    cdef readonly int act
    cdef float eps, scale
    cdef object keep

    def __cinit__(self, list layers, Py_ssize_t D, Py_ssize_t H, Py_ssize_t KVH, Py_ssize_t Dh,
                  Py_ssize_t F, int act, float eps, float scale):
        """layers: per layer a dict with "w" (7 (address, row bytes, qtype, rows) tuples), the
        norm / bias / q-k norm float32 arrays or None, "window", "rope", "has_ffn"."""
        cdef Py_ssize_t l
        cdef int j
        cdef _Layer *lw
        self.n_layers, self.D, self.H, self.KVH, self.Dh, self.F = len(layers), D, H, KVH, Dh, F
        self.act, self.eps, self.scale = act, eps, scale
        self.keep = []
        self.layers = <_Layer *>malloc(max(1, len(layers)) * sizeof(_Layer))
        if self.layers == NULL:
            raise MemoryError("DecoderStack: cannot allocate its layer table")
        sizes = {"attn_norm": D, "post_attn_norm": D, "ffn_norm": D, "post_ffn_norm": D,
                 "q_bias": H * Dh, "k_bias": KVH * Dh, "v_bias": KVH * Dh, "q_norm": Dh, "k_norm": Dh}
        for l, spec in enumerate(layers):
            lw = &self.layers[l]
            for j, (addr, stride, qtype, rows) in enumerate(spec["w"]):
                lw.w[j], lw.ws[j], lw.qt[j], lw.rows[j] = <const uint8_t *><size_t>addr, stride, qtype, rows
            ptrs = {}
            for name, size in sizes.items():
                v = spec.get(name)
                if v is None:
                    ptrs[name] = 0
                    continue
                v = np.ascontiguousarray(v, dtype=np.float32)
                if v.shape != (size,):
                    raise ValueError(f"layer {l} {name} has shape {v.shape}, expected ({size},)")
                self.keep.append(v)
                ptrs[name] = v.ctypes.data
            if not ptrs["attn_norm"] or (spec["has_ffn"] and not ptrs["ffn_norm"]):
                raise ValueError(f"layer {l} lacks a norm")
            lw.attn_norm = <const float *><size_t>ptrs["attn_norm"]
            lw.post_attn_norm = <const float *><size_t>ptrs["post_attn_norm"]
            lw.ffn_norm = <const float *><size_t>ptrs["ffn_norm"]
            lw.post_ffn_norm = <const float *><size_t>ptrs["post_ffn_norm"]
            lw.q_bias = <const float *><size_t>ptrs["q_bias"]
            lw.k_bias = <const float *><size_t>ptrs["k_bias"]
            lw.v_bias = <const float *><size_t>ptrs["v_bias"]
            lw.q_norm = <const float *><size_t>ptrs["q_norm"]
            lw.k_norm = <const float *><size_t>ptrs["k_norm"]
            lw.window = int(spec["window"] or 0)
            lw.rope = int(spec["rope"])
            lw.has_ffn = 1 if spec["has_ffn"] else 0
            if not 0 <= lw.rope < MAX_ROPES:
                raise ValueError(f"layer {l} rope table {lw.rope} out of range")

    def __dealloc__(self):
        free(self.layers)

    def run(self, x, kv, positions, slots, seq_of, seq_lens, block_tables, list rope_tables,
            Py_ssize_t first=0, Py_ssize_t last=-1):
        """(N, D) float32 residual stream through layers [first, last) in place (last -1: all).
        kv: (L, 2, NB, BS, KVH, Dh) pools; rope_tables: (N, 2 * half) cos | sin tables (rope_table),
        layer l rotated by table layers[l].rope; seq_of (N,): each token's row of seq_lens /
        block_tables. The caller bounds N; the tokens of one sequence may come in several calls,
        in order (each writes its K/V first)."""
        cdef float[:, ::1] xv = x
        cdef Py_ssize_t N = xv.shape[0], D = self.D, H = self.H, KVH = self.KVH, Dh = self.Dh
        cdef Py_ssize_t F = self.F, W = KVH * Dh, l, t
        if last < 0:
            last = self.n_layers
        if not 0 <= first <= last <= self.n_layers:
            raise ValueError(f"layers [{first}, {last}) outside 0..{self.n_layers}")
        if xv.shape[1] != D:
            raise ValueError(f"x has width {xv.shape[1]}, the stack {D}")
        if (kv.dtype not in (np.float32, np.float16) or not kv.flags.c_contiguous or kv.ndim != 6
                or kv.shape[0] != self.n_layers or kv.shape[1] != 2 or kv.shape[4] != KVH
                or kv.shape[5] != Dh):
            raise ValueError("DecoderStack needs C-contiguous (L, 2, NB, BS, KVH, Dh) pools")
        if N == 0 or first == last:
            return x
        cdef int64_t[::1] pos = np.ascontiguousarray(positions, dtype=np.int64)
        cdef int64_t[::1] slot = np.ascontiguousarray(slots, dtype=np.int64)
        cdef int64_t[::1] sq = np.ascontiguousarray(seq_of, dtype=np.int64)
        cdef int64_t[::1] lens = np.ascontiguousarray(seq_lens, dtype=np.int64)
        cdef int32_t[:, ::1] tables = np.ascontiguousarray(block_tables, dtype=np.int32)
        if pos.shape[0] != N or slot.shape[0] != N or sq.shape[0] != N:
            raise ValueError(f"positions / slots / seq_of do not describe {N} tokens")
        n_slots = kv.shape[2] * kv.shape[3]
        if np.min(slots) < 0 or np.max(slots) >= n_slots:
            raise IndexError(f"KV slot out of range [0, {n_slots})")
        cdef const float *cs[MAX_ROPES]
        cdef Py_ssize_t half[MAX_ROPES]
        cdef float[:, ::1] tv
        tabs = [np.ascontiguousarray(table, dtype=np.float32) for table in rope_tables]
        if not 0 < len(tabs) <= MAX_ROPES:
            raise ValueError(f"1..{MAX_ROPES} rope tables, got {len(tabs)}")
        for t in range(len(tabs)):
            tv = tabs[t]
            if tv.shape[0] != N or tv.shape[1] % 2 or tv.shape[1] > Dh:
                raise ValueError(f"rope table {t} has shape {tabs[t].shape} for {N} tokens, Dh {Dh}")
            cs[t], half[t] = &tv[0, 0], tv.shape[1] // 2
        for l in range(first, last):
            if self.layers[l].rope >= len(tabs):
                raise ValueError(f"layer {l} needs rope table {self.layers[l].rope}")
        q = np.empty((N, H, Dh), np.float32)
        k = np.empty((N, KVH, Dh), np.float32)
        v = np.empty((N, KVH, Dh), np.float32)
        cdef float[:, :, ::1] qv = q
        cdef float[:, ::1] hv = np.empty((N, D), np.float32)
        cdef float[:, ::1] kv2 = k.reshape(N, W), vv2 = v.reshape(N, W)
        cdef float[:, ::1] gate = np.empty((N, max(F, 1)), np.float32)
        cdef float[:, ::1] up = np.empty((N, max(F, 1)), np.float32)
        cdef size_t kv_addr = kv.ctypes.data
        cdef int kv_f16 = kv.dtype == np.float16
        cdef int64_t n_spans = _attn_spans(N, KVH, int(np.max(seq_lens)))
        cdef Py_ssize_t NB = kv.shape[2], BS = kv.shape[3]
        cdef int rc
        with nogil:
            rc = self._run(&xv[0, 0], N, <char *>kv_addr, kv_f16, NB, BS, pos,
                           slot, sq, lens, tables, cs, half, _isa, first, last, n_spans, qv, kv2,
                           vv2, &hv[0, 0], &gate[0, 0], &up[0, 0])
        if rc != 0:
            raise MemoryError("DecoderStack: out of memory (quantized activations or attention)")
        return x

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef int _run(self, float *x, Py_ssize_t N, char *kv, int kv_f16, Py_ssize_t NB, Py_ssize_t BS,
                  const int64_t[::1] positions, const int64_t[::1] slots, const int64_t[::1] seq_of,
                  const int64_t[::1] seq_lens, const int32_t[:, ::1] block_tables,
                  const float **cs, Py_ssize_t *half, int isa, Py_ssize_t first, Py_ssize_t last,
                  int64_t n_spans, float[:, :, ::1] q, float[:, ::1] k, float[:, ::1] v, float *h,
                  float *gate, float *up) noexcept nogil:
        cdef Py_ssize_t D = self.D, H = self.H, KVH = self.KVH, Dh = self.Dh, F = self.F, l
        cdef Py_ssize_t W = KVH * Dh, QW = H * Dh
        cdef Py_ssize_t pool_bytes = NB * BS * W * (2 if kv_f16 else 4)
        cdef float *qp = &q[0, 0, 0]
        cdef float *out[3]
        cdef _Layer *lw
        cdef char *kp
        cdef char *vp
        for l in range(first, last):
            lw = &self.layers[l]
            # attention ----------------------------------------------------------------------
            _rms_ptr(x, lw.attn_norm, h, N, D, self.eps)
            out[0], out[1], out[2] = qp, &k[0, 0], &v[0, 0]
            if _matmuls(h, N, D, lw, W_Q, 3, out, isa):
                return -1
            if lw.q_bias != NULL:  # Qwen2's q/k/v bias
                _add_rows(qp, lw.q_bias, N, QW)
                _add_rows(&k[0, 0], lw.k_bias, N, W)
                _add_rows(&v[0, 0], lw.v_bias, N, W)
            if lw.q_norm != NULL:  # Qwen3 / Gemma 3 normalize each head before rotating it
                _rms_ptr(qp, lw.q_norm, qp, N * H, Dh, self.eps)
                _rms_ptr(&k[0, 0], lw.k_norm, &k[0, 0], N * KVH, Dh, self.eps)
            if half[lw.rope]:
                _rope_ptr(qp, N, H, Dh, cs[lw.rope], half[lw.rope])
                _rope_ptr(&k[0, 0], N, KVH, Dh, cs[lw.rope], half[lw.rope])
            kp = kv + 2 * l * pool_bytes
            vp = kp + pool_bytes
            _write_kv(kp, kv_f16, k, slots)
            _write_kv(vp, kv_f16, v, slots)
            # attention's output overwrites its queries (each work item reads its heads' first)
            if _paged_attention(q, kp, vp, kv_f16, BS, KVH, Dh, BS * W, W, seq_of, seq_lens,
                                positions, block_tables, self.scale, lw.window, n_spans, q):
                return -1
            out[0] = h
            if _matmuls(qp, N, QW, lw, W_O, 1, out, isa):
                return -1
            if lw.post_attn_norm != NULL:
                _rms_ptr(h, lw.post_attn_norm, h, N, D, self.eps)
            ts_axpy(x, 1.0, h, N * D)
            if not lw.has_ffn:
                continue
            # gated feed-forward (SwiGLU / GeGLU) --------------------------------------------
            _rms_ptr(x, lw.ffn_norm, h, N, D, self.eps)
            out[0], out[1] = gate, up
            if _matmuls(h, N, D, lw, W_GATE, 2, out, isa):
                return -1
            _act_mul(self.act, gate, up, gate, N, F)
            out[0] = h
            if _matmuls(gate, N, F, lw, W_DOWN, 1, out, isa):
                return -1
            if lw.post_ffn_norm != NULL:
                _rms_ptr(h, lw.post_ffn_norm, h, N, D, self.eps)
            ts_axpy(x, 1.0, h, N * D)
        return 0
