"""Pinning a mixture of experts' router choices to the reference's (check_logits below float32)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np


@contextmanager
def _pinned_routing(choices: list | None, replay: bool):
    """Record each router call's expert ids into `choices`, or (replay) make each call pick the
    recorded experts, weighted from this run's own router logits. choices None: routers untouched."""
    if choices is None:
        yield
        return
    from ..models import deepseek_v3, mixtral

    calls = iter(choices)

    def pinned_softmax(route):
        def call(logits, k, renormalize=True):
            ids, weights = route(logits, k, renormalize)
            if not replay:
                choices.append(ids)
                return ids, weights
            ids = next(calls)
            assert ids.shape == (logits.shape[0], k), "router calls differ from the reference's"
            z = logits.astype(np.float32)
            p = np.exp(z - z.max(axis=-1, keepdims=True))  # softmax, as route_softmax
            weights = np.take_along_axis(p / p.sum(axis=-1, keepdims=True), ids, axis=-1)
            if renormalize:
                weights /= weights.sum(axis=-1, keepdims=True)
            return ids, weights

        return call

    def pinned_sigmoid(route):
        def call(logits, bias, k, *args):
            if not replay:
                ids, weights = route(logits, bias, k, *args)
                choices.append(ids)
                return ids, weights
            ids = next(calls)
            assert ids.shape == (logits.shape[0], k), "router calls differ from the reference's"
            # the bias steers only the choice: a large one on the recorded experts picks them
            # (and their groups) while their weights still come from this run's scores
            push = np.zeros(logits.shape, np.float32)  # (N, E)
            np.put_along_axis(push, ids, np.float32(1e4), axis=-1)
            return route(logits, np.asarray(bias, np.float32)[None, :] + push, k, *args)

        return call

    patches = [
        (mixtral, "route_softmax", pinned_softmax),
        (deepseek_v3, "route_softmax", pinned_softmax),
        (deepseek_v3, "route_sigmoid_grouped", pinned_sigmoid),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, wrap in patches:
            setattr(module, name, wrap(getattr(module, name)))
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
    if replay:
        assert next(calls, None) is None, "fewer router calls than in the reference run"
