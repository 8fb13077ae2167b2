"""The reference op set, in NumPy. Every other backend's ops are checked against these.

Model files call ops only through a backend's `ops` object, so a backend that wants different arrays
(torch tensors on a GPU, quantized blocks for Cython kernels) supplies the same names with the same
shape contracts. Shapes follow the legend in tinyserve/config.py.
"""

from __future__ import annotations

import math

import numpy as np

from ..batch import Batch
from ..step import StepMeta, as_step


def _dense(w) -> np.ndarray:
    """A weight as a float32 array: quantized GGUF blocks are dequantized once."""
    if hasattr(w, "dequantize"):
        return w.dequantize()
    return np.ascontiguousarray(w, dtype=np.float32)


class NumpyOps:
    """float32 NumPy ops; weights are dense (out, in) matrices as in the checkpoint."""

    dtype = np.float32

    # -- weights ------------------------------------------------------------------------------

    def weight(self, w) -> np.ndarray:
        """A matrix used by matmul / embedding, held the way this backend wants it."""
        return _dense(w)

    def vector(self, w) -> np.ndarray:
        """A small dense parameter (norm weights, biases)."""
        return _dense(w)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def from_numpy(self, x: np.ndarray):
        return x

    # -- the ops ------------------------------------------------------------------------------

    def embedding(self, ids: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(N,), (V, D) -> (N, D)."""
        return w[ids]

    def matmul(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(N, K), (M, K) -> (N, M): x @ w.T, the layout of nn.Linear weights."""
        return x @ w.T

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        """(..., D), (D,) -> (..., D): x / rms(x) * w."""
        ms = np.mean(np.square(x), axis=-1, keepdims=True)  # (..., 1)
        return (x / np.sqrt(ms + eps)) * w

    def rope(self, x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
        """(N, h, Dh), (N,), (R/2,) -> (N, h, Dh): rotate the first R dims in halves (NeoX / HF layout)."""
        half = inv_freq.shape[0]
        angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # (N, R/2)
        cos = np.cos(angles).astype(np.float32)[:, None, :]  # (N, 1, R/2)
        sin = np.sin(angles).astype(np.float32)[:, None, :]
        x1, x2 = x[..., :half], x[..., half : 2 * half]  # (N, h, R/2) each
        rotated = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        if 2 * half == x.shape[-1]:
            return rotated
        return np.concatenate([rotated, x[..., 2 * half :]], axis=-1)  # partial rotary: rest passes

    def silu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """(N, F), (N, F) -> (N, F): silu(gate) * up, the SwiGLU feed-forward's middle."""
        return gate / (1.0 + np.exp(-gate)) * up

    def gelu_tanh_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """(N, F), (N, F) -> (N, F): gelu_tanh(gate) * up, the GeGLU feed-forward's middle (Gemma)."""
        inner = np.float32(math.sqrt(2.0 / math.pi)) * (gate + np.float32(0.044715) * gate**3)
        return np.float32(0.5) * gate * (np.float32(1.0) + np.tanh(inner)) * up

    def softcap(self, x: np.ndarray, cap: float) -> np.ndarray:
        """(...) -> (...): cap * tanh(x / cap), a smooth clamp to (-cap, cap) (Gemma's logits)."""
        return (np.tanh(x / np.float32(cap)) * np.float32(cap)).astype(x.dtype)

    def head_matmul(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(N, h, K), (h, M, K) -> (N, h, M): per head x[:, i] @ w[i].T (MLA's absorbed projections)."""
        return np.einsum("nhk,hmk->nhm", x, w)

    def moe(
        self,
        x: np.ndarray,
        expert_ids: np.ndarray,
        expert_weights: np.ndarray,
        experts: list[tuple],
        act: str = "silu",
    ) -> np.ndarray:
        """(N, D), (N, K) int, (N, K), E x (gate (F, D), up (F, D), down (D, F)) -> (N, D):
        sum over k of weight[n, k] * expert[ids[n, k]](x[n]), each expert a gated MLP.

        Tokens are grouped by expert: one sort, then one batched gated MLP per expert in use."""
        act_mul = self.silu_mul if act == "silu" else self.gelu_tanh_mul
        K = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)  # (N*K,) expert of each (token, choice)
        order = np.argsort(flat, kind="stable")  # (token, choice) pairs grouped by expert
        bounds = np.searchsorted(flat[order], np.arange(len(experts) + 1))  # (E+1,)
        out = np.zeros_like(x)
        for e in np.flatnonzero(np.diff(bounds)):
            pairs = order[bounds[e] : bounds[e + 1]]  # (n_e,) indices into the flat (N*K,)
            tokens = pairs // K  # (n_e,) distinct: a token picks an expert at most once
            gate, up, down = experts[e]
            xe = x[tokens]  # (n_e, D)
            h = self.matmul(act_mul(self.matmul(xe, gate), self.matmul(xe, up)), down)  # (n_e, D)
            out[tokens] += h * expert_weights.reshape(-1)[pairs, None].astype(x.dtype)
        return out

    def softmax(self, x: np.ndarray) -> np.ndarray:
        """(..., K) -> (..., K) over the last axis."""
        e = np.exp(x - x.max(axis=-1, keepdims=True))  # subtract the max for stability
        return e / e.sum(axis=-1, keepdims=True)

    # -- paged KV cache -----------------------------------------------------------------------

    def write_kv(self, pool: np.ndarray, x: np.ndarray, slots: np.ndarray) -> None:
        """(NB, BS, *shape), (N, *shape), (N,) -> None: store token n at slot = block * BS + offset."""
        pool.reshape(-1, *pool.shape[2:])[slots] = x

    def copy_blocks(self, pool: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy whole blocks src[i] -> dst[i] (copy-on-write of a shared block)."""
        pool[dst] = pool[src]

    def paged_attention(
        self,
        q: np.ndarray,
        k_pool: np.ndarray,
        v_pool: np.ndarray,
        step: StepMeta | Batch,
        scale: float,
        sliding_window: int | None = None,
    ) -> np.ndarray:
        """(N, H, Dh), (NB, BS, KVH, Dh) x2 -> (N, H, Dh): causal attention of each sequence's new
        tokens over its whole context, read through its block table."""
        batch = as_step(step).batch
        N, H, Dh = q.shape
        KVH, Dv = k_pool.shape[2], v_pool.shape[3]
        G = H // KVH  # query heads per kv head (GQA)
        BS = k_pool.shape[1]
        out = np.empty((N, H, Dv), dtype=q.dtype)
        for s in range(batch.n_seqs):
            q0, q1 = int(batch.query_start[s]), int(batch.query_start[s + 1])
            ctx = int(batch.seq_lens[s])
            blocks = batch.block_tables[s, : math.ceil(ctx / BS)]
            k = k_pool[blocks].reshape(-1, KVH, Dh)[:ctx]  # (ctx, KVH, Dh)
            v = v_pool[blocks].reshape(-1, KVH, Dv)[:ctx]  # (ctx, KVH, Dv)
            qs = q[q0:q1].reshape(q1 - q0, KVH, G, Dh)  # (t, KVH, G, Dh)
            scores = np.einsum("tkgd,ckd->kgtc", qs, k) * scale  # (KVH, G, t, ctx)
            q_pos = batch.positions[q0:q1][:, None]  # (t, 1)
            k_pos = np.arange(ctx)[None, :]  # (1, ctx)
            allowed = k_pos <= q_pos  # causal
            if sliding_window is not None:
                allowed &= k_pos > q_pos - sliding_window  # the last `window` tokens, self included
            scores = np.where(allowed, scores, -np.inf)
            p = self.softmax(scores)  # (KVH, G, t, ctx)
            o = np.einsum("kgtc,ckd->tkgd", p, v)  # (t, KVH, G, Dv)
            out[q0:q1] = o.reshape(q1 - q0, H, Dv)
        return out
