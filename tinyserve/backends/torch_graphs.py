"""CUDA graphs for decode steps of the torch lowering: one launch for the whole stack.

A decode step of a small model on a GPU is bound by the host: Python and one kernel launch per op,
hundreds per step. A CUDA graph records the step's kernels once and replays them with one launch.
A graph fixes every shape and every address it touches, so:

- a decode step of S sequences is padded up to its batch bucket (1, 2, 4, ..., 256, capped by the
  engine's max_num_seqs) and its context up to a power of two of blocks; one graph per
  (batch bucket, context bucket), captured at its first use, after a warm-up run;
- the step's inputs (token ids, slots, block tables and query positions, the rope tables) are
  copied into static buffers that the graph reads, and its logits come out in a static buffer;
- padded rows write their K/V to a scratch block the engine never hands out (the backend
  allocates it past the engine's blocks) and read only it; their logits are dropped;
- the KV pools are the engine's own tensors, whose addresses never change.

Prefill and mixed steps, steps wanting only some rows' logits and batches past the largest bucket
run eagerly (`graph_blocker` says why), and so do models whose lowering syncs with the host inside
a step (mixture-of-experts routing) or talks to other ranks (tensor parallelism).

Without CUDA (`capture=False`) the same padded static-buffer path runs eagerly: it is how the CPU
tests hold it to the unpadded step; it saves nothing there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..batch import Batch
from ..models.spec import MoE
from ..step import StepMeta
from .lowering import NotLowerable
from .torch_decoder import StepShape, TorchDecoder

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes graphs are captured for: the standard buckets up to max_batch, and
    max_batch itself (the scheduler's max_num_seqs) when it falls between two."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    below = tuple(b for b in BATCH_BUCKETS if b < max_batch)
    return below + (min(max_batch, BATCH_BUCKETS[-1]),)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding n rows, None past the largest."""
    for b in buckets:
        if b >= n:
            return b
    return None


def context_bucket(n_blocks: int, max_blocks: int) -> int:
    """Blocks each sequence gathers in a captured step: n_blocks rounded up to a power of two
    (few graphs as contexts grow), never past max_blocks (no sequence holds more)."""
    return min(1 << max(0, n_blocks - 1).bit_length(), max(max_blocks, n_blocks))


def graph_blocker(step: StepMeta, buckets: tuple[int, ...]) -> str | None:
    """Why this step must run eagerly, or None when a captured graph can run it."""
    if step.max_q_len != 1:
        return "a prefill or mixed step"
    if not step.all_rows:
        return "only some rows' logits are wanted"
    if step.n_seqs > buckets[-1]:
        return f"{step.n_seqs} sequences, past the largest bucket ({buckets[-1]})"
    return None


def model_blocker(decoder: TorchDecoder) -> str | None:
    """Why this lowering cannot be captured at all, or None."""
    if decoder.tp is not None:
        return "tensor parallelism (collectives between ranks)"
    if any(isinstance(layer.ffn, MoE) for layer in decoder.layers):
        return "mixture-of-experts routing is decided on the host"
    return None


def pad_decode_batch(
    batch: Batch, n_seqs: int, n_blocks: int, scratch_block: int, block_size: int
) -> Batch:
    """A decode batch of S sequences as one of n_seqs >= S, its tables n_blocks wide: each padded
    row is a one-token sequence at position 0 whose K/V go to slot 0 of the scratch block, the
    only block it reads (so its attention row is never empty, and no live block is written)."""
    S = batch.n_seqs
    assert batch.n_tokens == S, "only decode steps (one token per sequence) are padded"
    assert n_seqs >= S, f"bucket {n_seqs} below the batch's {S} sequences"
    pad = n_seqs - S
    tables = np.zeros((n_seqs, n_blocks), dtype=np.int32)
    width = min(n_blocks, batch.block_tables.shape[1])
    tables[:S, :width] = batch.block_tables[:, :width]
    tables[S:, 0] = scratch_block
    zeros = np.zeros(pad, dtype=np.int64)
    return Batch(
        token_ids=np.concatenate([batch.token_ids, zeros]),
        positions=np.concatenate([batch.positions, zeros]),
        slots=np.concatenate([batch.slots, zeros + scratch_block * block_size]),
        query_start=np.arange(n_seqs + 1, dtype=np.int64),
        seq_lens=np.concatenate([batch.seq_lens, zeros + 1]),
        block_tables=tables,
        logits_rows=np.arange(n_seqs, dtype=np.int64),
    )


