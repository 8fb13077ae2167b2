"""device_sampling.sample_reference on torch: a DeviceSampling table sampled where the logits are.

All rows at once, in float32: penalties scattered from the padded histories, temperature,
top-k as a threshold at each row's k-th largest, top-p over one stable descending sort, min-p,
then one inverse-CDF draw per row from the table's uniforms. A filter no row uses is skipped (no
sort when no row has top-k or top-p). Only (D,) ids, and the logprobs asked for, leave the device.
tests/test_torch_graphs.py holds it to the reference and to the distribution of sampling.py.
"""

from __future__ import annotations

import numpy as np
import torch

from ..device_sampling import DeviceSampling
from .torch_decoder import to_device


def sample_on_device(
    logits: torch.Tensor, t: DeviceSampling
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D, V) logits of t's rows -> ids (D,), chosen logprobs (D,), top ids / logprobs (D, n)."""
    dev = logits.device
    D, V = logits.shape
    floats = np.stack(
        [t.temperature, t.top_p, t.min_p, t.repetition, t.presence, t.frequency, t.u]
    ).astype(np.float32)  # (7, D)
    temperature, top_p, min_p, rep, presence, freq, u = to_device(floats, dev).unbind(0)
    x = logits.float().clone()  # (D, V) our copy: the penalties edit it
    raw = torch.log_softmax(x, dim=-1) if t.logprobs.any() else None  # the model's own
    if (t.repetition != 1.0).any():
        seen = torch.zeros((D, V + 1), dtype=torch.bool, device=dev)
        seen.scatter_(1, to_device(t.seen, dev), True)  # column V: the padding, dropped
        penalized = torch.where(x > 0, x / rep[:, None], x * rep[:, None])
        x = torch.where(seen[:, :V], penalized, x)
    if (t.presence != 0).any() or (t.frequency != 0).any():
        out = to_device(t.output, dev)
        counts = torch.zeros((D, V + 1), dtype=torch.float32, device=dev)
        counts.scatter_add_(1, out, torch.ones(out.shape, dtype=torch.float32, device=dev))
        counts = counts[:, :V]
        x = x - (freq[:, None] * counts + presence[:, None] * (counts > 0))
    greedy_ids = x.argmax(dim=-1)  # (D,) the rows at temperature 0 take this
    greedy = temperature == 0
    z = x / torch.where(greedy, 1.0, temperature)[:, None]
    if (t.top_k < V).any():
        k = to_device(t.top_k, dev)
        kth = torch.sort(z, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        z = torch.where(z >= kth, z, float("-inf"))  # ties with the k-th stay, as np.partition
    probs = torch.softmax(z, dim=-1)  # (D, V)
    if (t.top_p < 1.0).any():
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        # a token stays if the mass before it is below p
        keep_sorted = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p[:, None]
        keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    if (t.min_p > 0).any():
        floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(probs < floor, 0.0, probs)
    cdf = torch.cumsum(probs, dim=-1)  # (D, V), unnormalized: the draw scales by its total
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    ids = torch.where(greedy, greedy_ids, drawn.clamp(max=V - 1))
    n = t.max_top
    if raw is None:
        empty = torch.zeros((D, 0), device=dev)
        return ids, torch.full((D,), float("nan"), device=dev), empty.long(), empty
    chosen = raw.gather(1, ids[:, None])[:, 0]
    if n:
        top_lp, top_ids = torch.topk(raw, n, dim=-1)  # (D, n) sorted, most likely first
    else:
        top_lp, top_ids = raw[:, :0], torch.zeros((D, 0), dtype=torch.int64, device=dev)
    return ids, chosen, top_ids, top_lp
