"""Sampling on the backend's device: a step's sampled rows as one table, and its NumPy specification.

On a GPU, sending every sampled row's logits (V floats each) to the host costs more than the
sampling itself. A backend that says `samples_on_device` takes a DeviceSampling table with the
forward (Backend.forward_sample) and returns only token ids (and logprobs where asked): the
engine builds the table from each row's SamplingParams and history, the backend runs it as array
ops (the torch twin: backends/torch_sampling.py), and `sample_reference` here is what both mean.

Same order of operations as sampling.sample_row: penalties, temperature, top-k, top-p, min-p,
one draw; logprobs are the model's own distribution. The draw differs: sample_row pulls from each
sequence's NumPy generator, a device cannot; here each row's uniform is a hash of (seed, sequence
index, output position), computed on the host. So the same seed gives the same text, batched or
alone, but not sample_row's text; greedy rows (temperature 0) are the argmax, as there.
Rows with token rules, grammars or siblings to fork stay on the host sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sampling import Sample, SamplingParams, apply_penalties, filtered_probs, log_softmax

_M64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, (D,) uint64 -> (D,) uint64 (the products wrap modulo 2^64)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seeds, indices, positions) -> np.ndarray:
    """(D,) draws in [0, 1): of sequence indices[d] of a request seeded seeds[d] (any int, folded
    to 64 bits), at output positions[d]."""
    with np.errstate(over="ignore"):
        z = _mix(np.array([s & _M64 for s in seeds], dtype=np.uint64).reshape(-1))
        z = _mix(z ^ np.asarray(indices, dtype=np.uint64).reshape(-1))
        z = _mix(z ^ np.asarray(positions, dtype=np.uint64).reshape(-1))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53  # the top 53 bits


def uniform(seed: int, index: int, position: int) -> float:
    """One draw of `uniforms`."""
    return float(uniforms([seed], [index], [position])[0])


@dataclass(frozen=True, slots=True)
class DeviceSampling:
    """D rows of a step's logits to sample on the device (legend in config.py; W: the longest
    history). Histories are padded with V, one past the vocabulary, which scatters to a column
    that is dropped."""

    rows: np.ndarray  # (D,) int64: which of the step's logits rows (0..R-1), increasing
    temperature: np.ndarray  # (D,) float32; 0: the argmax after penalties
    top_k: np.ndarray  # (D,) int64; V: no top-k
    top_p: np.ndarray  # (D,) float32
    min_p: np.ndarray  # (D,) float32
    repetition: np.ndarray  # (D,) float32
    presence: np.ndarray  # (D,) float32
    frequency: np.ndarray  # (D,) float32
    seen: np.ndarray  # (D, W) int64: prompt + output ids (repetition penalty), V-padded
    output: np.ndarray  # (D, W) int64: output ids (presence / frequency), V-padded
    u: np.ndarray  # (D,) float64: each row's uniform draw
    logprobs: np.ndarray  # (D,) bool: SamplingParams.logprobs was given (the chosen one's too)
    top_n: np.ndarray  # (D,) int64: how many top logprobs (SamplingParams.logprobs or 0)
    vocab_size: int  # V

    @classmethod
    def build(cls, entries: list[tuple], vocab_size: int) -> DeviceSampling:
        """From (row, params, seed, index, prompt_ids, output_ids, position) per row, rows
        increasing. output_ids: the history this row samples after (a proposal's row: with the
        proposals before it); position: its index among the outputs. The histories are read
        only where a penalty needs them (the engine may pass () otherwise)."""
        V = vocab_size
        penalized = [e for e in entries if e[1].repetition_penalty != 1.0]
        counted = [e for e in entries if e[1].presence_penalty or e[1].frequency_penalty]
        w_seen = max((len(e[4]) + len(e[5]) for e in penalized), default=0)
        w_out = max((len(e[5]) for e in counted), default=0)
        D = len(entries)
        seen = np.full((D, w_seen), V, dtype=np.int64)
        output = np.full((D, w_out), V, dtype=np.int64)
        for d, (_, p, _, _, prompt_ids, output_ids, _) in enumerate(entries):
            if p.repetition_penalty != 1.0:
                history = list(prompt_ids) + list(output_ids)
                seen[d, : len(history)] = history
            if p.presence_penalty or p.frequency_penalty:
                output[d, : len(output_ids)] = output_ids
        ps: list[SamplingParams] = [e[1] for e in entries]

        def col(f, dtype):
            return np.array([f(p) for p in ps], dtype=dtype).reshape(D)

        return cls(
            rows=np.array([e[0] for e in entries], dtype=np.int64).reshape(D),
            temperature=col(lambda p: p.temperature, np.float32),
            top_k=col(lambda p: min(p.top_k or V, V), np.int64),
            top_p=col(lambda p: p.top_p, np.float32),
            min_p=col(lambda p: p.min_p, np.float32),
            repetition=col(lambda p: p.repetition_penalty, np.float32),
            presence=col(lambda p: p.presence_penalty, np.float32),
            frequency=col(lambda p: p.frequency_penalty, np.float32),
            seen=seen,
            output=output,
            u=uniforms([e[2] for e in entries], [e[3] for e in entries], [e[6] for e in entries]),
            logprobs=col(lambda p: p.logprobs is not None, bool),
            top_n=col(lambda p: p.logprobs or 0, np.int64),
            vocab_size=V,
        )

    @property
    def n_rows(self) -> int:
        return int(self.rows.shape[0])

    @property
    def max_top(self) -> int:
        return int(self.top_n.max(initial=0))

    def samples(self, ids, chosen, top_ids, top_lp) -> list[Sample]:
        """(D,) ids, (D,) logprobs, (D, max_top) top ids and logprobs -> one Sample per row."""
        out = []
        for d, token in enumerate(np.asarray(ids).tolist()):
            if not self.logprobs[d]:
                out.append(Sample(int(token), float("nan"), None))
                continue
            n = int(self.top_n[d])
            top = dict(zip(top_ids[d, :n].tolist(), top_lp[d, :n].tolist()))
            out.append(Sample(int(token), float(chosen[d]), top))
        return out


def sample_reference(
    logits: np.ndarray, t: DeviceSampling
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(D, V) float32 logits of t's rows -> ids (D,), chosen logprobs (D,), top ids and logprobs
    (D, max_top): what a backend's forward_sample returns, row by row in NumPy."""
    D, V = logits.shape
    ids = np.zeros(D, dtype=np.int64)
    chosen = np.full(D, np.nan, dtype=np.float32)
    top_ids = np.zeros((D, t.max_top), dtype=np.int64)
    top_lp = np.zeros((D, t.max_top), dtype=np.float32)
    for d in range(D):
        raw = log_softmax(logits[d].astype(np.float32))
        p = SamplingParams(
            temperature=float(t.temperature[d]),
            top_k=int(t.top_k[d]),
            top_p=float(t.top_p[d]),
            min_p=float(t.min_p[d]),
            repetition_penalty=float(t.repetition[d]),
            presence_penalty=float(t.presence[d]),
            frequency_penalty=float(t.frequency[d]),
        )
        seen, output = t.seen[d][t.seen[d] < V], t.output[d][t.output[d] < V]
        x = apply_penalties(np.array(logits[d], dtype=np.float32), p, seen, output)
        if p.greedy:
            ids[d] = int(np.argmax(x))
        else:
            probs = filtered_probs(x.astype(np.float64), p)
            cdf = np.cumsum(probs)
            ids[d] = min(int(np.searchsorted(cdf, t.u[d] * cdf[-1], side="right")), V - 1)
        chosen[d] = raw[ids[d]]
        n = int(t.top_n[d])
        if n:
            idx = np.argsort(-raw, kind="stable")[:n]
            top_ids[d, :n], top_lp[d, :n] = idx, raw[idx]
    return ids, chosen, top_ids, top_lp
