"""Prefix affinity: which replica most likely holds a prompt's prefix in its KV cache.

A router cannot see the replicas' caches, so it remembers where it sent each prompt. The prompt's
text is cut into fixed chunks; each chunk is keyed by a hash chained over everything before it
(as the KV cache keys its blocks), and the key maps to the replicas that were sent a prompt
containing it. A new prompt walks its chain while some live replica holds the next chunk: the
replicas holding the longest match are the ones whose cache most likely saves its prefill.

The index is text, not tokens, so the ingress needs no tokenizer; a chat prompt is its messages
in order, which the chat template renders prefix for prefix. It is a guess bounded in size:
replicas evict blocks on their own, and the oldest chunks are forgotten first here.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Collection

CHUNK_CHARS = 64  # about one 16-token KV block of English text: coarser would miss short prefixes


def routing_text(body: bytes) -> str:
    """The text a request's prompt starts with, from its raw JSON body ("" when there is none)."""
    try:
        obj = json.loads(body)
    except ValueError:  # the replica answers the 400
        return ""
    if not isinstance(obj, dict):
        return ""
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):  # token ids: their decimal spelling keeps prefixes prefixes
        return " ".join(map(str, prompt))
    if isinstance(messages, list):
        return "".join(
            f"{m.get('role')}: {m.get('content')}\n" for m in messages if isinstance(m, dict)
        )
    return ""


def chunk_keys(text: str) -> list[int]:
    """One key per full chunk of text, each hashing its chunk and the key before it."""
    keys, parent = [], None
    for start in range(0, len(text) - CHUNK_CHARS + 1, CHUNK_CHARS):
        parent = hash((parent, text[start : start + CHUNK_CHARS]))
        keys.append(parent)
    return keys


class PrefixIndex:
    """Chunk key -> the replicas that were sent it; least recently used keys forgotten first."""

    def __init__(self, max_chunks: int = 100_000):
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        self.max_chunks = max_chunks
        self.holders: OrderedDict[int, set[str]] = OrderedDict()

    def match(self, text: str, replicas: Collection[str]) -> list[str]:
        """Those of `replicas` that hold the longest prefix of text; [] when none holds a chunk."""
        best: set[str] = set()
        for key in chunk_keys(text):
            holders = self.holders.get(key, set()) & set(replicas)
            if not holders:
                break
            best = holders
        return sorted(best)

    def record(self, text: str, replica: str) -> None:
        """text was sent to replica: its cache now holds text's chunks."""
        # last chunk first, so the first is the most recent: a chain is forgotten from its end,
        # and what remains still matches (as the KV cache evicts a prefix's tail first)
        for key in reversed(chunk_keys(text)):
            self.holders.setdefault(key, set()).add(replica)
            self.holders.move_to_end(key)
        while len(self.holders) > self.max_chunks:
            self.holders.popitem(last=False)
