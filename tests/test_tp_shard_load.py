"""Tensor parallelism reads each rank's shard from the checkpoint, not the whole model.

Oracles: every matrix a rank uploads is traced back, by address, to the memory-mapped
checkpoint tensor it is a view of; a rank reads 1/K of each matrix it shards (q/k/v, o,
gate/up, down, MLA's q_b), all of each expert it holds and none of the others', and whole only
what every rank holds (embeddings, head, routers, the MLA latent's projections). The bytes of
the weights a rank ends with follow from that. A QuantTensor's block columns, sliced, dequantize
to the columns of the whole. Ranks are built in this process (no group is joined): the sharding
and the reads are the same as in a worker; tests/test_tensor_parallel.py holds the logits.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tinyserve.backends.torch_backend import TorchBackend, TorchOps
from tinyserve.backends.torch_decoder import TorchDecoder
from tinyserve.backends.torch_tp import Deferred, TensorParallel, _slice
from tinyserve.loading import load_checkpoint
from tinyserve.loading.ggml_types import GGMLQuantizationType
from tinyserve.loading.gguf_file import QuantTensor
from tinyserve.loading.safetensors_file import BF16Array
from tinyserve.models import build_model
from tinyserve.models.spec import MLA

HF = Path(__file__).parent / "fixtures" / "hf"
K = 2
SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_b_proj")
WHOLE = ("embed_tokens", "lm_head", "gate.weight", "kv_a_proj", "q_a_proj")


def _raw(source) -> np.ndarray:
    return source.bits if isinstance(source, BF16Array) else source


def _owner(view: np.ndarray, tensors: dict) -> str | None:
    """The checkpoint tensor whose memory view lies in (None: a copy made at build)."""
    start = view.__array_interface__["data"][0]
    for name, t in tensors.items():
        t = _raw(t)
        base = t.__array_interface__["data"][0]
        if base <= start < base + t.nbytes:
            return name
    return None


def _rank(name: str, rank: int, monkeypatch) -> tuple[dict[str, float], int, dict]:
    """(share of each checkpoint tensor rank reads, bytes of the rank's weights, tensors)."""
    checkpoint = load_checkpoint(HF / name)
    reads: dict[str, float] = defaultdict(float)

    def read(raw: np.ndarray, n_rows: int) -> None:
        owner = _owner(raw, checkpoint.tensors)
        if owner is not None:
            whole = _raw(checkpoint.tensors[owner])
            reads[owner] += n_rows * int(np.prod(raw.shape[1:])) / whole.size

    upload, take = TorchOps.upload_weight, Deferred.take

    def traced_upload(self, w):  # one rank: every matrix whole
        read(_raw(w), _raw(w).shape[0])
        return upload(self, w)

    def traced_take(self):  # a shard: what it reads of the file (rows in order, if any)
        raw = _raw(self.source)
        read(raw, raw.shape[0] if self.order is None else len(self.order))
        return take(self)

    if rank is None:
        monkeypatch.setattr(TorchOps, "upload_weight", traced_upload)
    else:
        monkeypatch.setattr(Deferred, "take", traced_take)
    backend = TorchBackend(device="cpu", dtype="float32")
    if rank is not None:
        backend.tp = TensorParallel(K, rank)
        backend.ops.defer_weights = True
    model = build_model(checkpoint.config, checkpoint.tensors, backend.ops)
    spec = TorchDecoder(model.lowering_spec(), backend).spec
    held = {id(t): t for t in _tensors(spec)}
    # MLA's per-head absorptions are made at build, not read: the shard keeps its heads' part
    per_head = sum(
        layer.attn.q_absorb.nbytes + layer.attn.v_up.nbytes
        for layer in model.lowering_spec().layers
        if isinstance(layer.attn, MLA)
    )
    rank_bytes = sum(t.numel() * t.element_size() for t in held.values())
    return dict(reads), rank_bytes, checkpoint, per_head


def _tensors(x):
    import dataclasses

    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield from _tensors(getattr(x, f.name))


@pytest.mark.parametrize("name", ["llama", "llama_bf16", "qwen3", "mixtral", "deepseek_v3"])
def test_a_rank_reads_only_its_shard_of_the_checkpoint(name, monkeypatch):
    whole_reads, whole_bytes, checkpoint, per_head = _rank(name, None, monkeypatch)
    per_rank = [_rank(name, r, monkeypatch) for r in range(K)]
    matrices = [n for n, t in checkpoint.tensors.items() if len(_raw(t).shape) == 2]
    sharded = [n for n in matrices if any(s in n for s in SHARDED) and ".experts." not in n]
    experts = [n for n in matrices if ".experts." in n]
    assert sharded, "the fixture has no matrix to shard"
    for rank, (reads, *_) in enumerate(per_rank):
        for n in sharded:
            assert reads.get(n, 0) == pytest.approx(1 / K), (rank, n)
        for n in experts:  # expert parallel: whole or not at all
            held = int(n.split(".experts.")[1].split(".")[0]) % K == rank
            assert reads.get(n, 0) == (1.0 if held else 0), (rank, n)
        for n in matrices:
            if any(w in n for w in WHOLE) and n not in sharded:
                assert reads.get(n, 0) == whole_reads.get(n, 0), (rank, n)
        assert all(share <= 1.0 for share in reads.values()), reads  # nothing read twice
    # what one rank keeps: the whole minus (K-1)/K of what the ranks split
    split = sum(_raw(checkpoint.tensors[n]).size * 4 for n in sharded + experts) + per_head
    for _, rank_bytes, *_ in per_rank:
        assert rank_bytes == pytest.approx(whole_bytes - split * (K - 1) / K, rel=1e-6)
    if experts or sharded:  # and so less than the whole by about (K-1)/K of the split part
        assert per_rank[0][1] < whole_bytes


def test_a_quantized_matrix_is_sliced_by_its_blocks():
    rng = np.random.default_rng(0)
    rows, cols, bs, ts = 6, 128, 32, 34  # Q8_0: an f16 scale and 32 int8 per block
    blocks = np.zeros((rows, cols // bs, ts), dtype=np.uint8)
    blocks[:, :, :2] = np.frombuffer(
        rng.uniform(0.01, 0.1, rows * cols // bs).astype(np.float16).tobytes(), np.uint8
    ).reshape(rows, cols // bs, 2)
    blocks[:, :, 2:] = rng.integers(0, 256, (rows, cols // bs, 32), dtype=np.uint8)
    q = QuantTensor(GGMLQuantizationType.Q8_0, (rows, cols), blocks.reshape(rows, -1))
    whole = q.dequantize()
    part = _slice(q, slice(2, 4), slice(64, 128))  # a row-parallel rank's columns, two rows
    assert isinstance(part, QuantTensor) and part.data.nbytes == q.data.nbytes // 3 // 2
    assert np.array_equal(part.dequantize(), whole[2:4, 64:128])
    assert np.array_equal(_slice(q, slice(0, 3), slice(None)).dequantize(), whole[:3])
    inside = _slice(q, slice(None), slice(16, 48))  # a cut inside blocks: those columns only
    assert np.array_equal(inside, whole[:, 16:48])
