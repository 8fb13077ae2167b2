"""The Backend interface: what an executor (NumPy, Cython, torch on CUDA/NPU, ...) provides."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..batch import Batch
from ..step import StepMeta
from .lowering import LoweringCache


class Backend:
    """An executor for model code: holds weights its own way, owns the KV pools, runs forwards.

    A backend supplies `ops`, an object with the op set of `tinyserve.backends.numpy_ops.NumpyOps`
    (same names, same shape contracts), over whatever arrays it likes. Model files call only those.

    Fast paths are lowerings of the specs models declare (tinyserve/models/spec.py): a backend
    class lists them in `lowerings` (spec type -> factory(spec, backend) -> a callable
    (step, kv) -> logits); a model without a spec, or whose spec has no lowering here, runs its
    own forward op by op.

    Args:
        device: backend-specific device string (e.g. "cuda:0"); None for the default.
        dtype: compute dtype name ("float32", "bfloat16", ...); None for the default.
        lower: run models through this backend's lowerings where they apply (False: always the
            model file op by op).
    """

    name: str = ""
    ops: Any = None
    kv_itemsize: int = 4  # bytes per cached K/V element (sizes the pool from a byte budget)
    samples_on_device: bool = False  # the engine hands forward_sample its sampled rows
    lowerings: ClassVar[dict[type, Any]] = {}

    def __init__(self, device: str | None = None, dtype: str | None = None, lower: bool = True):
        self.device = device
        self.dtype = dtype
        self.lower = bool(lower)
        self._lowered = LoweringCache(self.lowerings)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(available, reason): whether this backend can run here and, if not, why."""
        return True, ""

    @classmethod
    def summary(cls) -> str:
        """One line for `tinyserve backends` when available: what it would run on here."""
        return ""

    def describe(self) -> str:
        """One line about this instance: what it runs on, in which dtype."""
        return ""

    def prepare(self, checkpoint, model) -> None:
        """Called once by the engine with the model it built, before the KV cache: a backend that
        runs a model over several processes (tensor parallelism) starts them here."""

    def allocate_kv(
        self, layer_specs: list[dict[str, tuple[int, ...]]], num_blocks: int, block_size: int
    ) -> list[dict[str, Any]]:
        """Per layer, one pool (NB, BS, *shape) per named entry of the model's cache layout."""
        return [
            {
                name: np.zeros((num_blocks, block_size, *shape), dtype=np.float32)
                for name, shape in spec.items()
            }
            for spec in layer_specs
        ]

    def copy_blocks(self, kv: list[dict[str, Any]], src: list[int], dst: list[int]) -> None:
        """Copy KV blocks src[i] -> dst[i] in every pool (copy-on-write)."""
        for layer in kv:
            for pool in layer.values():
                self.ops.copy_blocks(pool, np.asarray(src), np.asarray(dst))

    def lowered(self, model):
        """The lowering this backend runs model with (built at first use), or None: op by op."""
        cache = getattr(self, "_lowered", None)  # None: a subclass that skipped __init__
        if cache is None or not getattr(self, "lower", True) or not self.lowerings:
            return None
        return cache.get(model, self)

    def lowering(self, model) -> str | None:
        """The name of the lowering that runs model here, None when it runs op by op."""
        lowered = self.lowered(model)
        return None if lowered is None else lowered.name

    def step_meta(self, batch: Batch) -> StepMeta:
        """The step's metadata, built once per forward and handed to the model and its ops."""
        return StepMeta.build(batch)

    def forward(self, model, batch: Batch, kv: list[dict[str, Any]]) -> np.ndarray:
        """Run the model over one batch; returns float32 logits (R, V) of batch.logits_rows."""
        step = self.step_meta(batch)
        lowered = self.lowered(model)
        logits = model.forward(step, kv) if lowered is None else lowered(step, kv)
        return np.asarray(self.ops.to_numpy(logits), dtype=np.float32)

    def forward_greedy(
        self, model, batch: Batch, kv: list[dict[str, Any]], greedy: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Forward, then pick argmax tokens where the device can:
        (R,) bool -> (ids (G,), logits (R-G, V), finite (R,) bool).

        Rows marked in `greedy` need only their argmax (greedy, no penalties, no logprobs); the
        others come back as float32 logits, in row order. finite[r] says whether row r's logits
        were all finite: the engine ends a sequence whose row was not with finish_reason
        "error" (an argmax over NaN is no token). A device backend overrides this so only R
        token ids and flags (and the few rows the sampler needs) cross to the host."""
        logits = self.forward(model, batch, kv)
        finite = finite_rows(logits)
        if greedy.all():  # no copy of the (R, V) rows just to take their argmax
            return logits.argmax(axis=-1), logits[:0], finite
        return logits[greedy].argmax(axis=-1), logits[~greedy], finite

    def forward_sample(
        self, model, batch: Batch, kv: list[dict[str, Any]], greedy: np.ndarray, table
    ) -> tuple[np.ndarray, list, np.ndarray, np.ndarray]:
        """forward_greedy, with the rows of a device_sampling.DeviceSampling table sampled here
        too: -> (ids of the greedy rows (G,), one Sample per table row, logits of the other
        rows (R-G-D, V), finite (R,) bool). `greedy` and table.rows are disjoint.

        This reference samples on the host (device_sampling.sample_reference); a backend that
        sets samples_on_device overrides it so only the ids and asked-for logprobs cross."""
        from ..device_sampling import sample_reference

        logits = self.forward(model, batch, kv)
        finite = finite_rows(logits)
        in_table = np.zeros(len(greedy), dtype=bool)
        in_table[table.rows] = True
        samples = table.samples(*sample_reference(logits[table.rows], table))
        rest = ~(greedy | in_table)
        return logits[greedy].argmax(axis=-1), samples, logits[rest], finite


def finite_rows(x: np.ndarray) -> np.ndarray:
    """(R, V) -> (R,) bool: whether each row is all finite. One pass, no (R, V) temporary: a
    row's sum is NaN or infinite exactly when one of its values is (finite logits cannot sum
    past float32's 3e38)."""
    with np.errstate(over="ignore", invalid="ignore"):  # that is what we are looking for
        return np.isfinite(x.sum(axis=-1))
