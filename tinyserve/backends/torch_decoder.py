"""The torch backend's lowering of a Decoder spec: the model file's maths in fewer kernels.

A decode step on a GPU is bound by the host (Python and one launch per op), not by the device. So
for a model declaring a models.spec.Decoder the torch backend runs this instead of the model's
op-by-op forward, over the very tensors the model holds (nothing copied, nothing rewritten):

- rope's cos / sin computed once per step on the host (float64 angles, as NumpyOps; LongRoPE's
  long frequencies per token, its attention factor folded in), shipped with the step's index arrays
  in one copy, and applied to q and k of a layer in one rotation;
- the additive attention mask (one per distinct window) and the block-gather index built once per
  step, not per layer;
- the residual adds fused into the output projections (addmm) where there is no post-norm;
- decode steps (one new token per sequence) view q in place: no padding scatter, no gather back;
- a fused qkv / gate_up matrix (Phi-3) is one matmul; separate q, k, v are three.

Multi-head latent attention (DeepSeek-V3, Kimi-K2) runs as the model file's absorbed form: one
MQA of the H absorbed queries over the latent pool, its values the latent's c_kv part, the
per-head absorptions batched matmuls.

Mixture-of-experts layers route on the host and run their experts through TorchOps.moe, as the
model file does. Same weights, same maths; only the rounding order moves (within each dtype's
tolerance). tests/test_torch_backend.py holds this and the op-by-op forward to one answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..models.spec import MLA, Decoder, DecoderLayer, GatedMLP, MoE, Rope
from .lowering import NotLowerable
from .torch_attention import FlashAttnDecode, FlashInferDecode, choose_kernel


@dataclass(slots=True)
class _Layer:
    attn_norm: torch.Tensor  # (D,)
    qkv: list  # [(w, b)]: one fused (q | k | v rows) or three
    q_norm: torch.Tensor | None  # (Dh,)
    k_norm: torch.Tensor | None
    o: torch.Tensor  # (D, H*Dh)
    o_bias: torch.Tensor | None
    post_attn_norm: torch.Tensor | None
    ffn_norm: torch.Tensor
    ffn_norm_f32: torch.Tensor  # the spec's float32 gain: a mixture's router input is normed as
    # the model file norms it (its top-k is a discrete choice that rounding may flip)
    ffn: Any  # GatedMLP or MoE (the spec's)
    post_ffn_norm: torch.Tensor | None
    rope: int  # index into the step's trig tables
    window: int | None
    mla: MLA | None = None  # the spec's latent attention (qkv, q_norm, k_norm, o_bias unused)
    q_a_norm: torch.Tensor | None = None  # MLA's norms in the norm dtype
    kv_a_norm: torch.Tensor | None = None


@dataclass(slots=True)
class _Plan:
    """One step's metadata on the device, shared by every layer."""

    token_ids: torch.Tensor  # (N,)
    slots: torch.Tensor  # (N,) block * BS + offset
    gather: torch.Tensor  # (S*nb,) the blocks each sequence reads, padded with block 0
    logits_rows: torch.Tensor | None  # (R,), None when every token's row is wanted in order
    trig: list  # per rope: (cos, sin) (N, 1, Dh): [cos, cos, 1..] and [-sin, sin, 0..]
    masks: dict  # window -> (S, 1, 1 or T*G, L) additive mask: 0 where allowed, -inf elsewhere
    q_src: torch.Tensor | None  # (S*T,) flat token of each padded query row; None at decode
    out_rows: torch.Tensor | None  # (N,) padded row of each flat token; None at decode
    n_seqs: int  # S
    q_len: int  # T, the longest run of new tokens (1 at decode)
    ctx_len: int  # L = nb * BS, the padded context
    q_pos: torch.Tensor | None = None  # (S, T) position of each padded query row
    paged: Any = None  # a kernel library's decode attention (torch_attention.py); None: SDPA


@dataclass(frozen=True, slots=True)
class StepShape:
    """The sizes a step's plan is laid out by (a captured step fixes them)."""

    n_seqs: int  # S
    n_tokens: int  # N
    q_len: int  # T, the longest run of new tokens
    n_blocks: int  # nb, the blocks each sequence gathers
    ctx_len: int  # L = nb * BS


