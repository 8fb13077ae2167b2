"""Paged KV cache bookkeeping: block allocator, block tables, prefix cache, copy-on-write.

The pools themselves (per layer, (NB, BS, ...) arrays) belong to the backend; this module decides
which block ids a sequence's tokens live in. A full block is keyed by a chained hash of its tokens
and its parent block's key, so a later request with the same prefix reuses it (vLLM's automatic
prefix caching). A cached block whose ref count drops to 0 stays cached until its space is needed,
then the least recently used one is evicted.
"""

from __future__ import annotations

from collections import OrderedDict

from .errors import OutOfBlocks
from .sequence import Sequence


class BlockAllocator:
    """Hands out KV block ids; a block is free exactly when its ref count is 0.

    Free blocks that hold a cached prefix are kept apart and reused last (LRU), so they can be
    revived by a later request with the same prefix.
    """

    def __init__(self, num_blocks: int):
        self.ref_counts = [0] * num_blocks
        # free and holding nothing reusable; a stack, so the most recently used (already resident,
        # still in the CPU caches) blocks go out first and untouched pool pages stay untouched
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, oldest first
        self.on_evict = lambda block_id: None

    @property
    def num_blocks(self) -> int:
        return len(self.ref_counts)

    @property
    def n_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int:
        if self.free:
            block_id = self.free.pop()
        elif self.evictable:
            block_id, _ = self.evictable.popitem(last=False)
            self.on_evict(block_id)
        else:
            raise OutOfBlocks(f"all {self.num_blocks} blocks in use")
        assert self.ref_counts[block_id] == 0, f"allocated block {block_id} is in use"
        self.ref_counts[block_id] = 1
        return block_id

    def share(self, block_id: int) -> None:
        """One more owner (a fork, or a prefix-cache hit that may revive a free block)."""
        if self.ref_counts[block_id] == 0:
            del self.evictable[block_id]
        self.ref_counts[block_id] += 1

    def release(self, block_id: int, cached: bool) -> None:
        assert self.ref_counts[block_id] > 0, f"double free of block {block_id}"
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            if cached:
                self.evictable[block_id] = None
            else:
                self.free.append(block_id)


class KVCacheManager:
    """Block tables for sequences over a BlockAllocator, with prefix caching and copy-on-write."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need at least one block of one token, got {num_blocks} x {block_size}"
            )
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.allocator.on_evict = self._forget
        self.enable_prefix_caching = enable_prefix_caching
        # prefix-cache lookups, in tokens (vLLM's prefix_cache_queries / _hits): hits / queries
        # is the share of prompt tokens a router's affinity saved from being prefilled again
        self.n_prefix_queries = 0
        self.n_prefix_hits = 0
        self.cached: dict[int, int] = {}  # chained key -> block id
        self.block_key: dict[
            int, tuple[int, int | None, tuple[int, ...]]
        ] = {}  # id -> (key, parent, tokens)
        self.pending_copies: list[
            tuple[int, int]
        ] = []  # (src, dst) for the backend before the forward

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def n_free_blocks(self) -> int:
        return self.allocator.n_free

    @property
    def n_used_blocks(self) -> int:
        return self.num_blocks - self.allocator.n_free

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # -- prefix cache ---------------------------------------------------------------------------

    @staticmethod
    def _key(parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def _forget(self, block_id: int) -> None:
        key, _, _ = self.block_key.pop(block_id)
        if self.cached.get(key) == block_id:
            del self.cached[key]

    def match_prefix(self, seq: Sequence) -> int:
        """Give a fresh sequence the cached blocks of its longest cached prefix; returns tokens reused.

        At least one token is left to compute, so the step that finishes the prompt has logits.
        """
        assert not seq.block_table and seq.num_computed == 0, f"{seq} already has blocks"
        if not self.enable_prefix_caching:
            return 0
        bs, parent, hits = self.block_size, None, []
        for i in range((len(seq.token_ids) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            key = self._key(parent, tokens)
            block_id = self.cached.get(key)
            # confirm against the tokens and the parent, not the hash alone
            if block_id is None or self.block_key[block_id][1:] != (parent, tokens):
                break
            hits.append(block_id)
            parent = key
        for block_id in hits:
            self.allocator.share(block_id)
        seq.block_table = hits
        seq.num_computed = len(hits) * bs
        self.n_prefix_queries += len(seq.token_ids)
        self.n_prefix_hits += seq.num_computed
        return seq.num_computed

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs, parent = self.block_size, None
        for i in range(seq.num_computed // bs):
            block_id = seq.block_table[i]
            entry = self.block_key.get(block_id)
            if entry is not None:
                parent = entry[0]
                continue
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            key = self._key(parent, tokens)
            self.block_key[block_id] = (key, parent, tokens)
            self.cached.setdefault(key, block_id)  # a twin computed concurrently keeps the first
            parent = key

    # -- allocation -----------------------------------------------------------------------------

    def can_allocate(self, n_blocks: int) -> bool:
        return n_blocks <= self.allocator.n_free

    def reserve(self, seq: Sequence, n_new_tokens: int) -> None:
        """Make room for the next n_new_tokens of seq (all or nothing): new blocks, and a private
        copy of a shared last block about to be written (copy-on-write)."""
        bs = self.block_size
        start, end = seq.num_computed, seq.num_computed + n_new_tokens
        n_new_blocks = self.blocks_for(end) - len(seq.block_table)
        write_block = start // bs  # the first block this step writes into
        needs_copy = write_block < len(seq.block_table) and (
            self.allocator.ref_counts[seq.block_table[write_block]] > 1
        )
        if not self.can_allocate(n_new_blocks + needs_copy):
            raise OutOfBlocks(
                f"need {n_new_blocks + needs_copy} blocks, {self.allocator.n_free} free"
            )
        if needs_copy:
            src = seq.block_table[write_block]
            dst = self.allocator.allocate()
            self.pending_copies.append((src, dst))
            self.allocator.release(src, cached=src in self.block_key)
            seq.block_table[write_block] = dst
        for _ in range(n_new_blocks):
            seq.block_table.append(self.allocator.allocate())

    def trim(self, seq: Sequence) -> None:
        """Release seq's blocks past its tokens (speculation reserved room for proposals the
        model then rejected); they hold no verified token, so no prefix-cache key either."""
        keep = self.blocks_for(len(seq.token_ids))
        while len(seq.block_table) > keep:
            block_id = seq.block_table.pop()
            self.allocator.release(block_id, cached=block_id in self.block_key)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every block of parent (n > 1 sampling)."""
        for block_id in parent.block_table:
            self.allocator.share(block_id)
        child.block_table = list(parent.block_table)
        child.num_computed = parent.num_computed

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks (finish, abort, preemption)."""
        for block_id in reversed(
            seq.block_table
        ):  # tail first: the LRU evicts a prefix's end first
            self.allocator.release(block_id, cached=block_id in self.block_key)
        seq.block_table = []
        seq.num_computed = 0

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