@dataclass(slots=True)
class _Static:
    """One (batch bucket, context bucket)'s buffers, and its graph once captured."""

    shape: StepShape
    token_ids: torch.Tensor  # (Sb,)
    slots: torch.Tensor  # (Sb,)
    ints: torch.Tensor  # (Sb*nb + Sb,) block tables, then query positions
    trig: torch.Tensor  # (n_ropes, Sb, 2*Dh)
    logits: torch.Tensor | None = None  # (Sb, V), written by the graph
    graph: object = None  # torch.cuda.CUDAGraph


class DecodeGraphs:
    """Decode steps of one lowering through captured graphs (or, capture=False, the same padded
    static path run eagerly). (StepMeta, kv pools) -> logits (S, V) on the device."""

    def __init__(
        self,
        decoder: TorchDecoder,
        max_batch: int,
        capture: bool,
    ):
        problem = model_blocker(decoder)
        if problem:
            raise NotLowerable(problem)
        self.decoder = decoder
        self.buckets = batch_buckets(max_batch)
        self.capture = capture
        self.device = decoder.ops.device
        self._static: dict[tuple[int, int], _Static] = {}
        self._kv = None  # the pools the graphs were captured over
        self._pool = None  # the graphs' shared memory pool
        self.n_replays = 0  # steps run through the static buffers (graphs or not)

    def blocker(self, step: StepMeta) -> str | None:
        return graph_blocker(step, self.buckets)

    def __call__(self, step: StepMeta, kv: list[dict], scratch_block: int) -> torch.Tensor:
        """Logits (S, V) of a decode step that `blocker` let through; scratch_block: a block of
        kv's pools that no sequence holds."""
        if kv is not self._kv:  # new pools (a new engine): graphs over the old ones are stale
            self._static.clear()
            self._kv = kv
        BS = next(iter(kv[0].values())).shape[1]
        S = step.n_seqs
        Sb = bucket_for(S, self.buckets)
        nb = -(-step.max_seq_len // BS)
        nbb = context_bucket(nb, scratch_block)
        padded = StepMeta.build(pad_decode_batch(step.batch, Sb, nbb, scratch_block, BS))
        shape, ints, trig = self.decoder.host_inputs(padded, BS, n_blocks=nbb)
        static = self._static.get((Sb, nbb))
        fresh = static is None
        if fresh:
            static = self._static[(Sb, nbb)] = self._buffers(shape, trig.shape)
        self._fill(static, padded.batch, ints, trig)
        if not self.capture:
            static.logits = self._run(static, kv)
        elif fresh:
            self._capture(static, kv)
            static.graph.replay()
        else:
            static.graph.replay()
        self.n_replays += 1
        return static.logits[:S]

    def _buffers(self, shape: StepShape, trig_shape) -> _Static:
        dev, Sb, nb = self.device, shape.n_seqs, shape.n_blocks
        return _Static(
            shape=shape,
            token_ids=torch.zeros(Sb, dtype=torch.int64, device=dev),
            slots=torch.zeros(Sb, dtype=torch.int64, device=dev),
            ints=torch.zeros(Sb * nb + Sb, dtype=torch.int64, device=dev),
            trig=torch.zeros(trig_shape, dtype=self.decoder.ops.dtype, device=dev),
        )

    def _fill(self, static: _Static, padded: Batch, ints: np.ndarray, trig: np.ndarray) -> None:
        """The step's inputs into the static buffers (copies: the graph reads these addresses)."""
        ids_slots = np.concatenate([padded.token_ids, padded.slots, ints])
        host = torch.from_numpy(ids_slots)
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        Sb = len(padded.token_ids)
        static.token_ids.copy_(dev[:Sb])
        static.slots.copy_(dev[Sb : 2 * Sb])
        static.ints.copy_(dev[2 * Sb :])
        static.trig.copy_(torch.from_numpy(trig).to(self.device, non_blocking=True))

    def _run(self, static: _Static, kv: list[dict]) -> torch.Tensor:
        """The lowering over the static buffers: what a graph records."""
        d = self.decoder
        m = d.device_plan(
            static.shape, static.token_ids, static.slots, None, static.ints, static.trig
        )
        return d.logits(m, kv)

    def _capture(self, static: _Static, kv: list[dict]) -> None:
        """Warm up on a side stream (kernel selection, allocator), then record the step."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # the warm-ups write the very K/V the replay writes: harmless
                self._run(static, kv)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static.logits = self._run(static, kv)
        static.graph = graph

    @property
    def n_graphs(self) -> int:
        return sum(s.graph is not None for s in self._static.values())