class TorchDecoder:
    """A Decoder spec on torch. (TorchStep, kv pools) -> logits (R, V) on the device."""

    name = "torch decoder stack"

    def __init__(self, spec: Decoder, backend):
        # tensor parallelism (torch_tp.py): this rank's shard of the spec, all-reduces after the
        # row-parallel products
        self.tp = getattr(backend, "tp", None)
        if self.tp is not None:
            spec = self.tp.shard(spec)
        self.spec, self.ops = spec, backend.ops
        dt = self.ops.dtype
        # float32 norms keep NumpyOps' formula exactly; narrow dtypes hand the fused kernel its dtype
        self.norm_dtype = torch.float32 if dt == torch.float32 else dt
        self.ropes: list[Rope] = []
        kinds = {type(layer.attn) for layer in spec.layers}
        if len(kinds) != 1:
            raise NotLowerable("layers of more than one attention kind")
        self.mla = kinds == {MLA}
        if self.mla:  # one latent "kv head" of dr + r that all H query heads share
            first: MLA = spec.layers[0].attn
            self.kv_width = first.q_absorb.shape[1]  # dr + r
            self.q_width = first.q_absorb.shape[2]  # dr + dn
            self.rope_dims = self.kv_width - first.kv_a_norm.shape[0]  # dr
            self.n_kv_heads, self.trig_width = 1, max(self.kv_width, self.q_width)
        else:
            self.n_kv_heads, self.trig_width = spec.n_kv_heads, spec.head_dim
        self.layers = [self._layer(layer) for layer in spec.layers]
        self.final_norm = self._norm_weight(spec.norm)
        self.windows = sorted({w.window for w in self.layers}, key=lambda w: w or 0)
        # decode attention from a kernel library where one loads (torch_attention.py)
        asked = "sdpa" if self.mla else getattr(backend, "attention", "sdpa")
        self.kernel, self.kernel_reason = choose_kernel(asked, self.ops.device, dt)
        self._flashinfer = None  # its wrapper, made at the first decode step

    def _norm_weight(self, w):
        return None if w is None else w.to(self.norm_dtype)

    def _layer(self, layer: DecoderLayer) -> _Layer:
        attn = layer.attn
        if not isinstance(layer.ffn, (GatedMLP, MoE)):
            raise NotLowerable(f"feed-forward {type(layer.ffn).__name__}")
        if isinstance(attn, MLA):
            return self._mla_layer(layer)
        if 2 * len(attn.rope.inv_freq) > self.spec.head_dim:
            raise NotLowerable("rope rotates more dims than a head has")
        return _Layer(
            **self._shared(layer),
            qkv=[(lin.w, None if lin.b is None else lin.b.to(self.ops.dtype)) for lin in attn.qkv],
            q_norm=self._norm_weight(attn.q_norm),
            k_norm=self._norm_weight(attn.k_norm),
            o_bias=None if attn.o.b is None else attn.o.b.to(self.ops.dtype),
            window=attn.window,
        )

    def _mla_layer(self, layer: DecoderLayer) -> _Layer:
        attn: MLA = layer.attn
        if 2 * len(attn.rope.inv_freq) != self.rope_dims:
            raise NotLowerable("MLA's rope does not rotate exactly its rope dims")
        lins = (attn.q_a, attn.q_b, attn.kv_a, attn.o)
        if any(lin is not None and lin.b is not None for lin in lins):
            raise NotLowerable("an MLA projection has a bias")
        return _Layer(
            **self._shared(layer),
            qkv=[],
            q_norm=None,
            k_norm=None,
            o_bias=None,
            window=None,
            mla=attn,
            q_a_norm=self._norm_weight(attn.q_a_norm),
            kv_a_norm=self._norm_weight(attn.kv_a_norm),
        )

    def _shared(self, layer: DecoderLayer) -> dict:
        """The _Layer fields of either attention kind: norms, o, the feed-forward, the rope."""
        return {
            "attn_norm": self._norm_weight(layer.attn_norm),
            "o": layer.attn.o.w,
            "post_attn_norm": self._norm_weight(layer.post_attn_norm),
            "ffn_norm": self._norm_weight(layer.ffn_norm),
            "ffn_norm_f32": layer.ffn_norm,
            "ffn": layer.ffn,
            "post_ffn_norm": self._norm_weight(layer.post_ffn_norm),
            "rope": self._rope_index(layer.attn.rope),
        }

    def _rope_index(self, rope: Rope) -> int:
        for i, known in enumerate(self.ropes):
            if known is rope:
                return i
        self.ropes.append(rope)
        return len(self.ropes) - 1

    # -- per step -------------------------------------------------------------------------------

    def plan(self, step, block_size: int) -> _Plan:
        """Index arrays and cos / sin built on the host, sent in two copies; masks on the device."""
        shape, ints, trig = self.host_inputs(step, block_size)
        dev, spec = self.ops.device, self.spec
        paged = None
        if self.kernel == "flashinfer" and shape.q_len == 1:  # planned on the host: eager only
            if self._flashinfer is None:
                heads = spec.n_heads, spec.n_kv_heads, spec.head_dim
                scale = spec.layers[0].attn.scale
                self._flashinfer = FlashInferDecode(dev, *heads, scale, self.ops.dtype)
            paged = self._flashinfer.plan(step.batch, block_size)
        return self.device_plan(
            shape,
            step.token_ids,
            step.slots,
            None if step.all_rows else step.logits_rows,
            to_device(ints, dev),
            to_device(trig, dev).to(self.ops.dtype),
            paged,
        )

    def host_inputs(
        self, step, block_size: int, n_blocks: int | None = None
    ) -> tuple[StepShape, np.ndarray, np.ndarray]:
        """The step's shape, its index arrays flat (int64) and its trig tables (float32), on the
        host. n_blocks: the context each sequence gathers, in blocks (default: the longest's)."""
        b = step.batch
        S, T = b.n_seqs, step.max_q_len
        nb = -(-step.max_seq_len // block_size) if n_blocks is None else n_blocks
        shape = StepShape(S, b.n_tokens, T, nb, nb * block_size)
        ints = [b.block_tables[:, :nb]]
        if T > 1:
            out_rows = step.seq_of * T + step.local  # (N,)
            q_src = np.zeros(S * T, dtype=np.int64)  # padding rows copy token 0, masked below
            q_src[out_rows] = np.arange(b.n_tokens)
            ints += [q_src, out_rows]
        q_pos = np.zeros((S, T), dtype=np.int64)  # padding rows look at position 0 only
        q_pos[step.seq_of, step.local] = b.positions
        ints.append(q_pos)
        flat = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in ints])
        return shape, flat, self._trig(step)

    def device_plan(
        self, shape: StepShape, token_ids, slots, logits_rows, ints, trig, paged=None
    ) -> _Plan:
        """The plan from the step's inputs on the device (host_inputs' arrays there): the masks
        (and flash-attn's tables) are made here, so a captured step (torch_graphs.py) remakes
        them at each replay. paged: a kernel library's decode attention planned on the host."""
        spec, dev = self.spec, self.ops.device
        S, T, nb, L, Dh = shape.n_seqs, shape.q_len, shape.n_blocks, shape.ctx_len, self.trig_width
        decode = T == 1
        sizes = [S * nb] + ([] if decode else [S * T, shape.n_tokens]) + [S * T]
        views = list(torch.split(ints, sizes))
        q_pos_t = views[-1].view(S, T)
        k_pos = torch.arange(L, device=dev)  # (L,)
        masks = {}
        for window in self.windows:
            allowed = k_pos <= q_pos_t[:, :, None]  # (S, T, L) causal
            if window is not None:
                allowed &= k_pos > q_pos_t[:, :, None] - window
            mask = torch.zeros(allowed.shape, dtype=self.ops.dtype, device=dev)
            mask.masked_fill_(~allowed, float("-inf"))  # (S, T, L)
            if decode:
                mask = mask.view(S, 1, 1, L)  # one query row per (kv head, group): broadcast
            else:
                G = spec.n_heads // self.n_kv_heads  # query rows ordered (t, g)
                mask = mask[:, None, :, None, :].expand(S, 1, T, G, L).reshape(S, 1, T * G, L)
            masks[window] = mask
        flash_attn = (
            decode and self.kernel == "flash_attn" and FlashAttnDecode.fits(L // nb) is None
        )
        if paged is None and flash_attn:
            scale = spec.layers[0].attn.scale
            paged = FlashAttnDecode(views[0].view(S, nb), q_pos_t[:, 0] + 1, scale)
        return _Plan(
            token_ids=token_ids,
            slots=slots,
            gather=views[0],
            logits_rows=logits_rows,
            trig=[(t[:, None, :Dh], t[:, None, Dh:]) for t in trig],
            masks=masks,
            q_src=None if decode else views[1],
            out_rows=None if decode else views[2],
            n_seqs=S,
            q_len=T,
            ctx_len=L,
            q_pos=q_pos_t,
            paged=paged,
        )

    def _trig(self, step) -> np.ndarray:
        """(n_ropes, N, 2*Dh) float32: per rope [cos, cos, 1...] | [-sin, sin, 0...], so that
        rotating the first R dims in halves is x * c + swap(x) * s; angles in float64 as NumpyOps,
        LongRoPE's long frequencies for tokens past its original context, its factor folded in.
        Dh: the widest head rotated (MLA: its query heads and its latent; each takes a prefix)."""
        b, Dh = step.batch, self.trig_width
        positions = np.asarray(b.positions, np.float64)
        out = []
        for rope in self.ropes:
            inv = np.asarray(self.ops.to_numpy(rope.inv_freq), np.float32)
            angles = positions[:, None] * inv  # (N, R/2)
            if rope.inv_freq_long is not None:
                long = step.seq_len_of_tokens() > rope.original_len
                inv_long = np.asarray(self.ops.to_numpy(rope.inv_freq_long), np.float32)
                angles[long] = positions[long, None] * inv_long
            cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
            cos, sin = cos * np.float32(rope.scale), sin * np.float32(rope.scale)
            N, rest = len(positions), Dh - 2 * inv.shape[0]
            ones, zeros = np.ones((N, rest), np.float32), np.zeros((N, rest), np.float32)
            out.append(np.concatenate([cos, cos, ones, -sin, sin, zeros], axis=1))
        return np.stack(out) if out else np.zeros((0, len(positions), 2 * Dh), np.float32)

    # -- the forward ----------------------------------------------------------------------------

    def __call__(self, step, kv: list[dict[str, Any]]) -> torch.Tensor:
        """A step of N tokens -> logits (R, V) for its logits_rows, on the device."""
        return self.logits(self.plan(step, block_size(kv)), kv)

    def logits(self, m: _Plan, kv: list[dict[str, Any]]) -> torch.Tensor:
        """A planned step -> logits (R, V) on the device (what a captured step replays)."""
        spec = self.spec
        logits = F.linear(self.run(m, kv), spec.lm_head)  # (R, V)
        cap = spec.logit_softcap
        return logits if cap is None else self.ops.softcap(logits, cap)

    def hidden(self, step, kv: list[dict[str, Any]]) -> torch.Tensor:
        """(R, D): the final-normed residual rows of step.logits_rows (what the head reads)."""
        return self.run(self.plan(step, block_size(kv)), kv)

    def run(self, m: _Plan, kv: list[dict[str, Any]]) -> torch.Tensor:
        """(R, D) the final-normed rows of a planned step."""
        spec = self.spec
        x = F.embedding(m.token_ids, spec.embed)  # (N, D)
        if spec.embed_scale != 1.0:
            x = x * spec.embed_scale
        attention = self.mla_attention if self.mla else self.attention
        for w, layer_kv in zip(self.layers, kv):
            x = attention(x, w, layer_kv, m)
            x = self.feed_forward(x, w)
        if m.logits_rows is not None:
            x = x.index_select(0, m.logits_rows)  # (R, D): only the rows we sample from
        return self.norm(x, self.final_norm)

    def norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D) RMSNorm, one fused kernel where torch has one."""
        return F.rms_norm(x, (x.shape[-1],), w, self.spec.norm_eps)

    def _residual(self, x, a, w, bias, post_norm):
        """x + post_norm(a @ w.T + bias): one addmm when there is neither. Under tensor
        parallelism a @ w.T is this rank's share (w row-parallel), summed over the ranks first."""
        if bias is None and post_norm is None and self.tp is None:
            return torch.addmm(x, a, w.t())
        return self._add(x, F.linear(a, w), bias, post_norm)

    def _add(self, x, h, bias, post_norm):
        """x + post_norm(sum over ranks of h, + bias)."""
        if self.tp is not None:
            h = self.tp.all_reduce(h)
        if bias is not None:
            h = h + bias
        return x + (h if post_norm is None else self.norm(h, post_norm))

    def attention(self, x: torch.Tensor, w: _Layer, kv: dict, m: _Plan) -> torch.Tensor:
        """(N, D) -> (N, D): x plus grouped-query attention over the paged cache."""
        spec = self.spec
        N, H, KVH, Dh = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        G, S, T, L = H // KVH, m.n_seqs, m.q_len, m.ctx_len
        h = self.norm(x, w.attn_norm)
        qkv = torch.cat([F.linear(h, wt, b) for wt, b in w.qkv], 1) if len(w.qkv) > 1 else None
        if qkv is None:
            qkv = F.linear(h, *w.qkv[0])  # (N, (H+2KVH)*Dh)
        qk = qkv[:, : (H + KVH) * Dh].view(N, H + KVH, Dh)
        if w.q_norm is not None:  # Qwen3 / Gemma 3 normalize each head before rotating it
            qk = torch.cat([self.norm(qk[:, :H], w.q_norm), self.norm(qk[:, H:], w.k_norm)], 1)
        qk = self._rope(qk, m, w)  # q and k heads in one rotation: (N, H+KVH, Dh)
        k = qk[:, H:]  # (N, KVH, Dh)
        v = qkv[:, (H + KVH) * Dh :].view(N, KVH, Dh)
        k_pool, v_pool = kv["k"], kv["v"]
        k_pool.view(-1, KVH, Dh).index_copy_(0, m.slots, k.to(k_pool.dtype))
        v_pool.view(-1, KVH, Dh).index_copy_(0, m.slots, v.to(v_pool.dtype))
        if m.paged is not None and w.window is None:  # the blocks read in place
            o = m.paged(qk[:, :H].to(k_pool.dtype), k_pool, v_pool)  # (N, H, Dh)
            return self._residual(x, o.reshape(N, H * Dh), w.o, w.o_bias, w.post_attn_norm)
        # every sequence's context through its block table; padding reads block 0, masked
        kc = k_pool.index_select(0, m.gather).view(S, L, KVH, Dh).transpose(1, 2)  # (S,KVH,L,Dh)
        vc = v_pool.index_select(0, m.gather).view(S, L, KVH, Dh).transpose(1, 2)
        # the G query heads of a kv head become G x T query rows against that head's keys
        if m.q_src is None:  # decode: token s is sequence s's only row
            q = qk[:, :H].reshape(S, KVH, G, Dh)
        else:
            q = qk[:, :H].index_select(0, m.q_src)  # (S*T, H, Dh) padded per sequence
            q = q.view(S, T, KVH, G, Dh).permute(0, 2, 1, 3, 4).reshape(S, KVH, T * G, Dh)
        scale = spec.layers[0].attn.scale
        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=m.masks[w.window], scale=scale)
        if m.out_rows is None:
            a = o.reshape(N, H * Dh)  # (S, KVH, G, Dh) is already token-major
        else:
            o = o.view(S, KVH, T, G, Dh).permute(0, 2, 1, 3, 4).reshape(S * T, H * Dh)
            a = o.index_select(0, m.out_rows)  # (N, H*Dh)
        return self._residual(x, a, w.o, w.o_bias, w.post_attn_norm)

    def _rope(self, x: torch.Tensor, m: _Plan, w: _Layer) -> torch.Tensor:
        """(N, h, W) -> same: the first R dims rotated in halves, x * [cos, cos, 1] +
        [x2, x1, x_rest] * [-sin, sin, 0] (the step's tables cut to the heads' width W)."""
        cos, sin = m.trig[w.rope]
        W, R = x.shape[-1], 2 * len(self.ropes[w.rope].inv_freq)
        swapped = torch.cat([x[..., R // 2 : R], x[..., : R // 2], x[..., R:]], dim=-1)
        return torch.addcmul(x * cos[..., :W], swapped, sin[..., :W])

    def mla_attention(self, x: torch.Tensor, w: _Layer, kv: dict, m: _Plan) -> torch.Tensor:
        """(N, D) -> (N, D): x plus multi-head latent attention, absorbed, over the latent pool."""
        a, spec = w.mla, self.spec
        N, H, dr, Lw = x.shape[0], spec.n_heads, self.rope_dims, self.kv_width
        S, T, L = m.n_seqs, m.q_len, m.ctx_len
        h = self.norm(x, w.attn_norm)
        x_q = h if a.q_a is None else self.norm(F.linear(h, a.q_a.w), w.q_a_norm)
        q = self._rope(F.linear(x_q, a.q_b.w).view(N, H, self.q_width), m, w)  # (N, H, dr+dn)
        latent = F.linear(h, a.kv_a.w)  # (N, dr + r): [k_rope, c_kv]
        latent = torch.cat([latent[:, :dr], self.norm(latent[:, dr:], w.kv_a_norm)], dim=1)
        latent = self._rope(latent.view(N, 1, Lw), m, w)  # (N, 1, dr + r)
        pool = kv["kv"]
        pool.view(-1, 1, Lw).index_copy_(0, m.slots, latent.to(pool.dtype))
        # [q_rope, W_UK^T q_nope] per head, one batched matmul in the absorption's float32, as
        # the model file's head_matmul: (H, N, dr+dn) @ (H, dr+dn, Lw)
        q = self.ops.head_matmul(q, a.q_absorb)  # (N, H, Lw)
        ctx = pool.index_select(0, m.gather).view(S, 1, L, Lw)  # keys; values: their c_kv part
        if m.q_src is None:  # decode: token s is sequence s's only row; its H heads are G rows
            q = q.reshape(S, 1, H, Lw)
        else:
            q = q.index_select(0, m.q_src).view(S, 1, T * H, Lw)  # rows ordered (t, h)
        o = F.scaled_dot_product_attention(
            q, ctx, ctx[..., dr:], attn_mask=m.masks[None], scale=a.scale
        )  # (S, 1, T*H, r)
        o = o.reshape(-1, H, Lw - dr)  # (S*T or N, H, r)
        if m.out_rows is not None:
            o = o.index_select(0, m.out_rows)  # (N, H, r)
        v = self.ops.head_matmul(o, a.v_up)  # (N, H, dv): W_UV per head
        # unfused: the residual add rounded after o's product, as the model file rounds it (the
        # absorbed path's extra products leave a narrow dtype less room than GQA's)
        return self._add(x, F.linear(v.reshape(N, -1), w.o), None, w.post_attn_norm)

    def feed_forward(self, x: torch.Tensor, w: _Layer) -> torch.Tensor:
        """(N, D) -> (N, D): x plus the gated MLP or the mixture of experts."""
        ffn = w.ffn
        if isinstance(ffn, MoE):
            ops = self.ops
            h = ops.rms_norm(x, w.ffn_norm_f32, self.spec.norm_eps)  # (N, D) as the model file
            ids, weights = ffn.route(ops.to_numpy(ops.matmul(h, ffn.router)))  # (N, K) each
            y = ops.moe(h, ids, weights, ffn.experts, act=ffn.act)  # (N, D)
            if ffn.shared is None:
                return self._add(x, y, None, w.post_ffn_norm)
            shared = ffn.shared  # its down bias added once, to the sum over ranks
            y = y + F.linear(self._act(h, shared), shared.down.w)
            return self._add(x, y, shared.down.b, w.post_ffn_norm)
        h = self.norm(x, w.ffn_norm)
        return self._residual(x, self._act(h, ffn), ffn.down.w, ffn.down.b, w.post_ffn_norm)

    def _act(self, h: torch.Tensor, mlp: GatedMLP) -> torch.Tensor:
        """(N, D) -> (N, F): act(gate h) * up h."""
        if len(mlp.gate_up) == 1:
            gu = F.linear(h, mlp.gate_up[0].w, mlp.gate_up[0].b)  # (N, 2F)
            gate, up = gu.chunk(2, dim=1)
        else:
            gate, up = (F.linear(h, lin.w, lin.b) for lin in mlp.gate_up)
        if mlp.act == "silu":
            return F.silu(gate) * up
        return F.gelu(gate, approximate="tanh") * up


def block_size(kv: list[dict[str, Any]]) -> int:
    """BS, from the pools' (NB, BS, ...) layout."""
    return next(iter(kv[0].values())).shape[1]


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device; through pinned memory on CUDA so the copy does not stall."""
    host = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
