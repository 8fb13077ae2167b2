"""Mixture-of-experts feed-forward: routers and expert weights shared by Mixtral and DeepSeek-V3.

A router scores E experts per token from its hidden state and keeps K of them; the backend's
`moe` op then runs each chosen expert's gated MLP on the tokens routed to it and sums the results
weighted by the router. Routing is a small (N, E) decision, made here in NumPy for every backend.

References: Shazeer et al. 2017 (sparsely-gated MoE); Jiang et al. 2024 (Mixtral: softmax, top-k,
renormalize); DeepSeek-AI 2024 (DeepSeek-V3: sigmoid scores, a bias that steers only the choice,
group-limited top-k, shared experts). Routers follow transformers' MixtralTopKRouter and
DeepseekV3TopkRouter.
"""

from __future__ import annotations

import numpy as np

from . import WeightReader


def route_softmax(logits: np.ndarray, k: int, renormalize: bool = True):
    """(N, E) -> (N, K) expert ids, (N, K) weights: softmax over experts, keep the top k."""
    logits = logits.astype(np.float32)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))  # subtract the max for stability
    p /= p.sum(axis=-1, keepdims=True)  # (N, E)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]  # (N, K)
    weights = np.take_along_axis(p, ids, axis=-1)  # (N, K)
    if renormalize:  # Mixtral: the k chosen weights sum to 1
        weights /= weights.sum(axis=-1, keepdims=True)
    return ids, weights


def route_sigmoid_grouped(
    logits: np.ndarray,
    bias: np.ndarray,
    k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scale: float,
):
    """(N, E), (E,) -> (N, K) ids, (N, K) weights: DeepSeek-V3's group-limited routing.

    Sigmoid scores; the bias (load balancing) shifts which experts are chosen but not their weights;
    a group's merit is the sum of its two best biased scores, and only the topk_group best groups
    may supply experts."""
    N, E = logits.shape
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))  # (N, E)
    choice = scores + bias.astype(np.float32)  # (N, E)
    per_group = np.sort(choice.reshape(N, n_group, E // n_group), axis=-1)  # (N, G, E/G)
    group_merit = per_group[..., -2:].sum(axis=-1)  # (N, G)
    best_groups = np.argsort(-group_merit, axis=-1, kind="stable")[
        :, :topk_group
    ]  # (N, topk_group)
    allowed = np.zeros((N, n_group), dtype=bool)
    np.put_along_axis(allowed, best_groups, True, axis=-1)
    choice = np.where(np.repeat(allowed, E // n_group, axis=1), choice, -np.inf)  # (N, E)
    ids = np.argsort(-choice, axis=-1, kind="stable")[:, :k]  # (N, K)
    weights = np.take_along_axis(scores, ids, axis=-1)  # (N, K)
    if renormalize:
        weights /= weights.sum(axis=-1, keepdims=True) + 1e-20
    return ids, (weights * np.float32(scale)).astype(np.float32)


def split_experts(t, n_experts: int) -> list:
    """A stacked GGUF tensor (E*out, in) QuantTensor or (E, out, in) array -> E (out, in) tensors."""
    if hasattr(t, "qtype"):  # quantized: per-expert row ranges of the raw blocks, no copy
        rows = t.shape[0] // n_experts
        return [
            type(t)(t.qtype, (rows, t.shape[1]), t.data[e * rows : (e + 1) * rows])
            for e in range(n_experts)
        ]
    arr = np.asarray(t.dequantize() if hasattr(t, "dequantize") else t)
    arr = arr.reshape(n_experts, -1, arr.shape[-1])  # (E, out, in)
    return [arr[e] for e in range(n_experts)]


def load_experts(
    take: WeightReader,
    prefix: str,
    names: tuple[str, str, str],
    n_experts: int,
    ffn: int,
    hidden: int,
    ops,
    stacked: tuple[str, str, str] | None = None,
) -> list[tuple]:
    """E x (gate (F, D), up (F, D), down (D, F)) held by the backend.

    HF checkpoints name each expert's matrices ({prefix}.{e}.{name}.weight); GGUF stacks them
    (`stacked` names, one tensor per kind for all experts)."""
    shapes = ((ffn, hidden), (ffn, hidden), (hidden, ffn))
    if stacked is not None and take.has(f"{prefix}.{stacked[0]}.weight"):
        per_kind = []
        for name, (rows, cols) in zip(stacked, shapes):
            t = take.tensors[f"{prefix}.{name}.weight"]
            if tuple(t.shape) not in ((n_experts * rows, cols), (n_experts, rows, cols)):
                take(f"{prefix}.{name}.weight", (n_experts, rows, cols))  # raises with the shapes
            per_kind.append(split_experts(t, n_experts))
        return [tuple(ops.weight(kind[e]) for kind in per_kind) for e in range(n_experts)]
    return [
        tuple(
            ops.weight(take(f"{prefix}.{e}.{name}.weight", shape))
            for name, shape in zip(names, shapes)
        )
        for e in range(n_experts)
    ]
