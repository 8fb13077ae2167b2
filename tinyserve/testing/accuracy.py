"""An engine's next-token distributions against a reference's, on the same token ids.

The figures issue 17 judges the int8 path by, defined once: tests/test_int8_accuracy.py computes
tinyserve's with them and scripts/accuracy_vs_llamacpp.py llama.cpp's, so the two are the same
sums over the same positions. Position t's distribution predicts ids[t + 1]; KL and top-1 run
over all T positions, perplexity over the T - 1 that have a next token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHUNK_ROWS = 64  # float64 rows of a 262k vocab are 2 MiB each: compare a few at a time


@dataclass(frozen=True, slots=True)
class Accuracy:
    """One engine against the reference over one text."""

    positions: int
    kl: float  # mean KL(reference || engine) in nats
    kls: np.ndarray = field(repr=False)  # (T,) KL(reference || engine) at each position
    top1: float  # share of positions whose argmax is the reference's
    perplexity: float  # the engine's, of ids[1:]
    reference_perplexity: float
    disagree: np.ndarray = field(repr=False)  # positions whose argmax differs from the reference's
    # the reference's top-1 minus top-2 log-probability at those positions (near-ties are small)
    margins: np.ndarray = field(repr=False)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """(T, V) logits -> (T, V) float64 log-probabilities; subtract the max for stability."""
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref_logits: np.ndarray, logits: np.ndarray, ids) -> Accuracy:
    """(T, V) reference, (T, V) engine, T ids -> the engine's Accuracy against the reference."""
    if ref_logits.shape != logits.shape or len(ids) != len(logits):
        raise ValueError(
            f"shapes differ: reference {ref_logits.shape}, engine {logits.shape}, {len(ids)} ids"
        )
    T = len(ids)
    nxt = np.append(np.asarray(ids[1:], dtype=np.int64), -1)  # (T,) the last has none
    kl, ref_nll, nll, disagree, margins = [], [], [], [], []
    for lo in range(0, T, CHUNK_ROWS):
        rows = slice(lo, min(lo + CHUNK_ROWS, T))
        want, got = log_softmax(ref_logits[rows]), log_softmax(logits[rows])  # (C, V)
        kl.append((np.exp(want) * (want - got)).sum(axis=-1))  # (C,)
        has_next = np.flatnonzero(nxt[rows] >= 0)
        ref_nll.append(-want[has_next, nxt[rows][has_next]])
        nll.append(-got[has_next, nxt[rows][has_next]])
        off = np.flatnonzero(want.argmax(axis=-1) != got.argmax(axis=-1))
        top2 = np.sort(np.partition(want[off], -2, axis=-1)[:, -2:], axis=-1)  # (n, 2) its two best
        disagree.append(lo + off)
        margins.append(top2[:, 1] - top2[:, 0])
    disagree_at, kls = np.concatenate(disagree), np.concatenate(kl)
    return Accuracy(
        positions=T,
        kl=float(kls.mean()),
        kls=kls,
        top1=1.0 - len(disagree_at) / T,
        perplexity=float(np.exp(np.concatenate(nll).mean())),
        reference_perplexity=float(np.exp(np.concatenate(ref_nll).mean())),
        disagree=disagree_at,
        margins=np.concatenate(margins),
    )


@dataclass(frozen=True, slots=True)
class Gap:
    """One engine minus another over the same positions, each gap with its paired standard
    error: the per-position KL differences, and the top-1 hits (+1 where only the first engine's
    argmax is the reference's, -1 where only the second's is)."""

    kl: float
    kl_se: float
    top1: float
    top1_se: float
    only_first_off: int  # positions where only the first engine's argmax is off the reference's
    only_second_off: int

    def no_worse(self, z: float = 2.0) -> bool:
        """The first engine is no worse than the second beyond z paired standard errors."""
        return self.kl <= z * self.kl_se and self.top1 >= -z * self.top1_se


def paired_gap(kls, disagree, other_kls, other_disagree) -> Gap:
    """Gap of engine 1 (per-position KLs, disagreeing positions) over engine 2 on one text."""
    kls, other_kls = np.asarray(kls, np.float64), np.asarray(other_kls, np.float64)
    if kls.shape != other_kls.shape:
        raise ValueError(f"positions differ: {kls.shape} and {other_kls.shape}")
    T = len(kls)
    hits = np.ones(T)
    hits[np.asarray(disagree, dtype=np.int64)] = 0
    other_hits = np.ones(T)
    other_hits[np.asarray(other_disagree, dtype=np.int64)] = 0
    d_kl, d_top1 = kls - other_kls, hits - other_hits
    return Gap(
        kl=float(d_kl.mean()),
        kl_se=float(d_kl.std(ddof=1) / np.sqrt(T)),
        top1=float(d_top1.mean()),
        top1_se=float(d_top1.std(ddof=1) / np.sqrt(T)),
        only_first_off=int((d_top1 < 0).sum()),
        only_second_off=int((d_top1 > 0).sum()),
    )


def ids_digest(ids) -> str:
    """sha256 of the token ids as little-endian int32: which tokens a recorded figure was over."""
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file (a GGUF: which weights a recorded figure was of)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()
