"""The torch backend's fast path for the Llama family: the model file's maths in fewer kernels.

A decode step on a GPU is bound by the host (Python and one launch per op), not by the device. So
for a `LlamaModel` the torch backend runs this stack instead of the model's op-by-op forward:

- q/k/v as one matmul over concatenated weights, gate/up as one; the model's Linear weights become
  views into the concatenations, so no weight is held twice;
- rope's cos / sin computed once per step on the host (float64 angles, as NumpyOps), shipped with
  the step's index arrays in one copy, and applied to q and k of a layer in one rotation;
- the additive attention mask and the block-gather index built once per step, not per layer;
- the residual adds fused into the output projections (addmm);
- decode steps (one new token per sequence) view q in place: no padding scatter, no gather back.

Same weights, same maths; only the rounding order moves (within each dtype's tolerance).
tests/test_torch_backend.py holds both routes (this stack, the op-by-op forward) to one answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..batch import Batch


@dataclass(slots=True)
class FusedLayer:
    attn_norm: torch.Tensor  # (D,)
    qkv: torch.Tensor  # ((H+2KVH)*Dh, D): q, k, v rows stacked
    qkv_bias: torch.Tensor | None  # ((H+2KVH)*Dh,) (Qwen2)
    q_norm: torch.Tensor | None  # (Dh,) (Qwen3)
    k_norm: torch.Tensor | None  # (Dh,)
    o: torch.Tensor  # (D, H*Dh)
    o_bias: torch.Tensor | None  # (D,)
    ffn_norm: torch.Tensor  # (D,)
    gate_up: torch.Tensor  # (2F, D): gate rows, then up rows
    down: torch.Tensor  # (D, F)


@dataclass(slots=True)
class StepMeta:
    """One step's per-forward metadata on the device, shared by every layer."""

    token_ids: torch.Tensor  # (N,)
    slots: torch.Tensor  # (N,) block * BS + offset
    gather: torch.Tensor  # (S*nb,) the blocks each sequence reads, padded with block 0
    logits_rows: torch.Tensor | None  # (R,), None when every token's row is wanted in order
    cos: torch.Tensor  # (N, 1, Dh) [cos, cos]
    sin: torch.Tensor  # (N, 1, Dh) [-sin, sin]: rotate-half's sign folded in
    mask: torch.Tensor  # (S, 1, 1 or T*G, L) additive: 0 where allowed, -inf elsewhere
    q_src: torch.Tensor | None  # (S*T,) flat token of each padded query row; None at decode
    out_rows: torch.Tensor | None  # (N,) padded row of each flat token; None at decode
    n_seqs: int  # S
    q_len: int  # T, the longest run of new tokens (1 at decode)
    ctx_len: int  # L = nb * BS, the padded context


def _cat_or_none(parts: list, sizes: list[int], like: torch.Tensor) -> torch.Tensor | None:
    """Concatenate biases, zeros where a part has none; None when no part has one."""
    if all(p is None for p in parts):
        return None
    return torch.cat(
        [p.to(like.dtype) if p is not None else like.new_zeros(n) for p, n in zip(parts, sizes)]
    )


