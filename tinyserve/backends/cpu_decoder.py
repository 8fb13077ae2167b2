"""The cpu backend's lowering of a Decoder spec: its layer stack in one native call.

At batch 1 a Python call per op per layer costs more than the arithmetic, so the layers of a
models.spec.Decoder run in kernels.DecoderStack (ext/decoder.pxi): the spec's own quantized
matrices read in place (a fused qkv or gate_up matrix is row ranges of its blocks), norms, biases,
q/k norms, rope, paged attention (GQA, or MLA absorbed over its latent cache), the gated
feed-forward. A mixture-of-experts layer's attention
runs there too; its routed feed-forward runs here through the ops (tokens grouped by expert,
experts kept quantized). Everything else (embedding, the final norm, the head, the soft-cap) is
the op set's. tests/test_cpu_backend.py holds this route and the model file to the same logits.
"""

from __future__ import annotations

import numpy as np

from ..models.spec import GQA, MLA, Decoder, DecoderLayer, GatedMLP, MoE, Rope
from ..step import StepMeta
from . import native
from .lowering import NotLowerable
from .memory import FileRows, off_file, trim_heap

# Tokens per pass through the stack: bounds a prefill's activations (a few MB at 256 rows of a
# small model) while leaving the matmuls rows enough for BLAS.
LAYERS_CHUNK = 256
# A step of this many tokens frees megabytes of activations, and every TRIM_EVERY-th step frees the
# small pieces decode steps leave: both hand the freed heap back (memory.trim_heap).
TRIM_MIN_TOKENS = 256
TRIM_EVERY = 16


