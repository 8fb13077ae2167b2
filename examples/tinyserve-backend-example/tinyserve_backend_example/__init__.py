"""An example third-party backend: the NumPy reference ops, with attention written differently.

A real plugin would wrap a device library here. This one keeps NumPy but replaces the reference's
per-sequence attention loop with one padded, masked computation over the whole batch, so the
conformance kit has something of its own to check.
"""

from __future__ import annotations

import numpy as np

from tinyserve.backends.base import Backend
from tinyserve.backends.numpy_ops import NumpyOps


class ExampleOps(NumpyOps):
    """NumpyOps, but paged attention pads every sequence to the longest and masks."""

    def paged_attention(self, q, k_pool, v_pool, batch, scale, sliding_window=None):
        """(N, H, Dh), (NB, BS, KVH, Dh) x2 -> (N, H, Dh)."""
        N, H, Dh = q.shape
        BS, KVH, Dv = v_pool.shape[1:]
        G = H // KVH
        n_blocks = -(-int(batch.seq_lens.max()) // BS)
        tables = batch.block_tables[:, :n_blocks]  # (S, nb)
        S, L = tables.shape[0], n_blocks * BS
        k = k_pool[tables].reshape(S, L, KVH, Dh)  # (S, L, KVH, Dh)
        v = v_pool[tables].reshape(S, L, KVH, Dv)
        seq_of = np.repeat(np.arange(S), np.diff(batch.query_start))  # (N,)
        qs = q.reshape(N, KVH, G, Dh)
        scores = np.einsum("nkgd,nckd->nkgc", qs, k[seq_of]) * scale  # (N, KVH, G, L)
        k_pos, q_pos = np.arange(L)[None, :], batch.positions[:, None]  # (1, L), (N, 1)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = np.where(allowed[:, None, None, :], scores, -np.inf)
        p = self.softmax(scores)
        return np.einsum("nkgc,nckd->nkgd", p, v[seq_of]).reshape(N, H, Dv).astype(q.dtype)


class ExampleBackend(Backend):
    """The `example` backend: float32 NumPy on the cpu."""

    name = "example"

    def __init__(self, device: str | None = None, dtype: str | None = None):
        if device not in (None, "cpu"):
            raise ValueError(f"the example backend runs on the cpu only, not {device!r}")
        if dtype not in (None, "float32"):
            raise ValueError(f"the example backend computes in float32 only, not {dtype!r}")
        super().__init__(device, dtype)
        self.ops = ExampleOps()

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return True, ""

    @classmethod
    def summary(cls) -> str:
        return "example plugin: NumPy, batched attention (float32)"

    def describe(self) -> str:
        return self.summary()
