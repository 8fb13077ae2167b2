"""Batch: what one engine step hands to the backend. Flat over sequences, no hidden state."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Batch:
    """One forward's worth of tokens from S sequences, N tokens in all (legend in config.py).

    Sequence s owns tokens query_start[s]:query_start[s+1] of the flat arrays; after this step its
    context holds seq_lens[s] tokens, stored in the KV blocks block_tables[s, :ceil(seq_lens[s]/BS)].
    """

    token_ids: np.ndarray  # (N,) int64
    positions: np.ndarray  # (N,) int64, position of each token in its sequence
    slots: np.ndarray  # (N,) int64, where each token's K/V go: block * BS + offset
    query_start: np.ndarray  # (S+1,) int64, cumulative token counts
    seq_lens: np.ndarray  # (S,) int64, context length after this step
    block_tables: np.ndarray  # (S, max_blocks) int32, padded with 0 past a sequence's blocks
    logits_rows: np.ndarray  # (R,) int64, flat token indices whose logits are wanted

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def n_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @classmethod
    def build(
        cls,
        chunks: list[tuple[list[int], int, list[int]]],
        block_size: int,
        logits_rows: list[int] | None = None,
    ) -> Batch:
        """From (new token ids, first position, block table) per sequence; by default the last
        token of every sequence gets logits."""
        token_ids, positions, slots, starts, lens = [], [], [], [0], []
        for ids, start, table in chunks:
            pos = np.arange(start, start + len(ids), dtype=np.int64)
            blocks = np.asarray(table, dtype=np.int64)[pos // block_size]
            token_ids.extend(ids)
            positions.append(pos)
            slots.append(blocks * block_size + pos % block_size)
            starts.append(starts[-1] + len(ids))
            lens.append(start + len(ids))
        width = max((len(t) for _, _, t in chunks), default=0)
        tables = np.zeros((len(chunks), max(width, 1)), dtype=np.int32)
        for s, (_, _, table) in enumerate(chunks):
            tables[s, : len(table)] = table
        if logits_rows is None:
            logits_rows = [end - 1 for end in starts[1:]]
        return cls(
            token_ids=np.asarray(token_ids, dtype=np.int64),
            positions=np.concatenate(positions) if positions else np.zeros(0, np.int64),
            slots=np.concatenate(slots) if slots else np.zeros(0, np.int64),
            query_start=np.asarray(starts, dtype=np.int64),
            seq_lens=np.asarray(lens, dtype=np.int64),
            block_tables=tables,
            logits_rows=np.asarray(logits_rows, dtype=np.int64),
        )