class CpuDecoder:
    """A Decoder spec on kernels.DecoderStack. (step, (L, P, NB, BS, KVH, Dh) pools) -> logits."""

    name = "cpu native decoder stack"

    def __init__(self, spec: Decoder, backend):
        if native.kernels is None:
            raise NotLowerable("the native kernels are not built")
        self.spec, self.ops = spec, backend.ops
        kinds = {type(layer.attn) for layer in spec.layers}
        if len(kinds) != 1 or not kinds <= {GQA, MLA}:
            raise NotLowerable(f"attention {', '.join(sorted(k.__name__ for k in kinds))}")
        mla = _mla_widths(spec) if kinds == {MLA} else None
        H = spec.n_heads
        # an MLA stack caches one "head" of the latent [k_rope, c_kv] per token
        KVH, Dh = (1, mla["dr"] + mla["r"]) if mla else (spec.n_kv_heads, spec.head_dim)
        self.ropes: list[Rope] = []
        layers, acts, ffn_sizes, scales = [], set(), set(), set()
        for i, layer in enumerate(spec.layers):
            try:
                entry = self._mla_layer(layer, mla) if mla else self._layer(layer, H * Dh, KVH * Dh)
            except NotLowerable as e:
                raise NotLowerable(f"layer {i}: {e}") from None
            # the stack reads the norms and biases every step: off the file (memory.off_file),
            # or each read would map back the pages of the matrices beside them
            layers.append({k: off_file(v) for k, v in entry.items()})
            scales.add(layer.attn.scale)
            if isinstance(layer.ffn, GatedMLP):
                acts.add(layer.ffn.act)
                ffn_sizes.add(layers[-1]["w"][4][3])
        if len(scales) != 1 or len(acts) > 1 or len(ffn_sizes) > 1:
            raise NotLowerable("layers differ in softmax scale, activation or feed-forward size")
        act = acts.pop() if acts else "silu"
        if act not in native.kernels.ACTIVATIONS:
            raise NotLowerable(f"activation {act!r}")
        self.moe_layers = [i for i, layer in enumerate(spec.layers) if isinstance(layer.ffn, MoE)]
        # the norms the op set applies between and after the stack's runs, off the file too
        self.norm = off_file(spec.norm)
        self.moe_norms = {
            i: (off_file(spec.layers[i].ffn_norm), off_file(spec.layers[i].post_ffn_norm))
            for i in self.moe_layers
        }
        self.stack = native.kernels.DecoderStack(
            layers,
            spec.embed.shape[1],
            H,
            KVH,
            Dh,
            ffn_sizes.pop() if ffn_sizes else 0,
            native.kernels.ACTIVATIONS[act],
            spec.norm_eps,
            scales.pop(),
            mla,
        )
        head = spec.lm_head
        self.argmax_head = native.is_quant(head) and native.quant_supports(head.qtype)
        # the embedding's rows read from its file where it is one (memory.FileRows): lookups
        # through the mapping would fault most of it back in beside its packed copy
        self.embed_rows = FileRows.of(spec.embed.data) if native.is_quant(spec.embed) else None
        self.n_steps = 0
        # built at the first forward, after building the model freed heap it no longer needs
        # (packing's pieces, loading's copies): hand it back before the KV pages come in
        trim_heap()

    # -- building the stack ---------------------------------------------------------------------

    def _layer(self, layer: DecoderLayer, q_size: int, kv_size: int) -> dict:
        attn: GQA = layer.attn
        w = _rows_of(attn.qkv, (q_size, kv_size, kv_size), "qkv") + _rows_of((attn.o,), None, "o")
        bias = _biases(attn.qkv, (q_size, kv_size, kv_size))
        if attn.o.b is not None:
            raise NotLowerable("o has a bias")
        return {
            **self._entry(layer, w),
            "q_bias": bias[0],
            "k_bias": bias[1],
            "v_bias": bias[2],
            "q_norm": attn.q_norm,
            "k_norm": attn.k_norm,
            "window": attn.window or 0,
        }

    def _mla_layer(self, layer: DecoderLayer, mla: dict) -> dict:
        """An MLA layer's matrices in DecoderStack's slots: the latent's, the one its query reads
        from x (q LoRA's down-projection, else q itself), q LoRA's up-projection, o."""
        attn: MLA = layer.attn
        H, D = self.spec.n_heads, self.spec.embed.shape[1]
        q_width = H * (mla["dr"] + mla["dn"])
        # (matrix, its (rows, cols)): the stack's buffers are sized by these
        shapes = [(attn.kv_a, (mla["dr"] + mla["r"], D)), (attn.o, (D, H * mla["dv"]))]
        if attn.q_a is None:
            shapes.append((attn.q_b, (q_width, D)))
        else:
            shapes += [(attn.q_a, (mla["q_lora"], D)), (attn.q_b, (q_width, mla["q_lora"]))]
        for lin, shape in shapes:
            if lin.b is not None:
                raise NotLowerable("an MLA projection has a bias")
            if _rows(lin.w, "an MLA projection") != shape:
                raise NotLowerable(f"an MLA projection is {lin.w.shape}, expected {shape}")
        lins = [attn.kv_a, attn.q_a or attn.q_b] + ([attn.q_b] if attn.q_a else [])
        w = _rows_of(lins, None, "MLA's projections")
        if attn.q_a is None:
            w.append((0, 0, 0, 0))
        w += _rows_of((attn.o,), None, "o")
        return {
            **self._entry(layer, w),
            "q_a_norm": attn.q_a_norm,
            "kv_a_norm": attn.kv_a_norm,
            "q_absorb": attn.q_absorb,
            "v_up": attn.v_up,
            "window": 0,
        }

    def _entry(self, layer: DecoderLayer, w: list) -> dict:
        """What a layer of either attention kind gives the stack: its attention's matrices then
        the feed-forward's, its four norms, its rope table, whether the stack runs its FFN."""
        return {
            "w": w + _ffn_rows(layer.ffn),
            "attn_norm": layer.attn_norm,
            "post_attn_norm": layer.post_attn_norm,
            "ffn_norm": layer.ffn_norm,
            "post_ffn_norm": layer.post_ffn_norm,
            "rope": self._rope_index(layer.attn.rope),
            "has_ffn": isinstance(layer.ffn, GatedMLP),
        }

    def _rope_index(self, rope: Rope) -> int:
        for i, known in enumerate(self.ropes):
            if known is rope:
                return i
        if len(self.ropes) == native.kernels.MAX_ROPE_TABLES:
            raise NotLowerable("more rope tables than the stack takes")
        self.ropes.append(rope)
        return len(self.ropes) - 1

    # -- per step -------------------------------------------------------------------------------

    def rope_tables(self, positions: np.ndarray, seq_lens: np.ndarray) -> list[np.ndarray]:
        """Per distinct rope, (N, 2 * R/2) cos | sin of each token's angles, computed once for
        every layer: LongRoPE's long frequencies for tokens of sequences past original_len, the
        attention factor folded into cos and sin (it scales the rotated dims)."""
        tables = []
        for rope in self.ropes:
            table = native.kernels.rope_table(positions, rope.inv_freq)  # (N, R)
            if rope.inv_freq_long is not None:
                long = np.flatnonzero(seq_lens > rope.original_len)
                if len(long):
                    table[long] = native.kernels.rope_table(positions[long], rope.inv_freq_long)
            if rope.scale != 1.0:
                table *= np.float32(rope.scale)
            tables.append(table)
        return tables

    def hidden(self, step: StepMeta, pools: np.ndarray) -> np.ndarray:
        """(R, D): the final-normed residual rows of step.logits_rows."""
        spec, ops, b = self.spec, self.ops, step.batch
        n, rows = b.n_tokens, b.logits_rows
        if n == 0:
            return np.zeros((0, spec.embed.shape[1]), np.float32)
        seq_lens = step.seq_len_of_tokens()  # (N,)
        hidden, order = [], []  # per chunk: the residual rows we sample from, their places in rows
        # At most LAYERS_CHUNK tokens go through the stack at a time, embedded chunk by chunk: a
        # chunk writes its K/V before the next one attends to them (causal by position), so the
        # result is the same, and only the logits rows of each chunk are kept.
        for c0 in range(0, n, LAYERS_CHUNK):
            c1 = min(c0 + LAYERS_CHUNK, n)
            x = self._embed(b.token_ids[c0:c1])  # (C, D)
            if spec.embed_scale != 1.0:
                x *= np.float32(spec.embed_scale)  # (C, D)
            args = (
                pools,
                b.positions[c0:c1],
                b.slots[c0:c1],
                step.seq_of[c0:c1],
                b.seq_lens,
                b.block_tables,
                self.rope_tables(b.positions[c0:c1], seq_lens[c0:c1]),
            )
            first = 0
            for moe_layer in self.moe_layers:  # the stack up to and including its attention
                self.stack.run(x, *args, first, moe_layer + 1)
                self._moe_ffn(x, spec.layers[moe_layer].ffn, *self.moe_norms[moe_layer])
                first = moe_layer + 1
            self.stack.run(x, *args, first, len(spec.layers))
            at = np.flatnonzero((rows >= c0) & (rows < c1))
            keep = rows[at] - c0
            whole = len(keep) == len(x) and bool((keep == np.arange(len(x))).all())
            hidden.append(x if whole else x[keep])
            order.append(at)
        x = hidden[0] if len(hidden) == 1 else np.concatenate(hidden)
        if len(hidden) > 1:  # back in logits_rows' order
            x = x[np.argsort(np.concatenate(order), kind="stable")]  # (R, D)
        return ops.rms_norm(x, self.norm, spec.norm_eps)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """(C,) -> (C, D) float32 embedding rows."""
        embed = self.spec.embed
        if self.embed_rows is None:
            return np.ascontiguousarray(self.ops.embedding(ids, embed), np.float32)
        blocks = self.embed_rows.take(ids)  # (C, bytes per row): row j is token ids[j]'s
        return native.kernels.dequantize_rows(
            blocks, int(embed.qtype), embed.shape[1], np.arange(len(blocks))
        )

    def _moe_ffn(self, x: np.ndarray, moe: MoE, ffn_norm, post_ffn_norm) -> None:
        """x (C, D) += the layer's routed (and shared) experts, in place."""
        ops, eps = self.ops, self.spec.norm_eps
        h = ops.rms_norm(x, ffn_norm, eps)  # (C, D)
        ids, weights = moe.route(np.asarray(ops.matmul(h, moe.router)))  # (C, K) each
        y = ops.moe(h, ids, weights, moe.experts, act=moe.act)  # (C, D)
        if moe.shared is not None:
            y = y + _gated_mlp(ops, h, moe.shared)
        if post_ffn_norm is not None:
            y = ops.rms_norm(y, post_ffn_norm, eps)
        x += y

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(R, D) final-normed rows -> (R, V) float32 logits."""
        logits = np.asarray(self.ops.matmul(x, self.spec.lm_head), dtype=np.float32)
        cap = self.spec.logit_softcap
        return logits if cap is None else self.ops.softcap(logits, cap)

    def argmax(self, x: np.ndarray) -> np.ndarray:
        """(R, D) -> (R,) the head's argmax from the kernel, no (R, V) logits (the soft-cap is
        monotonic: it moves no maximum)."""
        head = self.spec.lm_head
        data, qtype = native.matmul_operand(head)
        return native.kernels.matmul_q_argmax(x, data, qtype, head.shape[1])

    def after_step(self, n_tokens: int) -> None:
        self.n_steps += 1
        if n_tokens >= TRIM_MIN_TOKENS or self.n_steps % TRIM_EVERY == 0:
            trim_heap()


def _mla_widths(spec: Decoder) -> dict:
    """DecoderStack's MLA widths, read off the first layer's matrices: dr (rope dims), dn (the
    query's other dims), dv (value dims), r (latent rank), q_lora (0 without q LoRA)."""
    attn: MLA = spec.layers[0].attn
    _, dr_r, qk = attn.q_absorb.shape
    r = attn.kv_a_norm.shape[0]
    return {
        "dr": dr_r - r,
        "dn": qk - (dr_r - r),
        "dv": attn.v_up.shape[1],
        "r": r,
        "q_lora": 0 if attn.q_a is None else attn.q_a_norm.shape[0],
    }


def _ffn_rows(ffn) -> list[tuple[int, int, int, int]]:
    """gate, up, down in DecoderStack's slots; empty for a mixture (run by the ops in between)."""
    if isinstance(ffn, MoE):
        return [(0, 0, 0, 0)] * 3
    if not isinstance(ffn, GatedMLP):
        raise NotLowerable(f"feed-forward {type(ffn).__name__}")
    if any(lin.b is not None for lin in (*ffn.gate_up, ffn.down)):
        raise NotLowerable("the feed-forward has a bias")
    F = _rows(ffn.down.w, "down")[1]  # the down matrix's input width
    return _rows_of(ffn.gate_up, (F, F), "gate_up") + _rows_of((ffn.down,), None, "down")


def _rows(w, what: str) -> tuple[int, int]:
    """(rows, cols) of a matrix the stack can read in place, else NotLowerable."""
    if not native.is_quant(w) or not native.quant_supports(w.qtype):
        raise NotLowerable(f"{what} is not in a quantized type the native matmul reads")
    if w.data.ndim != 2 or w.data.strides[1] != 1:
        raise NotLowerable(f"{what}'s blocks are not stored row by row")
    return int(w.shape[0]), int(w.shape[1])


def _rows_of(lins, sizes, what: str) -> list[tuple[int, int, int, int]]:
    """(address, stride, qtype code, rows) of each part: one entry per Linear, or a fused Linear
    cut into row ranges of `sizes` (its blocks stay where they are). A packed matrix is read as
    its groups of 8 rows (stride: bytes per group), unless a cut falls inside a group."""
    if sizes is None or len(lins) == len(sizes):
        parts = []
        for lin in lins:
            rows, _ = _rows(lin.w, what)
            d, code = native.matmul_operand(lin.w)
            parts.append((d.ctypes.data, d.strides[0], code, rows))
        return parts
    (lin,) = lins
    rows, _ = _rows(lin.w, what)
    if rows != sum(sizes):
        raise NotLowerable(f"{what} has {rows} rows, expected {sum(sizes)}")
    d, code = native.matmul_operand(lin.w)
    per = rows // d.shape[0]  # weight rows per row of d: 8 when packed
    if any(size % per for size in sizes):
        d, code, per = lin.w.data, int(lin.w.qtype), 1
    parts, start = [], 0
    for size in sizes:
        parts.append((d.ctypes.data + start // per * d.strides[0], d.strides[0], code, size))
        start += size
    return parts


def _biases(lins, sizes) -> tuple:
    """(q, k, v) biases as float32 arrays, or (None,) * 3 when there are none."""
    if len(lins) == 1:
        b = lins[0].b
        if b is None:
            return (None,) * 3
        b, cuts = np.asarray(b, np.float32), np.cumsum(sizes)[:-1]
        return tuple(np.split(b, cuts))
    have = [lin.b is not None for lin in lins]
    if not any(have):
        return (None,) * 3
    return tuple(
        np.zeros(n, np.float32) if lin.b is None else np.asarray(lin.b, np.float32)
        for lin, n in zip(lins, sizes)
    )


def _gated_mlp(ops, x, mlp: GatedMLP):
    """(N, D) -> (N, D) through the op set (a mixture's shared experts)."""
    act_mul = ops.silu_mul if mlp.act == "silu" else ops.gelu_tanh_mul
    if len(mlp.gate_up) == 1:
        gu = ops.matmul(x, mlp.gate_up[0].w)  # (N, 2F)
        F = gu.shape[1] // 2
        return ops.matmul(act_mul(gu[:, :F], gu[:, F:]), mlp.down.w)
    gate, up = mlp.gate_up
    return ops.matmul(act_mul(ops.matmul(x, gate.w), ops.matmul(x, up.w)), mlp.down.w)
