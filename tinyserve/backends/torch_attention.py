"""Paged decode attention from a kernel library, where one is installed and can run the step.

The torch lowering's own attention gathers each sequence's blocks into a padded (S, L) view and
runs one masked scaled_dot_product_attention: portable, but it reads and copies the whole padded
context. FlashInfer's paged decode and flash-attn's flash_attn_with_kvcache read the blocks in
place through the block tables. Either is an optional import: `choose_kernel` says which runs
(and why not the others), and everything falls back to SDPA, today's path, with the reason.

What they take here: decode steps (one query row per sequence), layers without a sliding
window, float16 / bfloat16 pools, CUDA; flash-attn's paged cache also needs blocks of a multiple
of 256 tokens. FlashInfer plans each step on the host, so it runs only in eager steps;
flash-attn takes device tensors only, so a captured step (torch_graphs.py) can use it.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

KERNELS = ("auto", "sdpa", "flashinfer", "flash_attn")
_WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's scratch, as its examples size it


def _import(name: str):
    try:
        return importlib.import_module(name), ""
    except (ImportError, OSError, RuntimeError) as e:  # a broken CUDA build: report, fall back
        return None, f"{name} does not import ({type(e).__name__}: {str(e).splitlines()[0]})"


def choose_kernel(asked: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(kernel, why): the library that runs decode attention ("sdpa" when none can), and, when
    it is not what was asked for, why. asked: one of KERNELS ("auto": the first that loads)."""
    if asked not in KERNELS:
        raise ValueError(f"attention must be one of {', '.join(KERNELS)}, got {asked!r}")
    if asked == "sdpa":
        return "sdpa", ""
    if device.type != "cuda":
        return "sdpa", f"paged kernels need CUDA, not {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return "sdpa", f"paged kernels take float16 / bfloat16, not {dtype}"
    reasons = []
    for name, module in (("flashinfer", "flashinfer"), ("flash_attn", "flash_attn")):
        if asked not in ("auto", name):
            continue
        lib, why = _import(module)
        if lib is not None:
            return name, ""
        reasons.append(why)
    return "sdpa", "; ".join(reasons)


class FlashAttnDecode:
    """flash_attn_with_kvcache over the pools in place: (S, H, Dh) -> (S, H, Dh).
    Device tensors only, so a CUDA graph can record it."""

    def __init__(self, tables: torch.Tensor, seq_lens: torch.Tensor, scale: float):
        from flash_attn import flash_attn_with_kvcache

        self._fn = flash_attn_with_kvcache
        self.tables = tables.to(torch.int32)  # (S, nb)
        self.seq_lens = seq_lens.to(torch.int32)  # (S,) context including this step's token
        self.scale = scale

    @staticmethod
    def fits(block_size: int) -> str | None:
        """Why flash-attn's paged cache cannot take these blocks, or None."""
        if block_size % 256:
            return (
                f"flash-attn's paged KV needs blocks of a multiple of 256 tokens, not {block_size}"
            )
        return None

    def __call__(self, q, k_pool, v_pool) -> torch.Tensor:
        o = self._fn(
            q[:, None],  # (S, 1, H, Dh)
            k_pool,
            v_pool,
            cache_seqlens=self.seq_lens,
            block_table=self.tables,
            softmax_scale=self.scale,
            causal=True,
        )  # (S, 1, H, Dh)
        return o[:, 0]


class FlashInferDecode:
    """FlashInfer's BatchDecodeWithPagedKVCacheWrapper: made once per lowering (its workspace),
    planned once per step on the host (the step's page layout), run by every layer:
    (S, H, Dh) -> (S, H, Dh)."""

    def __init__(self, device, n_heads, n_kv_heads, head_dim, scale, dtype):
        import flashinfer

        workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        self.device, self.heads = device, (n_heads, n_kv_heads, head_dim)
        self.scale, self.dtype = scale, dtype

    def plan(self, batch, block_size: int) -> FlashInferDecode:
        """Lay this decode step's blocks out for the kernel; returns self, planned."""
        lens = np.asarray(batch.seq_lens, dtype=np.int64)  # (S,)
        blocks = -(-lens // block_size)  # (S,) blocks each sequence holds
        indptr = np.concatenate([[0], np.cumsum(blocks)]).astype(np.int32)  # (S+1,)
        indices = np.concatenate(
            [batch.block_tables[s, :b] for s, b in enumerate(blocks.tolist())]
        ).astype(np.int32)
        last = ((lens - 1) % block_size + 1).astype(np.int32)  # 1..BS tokens in the last block
        dev = self.device
        self.wrapper.plan(
            torch.from_numpy(indptr).to(dev),
            torch.from_numpy(indices).to(dev),
            torch.from_numpy(last).to(dev),
            *self.heads,
            block_size,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            sm_scale=self.scale,
        )
        return self

    def __call__(self, q, k_pool, v_pool) -> torch.Tensor:
        return self.wrapper.run(q.contiguous(), (k_pool, v_pool))  # (S, H, Dh)