class LlamaStack:
    """A LlamaModel's layers with fused weights. forward: Batch -> logits (R, V) on the device."""

    def __init__(self, model, ops):
        cfg = model.cfg
        self.model, self.ops, self.cfg = model, ops, cfg
        dt = ops.dtype
        # float32 norms keep NumpyOps' formula exactly; narrow dtypes hand the fused kernel its dtype
        self.norm_dtype = torch.float32 if dt == torch.float32 else dt
        qs, kvs, F_ = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        self.layers = []
        for w in model.layers:
            qkv = torch.cat([w.q.w, w.k.w, w.v.w])  # ((H+2KVH)*Dh, D)
            gate_up = torch.cat([w.gate.w, w.up.w])  # (2F, D)
            # the model keeps working op by op, on views of the fused weights (no copy held twice)
            w.q.w, w.k.w, w.v.w = qkv[:qs], qkv[qs : qs + kvs], qkv[qs + kvs :]
            w.gate.w, w.up.w = gate_up[:F_], gate_up[F_:]
            self.layers.append(
                FusedLayer(
                    attn_norm=w.attn_norm.to(self.norm_dtype),
                    qkv=qkv,
                    qkv_bias=_cat_or_none([w.q.b, w.k.b, w.v.b], [qs, kvs, kvs], qkv),
                    q_norm=None if w.q_norm is None else w.q_norm.to(self.norm_dtype),
                    k_norm=None if w.k_norm is None else w.k_norm.to(self.norm_dtype),
                    o=w.o.w,
                    o_bias=None if w.o.b is None else w.o.b.to(dt),
                    ffn_norm=w.ffn_norm.to(self.norm_dtype),
                    gate_up=gate_up,
                    down=w.down.w,
                )
            )
        self.final_norm = model.norm.to(self.norm_dtype)
        self.inv_freq = model.inv_freq.detach().cpu().numpy().astype(np.float32)  # (Dh/2,)
        if 2 * self.inv_freq.shape[0] != cfg.head_dim:
            raise ValueError("the fused Llama stack rotates whole heads (no partial rotary)")

    # -- per step -------------------------------------------------------------------------------

    def step_meta(self, batch: Batch, block_size: int) -> StepMeta:
        """Index arrays and cos / sin built on the host, sent in two copies; the mask on the device."""
        cfg, dev = self.cfg, self.ops.device
        starts = batch.query_start
        q_lens = np.diff(starts)  # (S,)
        S, N = batch.n_seqs, batch.n_tokens
        T = int(q_lens.max(initial=1))
        max_len = int(batch.seq_lens.max(initial=1))
        nb = -(-max_len // block_size)
        L = nb * block_size
        decode = T == 1
        rows = np.asarray(batch.logits_rows, dtype=np.int64)
        all_rows = len(rows) == N and np.array_equal(rows, np.arange(N))
        ints = [batch.token_ids, batch.slots, batch.block_tables[:, :nb]]
        ints.append(np.zeros(0) if all_rows else rows)
        if decode:
            q_pos = np.asarray(batch.positions).reshape(S, 1)  # (S, 1)
        else:
            seq_of = np.repeat(np.arange(S), q_lens)  # (N,) sequence of each flat token
            local = np.arange(N) - starts[:-1][seq_of]  # (N,) its row within that sequence
            out_rows = seq_of * T + local  # (N,)
            q_src = np.zeros(S * T, dtype=np.int64)  # padding rows copy token 0, masked below
            q_src[out_rows] = np.arange(N)
            q_pos = np.zeros((S, T), dtype=np.int64)  # padding rows look at position 0 only
            q_pos[seq_of, local] = batch.positions
            ints += [q_src, out_rows]
        ints.append(q_pos)
        flat = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in ints])
        # rope angles in float64 then rounded to float32, exactly as NumpyOps.rope
        angles = np.asarray(batch.positions, np.float64)[:, None] * self.inv_freq  # (N, Dh/2)
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        trig = np.concatenate([cos, cos, -sin, sin], axis=1)  # (N, 2*Dh)
        dev_ints, dev_trig = _to_device(flat, dev), _to_device(trig, dev)
        views, offset = [], 0
        for a in ints:
            views.append(dev_ints[offset : offset + a.size].view(a.shape))
            offset += a.size
        Dh = cfg.head_dim
        trig_t = dev_trig.to(self.ops.dtype).view(N, 1, 2 * Dh)
        q_pos_t = views[-1]  # (S, T)
        k_pos = torch.arange(L, device=dev)  # (L,)
        allowed = k_pos <= q_pos_t[:, :, None]  # (S, T, L) causal
        if cfg.sliding_window is not None:
            allowed &= k_pos > q_pos_t[:, :, None] - cfg.sliding_window
        mask = torch.zeros(allowed.shape, dtype=self.ops.dtype, device=dev)
        mask.masked_fill_(~allowed, float("-inf"))  # (S, T, L)
        if decode:
            mask = mask.view(S, 1, 1, L)  # one query row per (kv head, group): broadcast
        else:
            G = cfg.n_heads // cfg.n_kv_heads  # query rows ordered (t, g)
            mask = mask[:, None, :, None, :].expand(S, 1, T, G, L).reshape(S, 1, T * G, L)
        return StepMeta(
            token_ids=views[0],
            slots=views[1],
            gather=views[2].reshape(-1),
            logits_rows=None if all_rows else views[3],
            cos=trig_t[..., :Dh],
            sin=trig_t[..., Dh:],
            mask=mask,
            q_src=None if decode else views[4],
            out_rows=None if decode else views[5],
            n_seqs=S,
            q_len=T,
            ctx_len=L,
        )

    # -- the forward ----------------------------------------------------------------------------

    def forward(self, batch: Batch, kv: list[dict[str, Any]]) -> torch.Tensor:
        """Batch of N tokens -> logits (R, V) for batch.logits_rows, on the device."""
        block_size = kv[0]["k"].shape[1]
        meta = self.step_meta(batch, block_size)
        x = F.embedding(meta.token_ids, self.model.embed)  # (N, D)
        for w, layer_kv in zip(self.layers, kv):
            x = self.attention(x, w, layer_kv, meta)
            x = self.feed_forward(x, w)
        if meta.logits_rows is not None:
            x = x.index_select(0, meta.logits_rows)  # (R, D): only the rows we sample from
        return F.linear(self.norm(x, self.final_norm), self.model.lm_head)  # (R, V)

    def norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D) RMSNorm, one fused kernel where torch has one."""
        return F.rms_norm(x, (x.shape[-1],), w, self.cfg.norm_eps)

    def attention(self, x: torch.Tensor, w: FusedLayer, kv: dict, m: StepMeta) -> torch.Tensor:
        """(N, D) -> (N, D): x plus grouped-query attention over the paged cache."""
        cfg = self.cfg
        N, H, KVH, Dh = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        G, S, T, L = H // KVH, m.n_seqs, m.q_len, m.ctx_len
        qkv = F.linear(self.norm(x, w.attn_norm), w.qkv, w.qkv_bias)  # (N, (H+2KVH)*Dh)
        qk = qkv[:, : (H + KVH) * Dh].view(N, H + KVH, Dh)
        if w.q_norm is not None:  # Qwen3 normalizes each head before rotating it
            qk = torch.cat([self.norm(qk[:, :H], w.q_norm), self.norm(qk[:, H:], w.k_norm)], 1)
        # rope on q and k heads together: x * [cos, cos] + [x2, x1] * [-sin, sin]
        swapped = torch.cat([qk[..., Dh // 2 :], qk[..., : Dh // 2]], dim=-1)  # (N, H+KVH, Dh)
        qk = torch.addcmul(qk * m.cos, swapped, m.sin)  # (N, H+KVH, Dh)
        k = qk[:, H:]  # (N, KVH, Dh)
        v = qkv[:, (H + KVH) * Dh :].view(N, KVH, Dh)
        k_pool, v_pool = kv["k"], kv["v"]
        k_pool.view(-1, KVH, Dh).index_copy_(0, m.slots, k)
        v_pool.view(-1, KVH, Dh).index_copy_(0, m.slots, v)
        # every sequence's context through its block table; padding reads block 0, masked
        kc = k_pool.index_select(0, m.gather).view(S, L, KVH, Dh).transpose(1, 2)  # (S,KVH,L,Dh)
        vc = v_pool.index_select(0, m.gather).view(S, L, KVH, Dh).transpose(1, 2)
        # the G query heads of a kv head become G x T query rows against that head's keys
        if m.q_src is None:  # decode: token s is sequence s's only row
            q = qk[:, :H].reshape(S, KVH, G, Dh)
        else:
            q = qk[:, :H].index_select(0, m.q_src)  # (S*T, H, Dh) padded per sequence
            q = q.view(S, T, KVH, G, Dh).permute(0, 2, 1, 3, 4).reshape(S, KVH, T * G, Dh)
        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=m.mask, scale=self.model.scale)
        if m.out_rows is None:
            a = o.reshape(N, H * Dh)  # (S, KVH, G, Dh) is already token-major
        else:
            o = o.view(S, KVH, T, G, Dh).permute(0, 2, 1, 3, 4).reshape(S * T, H * Dh)
            a = o.index_select(0, m.out_rows)  # (N, H*Dh)
        if w.o_bias is not None:
            return x + F.linear(a, w.o, w.o_bias)
        return torch.addmm(x, a, w.o.t())  # x + a @ o.T in one kernel

    def feed_forward(self, x: torch.Tensor, w: FusedLayer) -> torch.Tensor:
        """(N, D) -> (N, D): x plus SwiGLU."""
        gu = F.linear(self.norm(x, w.ffn_norm), w.gate_up)  # (N, 2F)
        half = gu.shape[1] // 2
        return torch.addmm(x, F.silu(gu[:, :half]) * gu[:, half:], w.down.t())


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device; through pinned memory on CUDA so the copy does not stall."""
    host = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
