"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step packs decodes first (one token each, oldest first), then prefill chunks of running
sequences, then new requests first-come-first-served, up to max_num_batched_tokens tokens and
max_num_seqs sequences. When KV blocks run out, the most recently admitted running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .errors import OutOfBlocks
from .kv_cache import KVCacheManager
from .sequence import Sequence, Status


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # a prompt longer than this is prefilled in chunks over several steps
    chunk_size: int | None = None

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    n_tokens: list[int] = field(default_factory=list)  # new tokens per sequence this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.n_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling that already shares its parent's blocks."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)

    def _preempt(self, seq: Sequence, out: ScheduledBatch) -> int:
        """Free seq's blocks and requeue it; returns the budget it gives back if it was scheduled."""
        returned = 0
        if seq in out.seqs:
            i = out.seqs.index(seq)
            out.seqs.pop(i)
            returned = out.n_tokens.pop(i)
        self.running.remove(seq)
        self.kv.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.n_preemptions += 1
        out.preempted.append(seq)
        return returned

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        chunk = self.config.chunk_size or budget
        # 1. running sequences: decodes first, then unfinished prefill chunks
        for seq in sorted(self.running, key=lambda s: s.is_prefill):
            if budget == 0:
                break
            if seq not in self.running:  # preempted below to make room for an older one
                continue
            n = min(seq.n_uncomputed + len(seq.draft), budget, chunk)  # + speculation's guesses
            while True:
                try:
                    self.kv.reserve(seq, n)
                    break
                except OutOfBlocks:
                    victim = self.running[-1]
                    budget += self._preempt(victim, out)
                    if victim is seq:
                        break
            if seq.status is Status.RUNNING:
                out.seqs.append(seq)
                out.n_tokens.append(n)
                budget -= n
        # 2. new (or preempted) requests, first come first served; never preempt for them
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table and not seq.needs_prompt_logits:
                self.kv.match_prefix(seq)  # cached rows would have no logits to score them
            n = min(seq.n_uncomputed, budget, chunk)
            try:
                self.kv.reserve(seq, n)
            except OutOfBlocks:
                self.kv.free(seq)  # give the prefix-cache hits back; try again next step
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.n_tokens.append(n)
            budget -= n
        return out
