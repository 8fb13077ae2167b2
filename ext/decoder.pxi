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
# an MLA layer's attention matrices in the first slots: the latent's, the one its query reads
# from x (q LoRA's down-projection, else the query itself), q LoRA's up-projection (or empty)
DEF W_KV_A = 0
DEF W_Q_IN = 1
DEF W_Q_B = 2
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
    const float *q_a_norm  # MLA: (q_lora,), or NULL without q LoRA
    const float *kv_a_norm  # MLA: (r,) the latent's norm
    const float *q_absorb  # MLA: (H, dr + r, dr + dn), W_UK absorbed into each query head
    const float *v_up  # MLA: (H, dv, r), W_UV


cdef inline void _rms_ptr(const float *x, const float *w, float *out, Py_ssize_t N, Py_ssize_t D,
                          float eps) noexcept nogil:
    cdef _RowJob job
    job.a, job.b, job.out, job.N, job.D, job.eps = x, w, out, N, D, eps
    _rows_run(&job, N * D, _rms_task)


cdef inline void _rms_ld(float *x, const float *w, Py_ssize_t N, Py_ssize_t D, Py_ssize_t ld,
                         float eps) noexcept nogil:
    """In place: N rows of D numbers, ld apart."""
    cdef _RowJob job
    job.b, job.out, job.N, job.D, job.ld, job.eps = w, x, N, D, ld, eps
    _rows_run(&job, N * D, _rms_ld_task)


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


