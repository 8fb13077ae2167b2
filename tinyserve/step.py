"""StepMeta: what every op and fast path needs about one step, built once from the Batch.

The engine hands a backend a Batch (flat token ids, positions, slots, block tables). Several
things derived from it are needed by more than one op: the sequence of each token, its row within
that sequence, the longest run of new tokens. A backend builds a StepMeta once per forward
(`Backend.step_meta`) and passes it explicitly to the model and to every op that needs it
(`paged_attention`); a device backend's subclass carries the device copies too. No op set keeps
state about the step it is in, so this object is also what a captured (CUDA-graph) step replays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .batch import Batch


@dataclass(frozen=True, slots=True)
class StepMeta:
    """One step of N tokens from S sequences (legend in config.py).

    token_ids, positions, slots and logits_rows are arrays the backend's ops take (NumPy here, a
    device backend's tensors in its subclass); everything else is host NumPy."""

    batch: Batch  # the host arrays the engine built
    token_ids: Any  # (N,)
    positions: Any  # (N,)
    slots: Any  # (N,)
    logits_rows: Any  # (R,)
    seq_of: np.ndarray  # (N,) int64, the sequence of each token
    local: np.ndarray  # (N,) int64, its row among its sequence's new tokens
    max_q_len: int  # T: the longest run of new tokens (1 when every sequence decodes)
    max_seq_len: int  # the longest context after this step
    all_rows: bool  # logits_rows is every token, in order

    @classmethod
    def build(cls, batch: Batch, **arrays) -> StepMeta:
        """From the Batch; `arrays` replaces token_ids / positions / slots / logits_rows."""
        q_lens = np.diff(batch.query_start)  # (S,)
        seq_of = np.repeat(np.arange(batch.n_seqs, dtype=np.int64), q_lens)  # (N,)
        local = np.arange(batch.n_tokens, dtype=np.int64) - batch.query_start[:-1][seq_of]
        rows = batch.logits_rows
        fields = {
            "batch": batch,
            "token_ids": batch.token_ids,
            "positions": batch.positions,
            "slots": batch.slots,
            "logits_rows": rows,
            "seq_of": seq_of,
            "local": local,
            "max_q_len": int(q_lens.max(initial=1)),
            "max_seq_len": int(batch.seq_lens.max(initial=1)),
            "all_rows": len(rows) == batch.n_tokens and bool(np.all(rows == np.arange(len(rows)))),
        }
        return cls(**{**fields, **arrays})

    # the Batch's other fields, so an op written against a Batch reads a StepMeta alike
    @property
    def query_start(self) -> np.ndarray:
        return self.batch.query_start

    @property
    def seq_lens(self) -> np.ndarray:
        return self.batch.seq_lens

    @property
    def block_tables(self) -> np.ndarray:
        return self.batch.block_tables

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def n_seqs(self) -> int:
        return self.batch.n_seqs

    def seq_len_of_tokens(self) -> np.ndarray:
        """(N,) the context length of each token's sequence after this step."""
        return self.batch.seq_lens[self.seq_of]


def as_step(step: StepMeta | Batch) -> StepMeta:
    """A StepMeta for ops called with a bare Batch (tests, the conformance kit)."""
    return step if isinstance(step, StepMeta) else StepMeta.build(step)