cdef struct _Scratch:
    float *h  # (N, D): the normed stream, then each sublayer's output
    float *gate  # (N, F)
    float *up  # (N, F)
    float *qf  # MLA: (N, H * (dr + dn)) the queries before absorption
    float *qa  # MLA: (N, q_lora) q LoRA's middle
    float *ov  # MLA: (N, H * dv) the value heads


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
    """A pre-norm decoder's layers as C structs over the spec's own (quantized) weights: GQA
    layers, or (`mla` given) DeepSeek's multi-head latent attention, absorbed.

    run() takes the residual stream (N, D) through layers [first, last) in place. Made by
    tinyserve/backends/cpu_decoder.py from a Decoder spec; `keep` holds every array the structs
    point into. An MLA stack caches one latent "head" per token: KVH 1, Dh = dr + r."""

    cdef _Layer *layers
    cdef readonly Py_ssize_t n_layers, D, H, KVH, Dh, F
    cdef readonly Py_ssize_t dr, dn, dv, r, q_lora  # MLA's widths (0 for GQA)
    cdef readonly bint mla
    cdef readonly int act
    cdef float eps, scale
    cdef object keep

    def __cinit__(self, list layers, Py_ssize_t D, Py_ssize_t H, Py_ssize_t KVH, Py_ssize_t Dh,
                  Py_ssize_t F, int act, float eps, float scale, dict mla=None):
        """layers: per layer a dict with "w" (7 (address, row bytes, qtype, rows) tuples), the
        norm / bias / q-k norm float32 arrays or None, "window", "rope", "has_ffn"; MLA layers
        also "q_a_norm", "kv_a_norm", "q_absorb", "v_up". mla: {"dr", "dn", "dv", "r", "q_lora"}
        (rope dims, no-rope query dims, value dims, latent rank, q LoRA rank or 0), or None."""
        cdef Py_ssize_t l
        cdef int j
        cdef _Layer *lw
        self.n_layers, self.D, self.H, self.KVH, self.Dh, self.F = len(layers), D, H, KVH, Dh, F
        self.act, self.eps, self.scale = act, eps, scale
        self.mla = mla is not None
        if self.mla:
            self.dr, self.dn, self.dv, self.r = mla["dr"], mla["dn"], mla["dv"], mla["r"]
            self.q_lora = mla["q_lora"]
            if KVH != 1 or Dh != self.dr + self.r:
                raise ValueError(f"an MLA stack caches one head of dr + r, not {KVH} of {Dh}")
        self.keep = []
        self.layers = <_Layer *>malloc(max(1, len(layers)) * sizeof(_Layer))
        if self.layers == NULL:
            raise MemoryError("DecoderStack: cannot allocate its layer table")
        memset(self.layers, 0, max(1, len(layers)) * sizeof(_Layer))
        shapes = {"attn_norm": (D,), "post_attn_norm": (D,), "ffn_norm": (D,),
                  "post_ffn_norm": (D,), "q_bias": (H * Dh,), "k_bias": (KVH * Dh,),
                  "v_bias": (KVH * Dh,), "q_norm": (Dh,), "k_norm": (Dh,)}
        if self.mla:
            shapes |= {"q_a_norm": (self.q_lora,), "kv_a_norm": (self.r,),
                       "q_absorb": (H, self.dr + self.r, self.dr + self.dn),
                       "v_up": (H, self.dv, self.r)}
        for l, spec in enumerate(layers):
            lw = &self.layers[l]
            for j, (addr, stride, qtype, rows) in enumerate(spec["w"]):
                lw.w[j], lw.ws[j], lw.qt[j], lw.rows[j] = <const uint8_t *><size_t>addr, stride, qtype, rows
            ptrs = {}
            for name, shape in shapes.items():
                v = spec.get(name)
                if v is None:
                    ptrs[name] = 0
                    continue
                v = np.ascontiguousarray(v, dtype=np.float32)
                if v.shape != shape:
                    raise ValueError(f"layer {l} {name} has shape {v.shape}, expected {shape}")
                self.keep.append(v)
                ptrs[name] = v.ctypes.data
            if not ptrs["attn_norm"] or (spec["has_ffn"] and not ptrs["ffn_norm"]):
                raise ValueError(f"layer {l} lacks a norm")
            if self.mla and not (ptrs["kv_a_norm"] and ptrs["q_absorb"] and ptrs["v_up"]
                                 and (ptrs["q_a_norm"] or not self.q_lora)):
                raise ValueError(f"MLA layer {l} lacks its latent norm, absorbed query or W_UV")
            lw.attn_norm = <const float *><size_t>ptrs["attn_norm"]
            lw.post_attn_norm = <const float *><size_t>ptrs["post_attn_norm"]
            lw.ffn_norm = <const float *><size_t>ptrs["ffn_norm"]
            lw.post_ffn_norm = <const float *><size_t>ptrs["post_ffn_norm"]
            lw.q_bias = <const float *><size_t>ptrs["q_bias"]
            lw.k_bias = <const float *><size_t>ptrs["k_bias"]
            lw.v_bias = <const float *><size_t>ptrs["v_bias"]
            lw.q_norm = <const float *><size_t>ptrs["q_norm"]
            lw.k_norm = <const float *><size_t>ptrs["k_norm"]
            lw.q_a_norm = <const float *><size_t>ptrs.get("q_a_norm", 0)
            lw.kv_a_norm = <const float *><size_t>ptrs.get("kv_a_norm", 0)
            lw.q_absorb = <const float *><size_t>ptrs.get("q_absorb", 0)
            lw.v_up = <const float *><size_t>ptrs.get("v_up", 0)
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
        kv: (L, 2, NB, BS, KVH, Dh) pools (MLA: (L, 1, NB, BS, 1, dr + r), the latent);
        rope_tables: (N, 2 * half) cos | sin tables (rope_table), layer l rotated by table
        layers[l].rope; seq_of (N,): each token's row of seq_lens / block_tables. The caller
        bounds N; the tokens of one sequence may come in several calls, in order (each writes
        its K/V first)."""
        cdef float[:, ::1] xv = x
        cdef Py_ssize_t N = xv.shape[0], D = self.D, H = self.H, KVH = self.KVH, Dh = self.Dh
        cdef Py_ssize_t F = self.F, W = KVH * Dh, l, t
        cdef int n_pools = 1 if self.mla else 2
        if last < 0:
            last = self.n_layers
        if not 0 <= first <= last <= self.n_layers:
            raise ValueError(f"layers [{first}, {last}) outside 0..{self.n_layers}")
        if xv.shape[1] != D:
            raise ValueError(f"x has width {xv.shape[1]}, the stack {D}")
        if (kv.dtype not in (np.float32, np.float16) or not kv.flags.c_contiguous or kv.ndim != 6
                or kv.shape[0] != self.n_layers or kv.shape[1] != n_pools or kv.shape[4] != KVH
                or kv.shape[5] != Dh):
            raise ValueError(
                f"DecoderStack needs C-contiguous (L, {n_pools}, NB, BS, {KVH}, {Dh}) pools")
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
        cdef _Scratch sc
        # GQA: q (N, H, Dh), k and v (N, W); MLA: q the absorbed queries (N, H, dr + r), k the
        # latent (N, dr + r), and its own buffers for the query before absorption, q LoRA's
        # middle, the attended latents and the value heads
        q = np.empty((N, H, Dh), np.float32)
        k = np.empty((N, W), np.float32)
        v = np.empty((N, 0 if self.mla else W), np.float32)
        att = np.empty((N, H, self.r), np.float32)
        cdef float[:, :, ::1] qv = q, attv = att
        cdef float[:, ::1] kv2 = k, vv2 = v
        mla_bufs = [np.empty((N, max(n, 1)), np.float32) for n in (
            H * (self.dr + self.dn), self.q_lora, H * self.dv)]
        hv = np.empty((N, D), np.float32)
        gate = np.empty((N, max(F, 1)), np.float32)
        up = np.empty((N, max(F, 1)), np.float32)
        sc.h, sc.gate, sc.up = <float *><size_t>hv.ctypes.data, <float *><size_t>gate.ctypes.data, <float *><size_t>up.ctypes.data
        sc.qf = <float *><size_t>mla_bufs[0].ctypes.data
        sc.qa = <float *><size_t>mla_bufs[1].ctypes.data
        sc.ov = <float *><size_t>mla_bufs[2].ctypes.data
        cdef size_t kv_addr = kv.ctypes.data
        cdef int kv_f16 = kv.dtype == np.float16
        cdef int64_t n_spans = _attn_spans(N, KVH, int(np.max(seq_lens)))
        cdef Py_ssize_t NB = kv.shape[2], BS = kv.shape[3]
        cdef int rc
        with nogil:
            rc = self._run(&xv[0, 0], N, <char *>kv_addr, n_pools, kv_f16, NB, BS, pos, slot, sq,
                           lens, tables, cs, half, _isa, first, last, n_spans, qv, kv2, vv2, attv,
                           &sc)
        if rc != 0:
            raise MemoryError("DecoderStack: out of memory (quantized activations or attention)")
        return x

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef int _run(self, float *x, Py_ssize_t N, char *kv, int n_pools, int kv_f16, Py_ssize_t NB,
                  Py_ssize_t BS, const int64_t[::1] positions, const int64_t[::1] slots,
                  const int64_t[::1] seq_of, const int64_t[::1] seq_lens,
                  const int32_t[:, ::1] block_tables, const float **cs, Py_ssize_t *half, int isa,
                  Py_ssize_t first, Py_ssize_t last, int64_t n_spans, float[:, :, ::1] q,
                  float[:, ::1] k, float[:, ::1] v, float[:, :, ::1] att,
                  _Scratch *sc) noexcept nogil:
        cdef Py_ssize_t D = self.D, F = self.F, l
        cdef Py_ssize_t pool_bytes = NB * BS * self.KVH * self.Dh * (2 if kv_f16 else 4)
        cdef float *h = sc.h
        cdef float *out[2]
        cdef _Layer *lw
        cdef char *kp
        cdef int rc
        for l in range(first, last):
            lw = &self.layers[l]
            # attention: its output (before the residual add) in h --------------------------
            _rms_ptr(x, lw.attn_norm, h, N, D, self.eps)
            kp = kv + n_pools * l * pool_bytes
            if self.mla:
                rc = self._mla_attention(lw, N, kp, kv_f16, BS, positions, slots, seq_of,
                                         seq_lens, block_tables, cs[lw.rope], half[lw.rope], isa,
                                         n_spans, q, k, att, sc)
            else:
                rc = self._gqa_attention(lw, N, kp, kp + pool_bytes, kv_f16, BS, positions, slots,
                                         seq_of, seq_lens, block_tables, cs[lw.rope],
                                         half[lw.rope], isa, n_spans, q, k, v, h)
            if rc:
                return -1
            if lw.post_attn_norm != NULL:
                _rms_ptr(h, lw.post_attn_norm, h, N, D, self.eps)
            ts_axpy(x, 1.0, h, N * D)
            if not lw.has_ffn:
                continue
            # gated feed-forward (SwiGLU / GeGLU) --------------------------------------------
            _rms_ptr(x, lw.ffn_norm, h, N, D, self.eps)
            out[0], out[1] = sc.gate, sc.up
            if _matmuls(h, N, D, lw, W_GATE, 2, out, isa):
                return -1
            _act_mul(self.act, sc.gate, sc.up, sc.gate, N, F)
            out[0] = h
            if _matmuls(sc.gate, N, F, lw, W_DOWN, 1, out, isa):
                return -1
            if lw.post_ffn_norm != NULL:
                _rms_ptr(h, lw.post_ffn_norm, h, N, D, self.eps)
            ts_axpy(x, 1.0, h, N * D)
        return 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef int _gqa_attention(self, _Layer *lw, Py_ssize_t N, char *kp, char *vp, int kv_f16,
                            Py_ssize_t BS, const int64_t[::1] positions,
                            const int64_t[::1] slots, const int64_t[::1] seq_of,
                            const int64_t[::1] seq_lens, const int32_t[:, ::1] block_tables,
                            const float *cs, Py_ssize_t half, int isa, int64_t n_spans,
                            float[:, :, ::1] q, float[:, ::1] k, float[:, ::1] v,
                            float *h) noexcept nogil:
        """h (N, D), the normed stream -> h: grouped-query attention's output projection."""
        cdef Py_ssize_t D = self.D, H = self.H, KVH = self.KVH, Dh = self.Dh
        cdef Py_ssize_t W = KVH * Dh, QW = H * Dh
        cdef float *qp = &q[0, 0, 0]
        cdef float *out[3]
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
        if half:
            _rope_ptr(qp, N, H, Dh, cs, half)
            _rope_ptr(&k[0, 0], N, KVH, Dh, cs, half)
        _write_kv(kp, kv_f16, k, slots)
        _write_kv(vp, kv_f16, v, slots)
        # attention's output overwrites its queries (each work item reads its heads' first)
        if _paged_attention(q, kp, vp, kv_f16, BS, KVH, Dh, BS * W, W, seq_of, seq_lens,
                            positions, block_tables, self.scale, lw.window, n_spans, q, isa):
            return -1
        out[0] = h
        return _matmuls(qp, N, QW, lw, W_O, 1, out, isa)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef int _mla_attention(self, _Layer *lw, Py_ssize_t N, char *kp, int kv_f16, Py_ssize_t BS,
                            const int64_t[::1] positions, const int64_t[::1] slots,
                            const int64_t[::1] seq_of, const int64_t[::1] seq_lens,
                            const int32_t[:, ::1] block_tables, const float *cs, Py_ssize_t half,
                            int isa, int64_t n_spans, float[:, :, ::1] q, float[:, ::1] lat,
                            float[:, :, ::1] att, _Scratch *sc) noexcept nogil:
        """sc.h (N, D), the normed stream -> sc.h: multi-head latent attention, absorbed, over
        the layer's latent pool kp (the model file's attention, step for step)."""
        cdef Py_ssize_t D = self.D, H = self.H, dr = self.dr, r = self.r, dv = self.dv
        cdef Py_ssize_t L = dr + r, QK = dr + self.dn
        cdef float *lp = &lat[0, 0]
        cdef float *out[2]
        # the latent [k_rope, c_kv], and the query (or q LoRA's down-projection): both read h
        out[0], out[1] = lp, (sc.qa if self.q_lora else sc.qf)
        if _matmuls(sc.h, N, D, lw, W_KV_A, 2, out, isa):
            return -1
        if self.q_lora:
            _rms_ptr(sc.qa, lw.q_a_norm, sc.qa, N, self.q_lora, self.eps)
            out[0] = sc.qf
            if _matmuls(sc.qa, N, self.q_lora, lw, W_Q_B, 1, out, isa):
                return -1
        _rms_ld(lp + dr, lw.kv_a_norm, N, r, L, self.eps)  # c_kv's norm; k_rope keeps its scale
        if half:  # each query head's and the latent's first dr dims
            _rope_ptr(sc.qf, N, H, QK, cs, half)
            _rope_ptr(lp, N, 1, L, cs, half)
        _write_kv(kp, kv_f16, lat, slots)
        ts_head_matmul(sc.qf, N, H, QK, lw.q_absorb, L, &q[0, 0, 0], _threads_for(N * H * L * QK))
        # an MQA over the pool: keys its rows, values their c_kv part, read in place
        if _paged_attention(q, kp, kp + dr * (2 if kv_f16 else 4), kv_f16, BS, 1, r, BS * L, L,
                            seq_of, seq_lens, positions, block_tables, self.scale, 0, n_spans,
                            att, isa):
            return -1
        ts_head_matmul(&att[0, 0, 0], N, H, r, lw.v_up, dv, sc.ov, _threads_for(N * H * dv * r))
        out[0] = sc.h
        return _matmuls(sc.ov, N, H * dv, lw, W_O, 1, out, isa)
