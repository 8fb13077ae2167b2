"""Tensor parallelism for the torch backend over torch.distributed, as Megatron-LM shards a decoder.

`TorchBackend(tensor_parallel_size=K)` runs one model on K ranks: the engine's process is rank 0
and keeps the scheduler, the sampler and the detokenizer; ranks 1..K-1 are worker processes that
load the same checkpoint, hold their shard of every layer and their heads' KV cache, and run each
step they receive over the process group. In every layer:

- attention heads are split: q / k / v rows column-parallel (rank r holds heads r*H/K ..), o's
  columns row-parallel, one all-reduce of o's output; MLA (DeepSeek-V3, Kimi-K2) splits its query
  heads (q_b rows, the per-head absorptions, o's columns) and keeps the shared latent (kv_a, its
  cache) on every rank;
- the gated feed-forward: gate / up rows column-parallel, down's columns row-parallel, one
  all-reduce;
- a mixture of experts is expert-parallel: rank r holds experts r, r+K, ...; every rank routes all
  tokens alike (the router and its input are the same everywhere), computes its experts' share
  and the shared experts' column slice, and one all-reduce sums them.

Embeddings, norms and the head stay whole on every rank (only rank 0 computes the head). Sharding
is a transformation of the model's declared spec (models/spec.py), so it works with any family the
torch lowering runs. Collectives: gloo on the CPU, NCCL on CUDA, HCCL on Ascend (torch_npu); step
messages go over a gloo group in every case. tests/test_tensor_parallel.py holds K=2 to K=1.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import os
import signal
import socket
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import BackendError, ConfigError
from ..models import Linear
from ..models.spec import MLA, Decoder, DecoderLayer, GatedMLP, MoE

# collectives of the data path per device kind; step messages always travel over gloo
_COLLECTIVES = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
# a rank that has not answered a collective in this long is gone (the engine raises, not hangs);
# step messages wait as long as a server may idle
_STEP_TIMEOUT = datetime.timedelta(minutes=5)
_IDLE_TIMEOUT = datetime.timedelta(days=365)
_START_TIMEOUT = datetime.timedelta(minutes=2)


class TensorParallel:
    """One rank's view of the K ranks that run a model: its group, its shard of a spec."""

    def __init__(self, size: int, rank: int = 0, device: str = "cpu"):
        if size < 2:
            raise ValueError(f"tensor parallelism needs 2 or more ranks, got {size}")
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} outside 0..{size - 1}")
        self.size, self.rank = size, rank
        self.kind = torch.device(device).type
        if self.kind not in _COLLECTIVES:
            raise BackendError(f"tensor parallelism runs on cpu, cuda or npu, not {device!r}")
        self.group = self.control = None
        self.workers: list = []
        self.mla = False  # set by shard(): MLA keeps its latent cache whole on every rank

    # -- sharding a spec ------------------------------------------------------------------------

    def shard(self, spec: Decoder) -> Decoder:
        """This rank's part of every layer; the rest of the spec as it is."""
        H, KVH, K = spec.n_heads, spec.n_kv_heads, self.size
        self.mla = any(isinstance(layer.attn, MLA) for layer in spec.layers)
        for what, n in (("attention heads", H), ("kv heads", KVH)):
            if n % K:
                raise ConfigError(
                    f"tensor_parallel_size {K} does not divide the model's {n} {what}"
                )
        layers = tuple(self._layer(layer, spec) for layer in spec.layers)
        spec = dataclasses.replace(spec, layers=layers, n_heads=H // K, n_kv_heads=KVH // K)
        return _taken(spec, {})  # what every rank holds whole (embed, head, routers, ...)

    def _layer(self, layer: DecoderLayer, spec: Decoder) -> DecoderLayer:
        attn = layer.attn
        if isinstance(attn, MLA):
            attn = self._mla(attn, spec.n_heads)
        else:
            q, k, v = _split_rows(attn.qkv, _qkv_sizes(spec))
            attn = dataclasses.replace(
                attn, qkv=(self._rows(q), self._rows(k), self._rows(v)), o=self._cols(attn.o)
            )
        ffn = layer.ffn
        if isinstance(ffn, GatedMLP):
            ffn = self._mlp(ffn)
        elif isinstance(ffn, MoE):
            ffn = dataclasses.replace(
                ffn,
                experts=[
                    e if i % self.size == self.rank else None for i, e in enumerate(ffn.experts)
                ],
                shared=None if ffn.shared is None else self._mlp(ffn.shared),
            )
        return dataclasses.replace(layer, attn=attn, ffn=ffn)

    def _mla(self, attn: MLA, H: int) -> MLA:
        K, r = self.size, self.rank
        heads = slice(r * H // K, (r + 1) * H // K)
        return dataclasses.replace(
            attn,
            q_b=self._rows(attn.q_b),  # rows are heads of [rope, nope]: a run of whole heads
            q_absorb=attn.q_absorb[heads].contiguous(),
            v_up=attn.v_up[heads].contiguous(),
            o=self._cols(attn.o),
        )

    def _mlp(self, mlp: GatedMLP) -> GatedMLP:
        F = mlp.down.w.shape[1]
        if F % self.size:
            raise ConfigError(
                f"tensor_parallel_size {self.size} does not divide the feed-forward's {F} columns"
            )
        gate, up = _split_rows(mlp.gate_up, (F, F))
        return dataclasses.replace(
            mlp, gate_up=(self._rows(gate), self._rows(up)), down=self._cols(mlp.down)
        )

    def _rows(self, lin: Linear) -> Linear:
        """Column-parallel: this rank's run of output features (and bias)."""
        n = lin.w.shape[0] // self.size
        cut = slice(self.rank * n, (self.rank + 1) * n)
        return Linear(_taken(lin.w[cut]), None if lin.b is None else lin.b[cut].contiguous())

    def _cols(self, lin: Linear) -> Linear:
        """Row-parallel: this rank's run of input features; the bias whole (the lowering adds it
        to the sum over ranks, on every rank alike)."""
        n = lin.w.shape[1] // self.size
        return Linear(_taken(lin.w[:, self.rank * n : (self.rank + 1) * n]), lin.b)

    def kv_layout(self, layout: list[dict[str, tuple[int, ...]]]) -> list[dict[str, tuple]]:
        """This rank's cache: its kv heads of "k" / "v" (GQA); MLA's latent whole."""
        if self.mla:
            return layout
        return [
            {name: (shape[0] // self.size, *shape[1:]) for name, shape in spec.items()}
            for spec in layout
        ]

    # -- the group ------------------------------------------------------------------------------

    def launch(self, checkpoint_path: str, device: str, dtype: str) -> None:
        """Rank 0: start ranks 1..K-1 on `checkpoint_path` and join them in one group."""
        host, port = "127.0.0.1", _free_port()
        ctx = mp.get_context("spawn")
        for rank in range(1, self.size):
            p = ctx.Process(
                target=_worker,
                args=(self.size, rank, host, port, str(checkpoint_path), device, dtype),
                daemon=True,  # never outlives the engine's process
                name=f"tinyserve-tp-rank{rank}",
            )
            p.start()
            self.workers.append(p)
        try:
            self.join(host, port)
        except (RuntimeError, ValueError, OSError) as e:  # torch.distributed's, the wait's
            self.close()
            raise BackendError(f"tensor-parallel ranks did not start: {e}") from None

    def join(self, host: str, port: int) -> None:
        if self.kind == "cpu":
            # K ranks on one CPU: each takes its share of the cores. torch's default (every
            # core per process) oversubscribes them, and its spinning threads then make a
            # step ~15x slower at K = 2 on two cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.size))
        store = dist.TCPStore(
            host, port, self.size, self.rank == 0, timeout=_START_TIMEOUT, wait_for_workers=False
        )
        if self.rank == 0:
            self._wait_for_workers(store)
        else:
            store.set(f"up{self.rank}", "1")
        dist.init_process_group(
            _COLLECTIVES[self.kind],
            store=store,
            rank=self.rank,
            world_size=self.size,
            timeout=_STEP_TIMEOUT,
        )
        self.group = dist.group.WORLD
        self.control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)

    def _wait_for_workers(self, store) -> None:
        """Until every worker has loaded its checkpoint and checked in; a worker that died on
        the way (a bad file, no device, a script without a __main__ guard) fails it at once."""
        keys = [f"up{rank}" for rank in range(1, self.size)]
        deadline = time.monotonic() + _START_TIMEOUT.total_seconds()
        while not store.check(keys):
            dead = [p for p in self.workers if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with status {dead[0].exitcode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer in {_START_TIMEOUT.total_seconds():.0f} s")
            time.sleep(0.05)

    def send(self, *message: Any) -> None:
        """Rank 0: hand every other rank one step message (the batch's host arrays)."""
        dist.broadcast_object_list([message], src=0, group=self.control)

    def receive(self) -> tuple:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place (every rank ends with the same values)."""
        dist.all_reduce(x, group=self.group)
        return x

    def close(self) -> None:
        """Rank 0: stop the workers and leave the group (idempotent)."""
        if self.group is not None and self.rank == 0:
            with contextlib.suppress(RuntimeError):  # a worker already gone: joined below
                self.send("stop")
        for p in self.workers:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.workers = []
        if self.group is not None:
            dist.destroy_process_group()
            self.group = self.control = None


class Deferred:
    """A weight not read yet: the checkpoint's (memory-mapped) tensor, its rows in `order` if
    given, taken by `ops` once the rank knows its shard. Slicing it reads nothing; `take` reads
    only what the slice covers, so a rank never holds a dequantized copy of a matrix it keeps a
    1/K of (or an expert it does not hold). Under tensor parallelism TorchOps.weight hands these
    out; the shard takes them."""

    __slots__ = ("ops", "order", "source")

    def __init__(self, source, ops, order: np.ndarray | None = None):
        self.source, self.ops, self.order = source, ops, order

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.source.shape)
        return shape if self.order is None else (len(self.order), *shape[1:])

    def __getitem__(self, key) -> Deferred:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if self.order is None:
            return Deferred(_slice(self.source, rows, cols), self.ops)
        return Deferred(_slice(self.source, slice(None), cols), self.ops, self.order[rows])

    def take(self):
        """The weight on the device, in the compute dtype (TorchOps.weight's upload)."""
        source = self.source if self.order is None else _take_rows(self.source, self.order)
        return self.ops.upload_weight(source)


def _take_rows(source, order: np.ndarray):
    """source's rows in order, read (raw blocks for a QuantTensor, bits for a BF16Array)."""
    from ..loading.safetensors_file import BF16Array

    if hasattr(source, "take_rows"):
        return source.take_rows(order)
    if isinstance(source, BF16Array):
        return BF16Array(source.bits[order])
    return source[order]


def _slice(source, rows: slice, cols: slice):
    """source[rows, cols] without reading it: a view of the mmap, or of a QuantTensor's blocks
    (columns cut at block boundaries; a cut inside a block reads those rows whole)."""
    from ..loading.gguf_file import QuantTensor
    from ..loading.safetensors_file import BF16Array

    if isinstance(source, BF16Array):
        return BF16Array(source.bits[rows, cols])
    if not isinstance(source, QuantTensor):
        return source[rows, cols]
    data = source.data[rows]
    n_rows, n_cols = data.shape[0], source.shape[1]
    start, stop, step = cols.indices(n_cols)
    bs, ts = source.block_size, source.type_size
    if (start, stop, step) == (0, n_cols, 1):
        return QuantTensor(source.qtype, (n_rows, n_cols), data)
    if step != 1 or start % bs or stop % bs:
        return QuantTensor(source.qtype, (n_rows, n_cols), data).dequantize()[:, cols]
    block_cols = data[:, start // bs * ts : stop // bs * ts]
    return QuantTensor(source.qtype, (n_rows, stop - start), block_cols)


def _taken(x, seen: dict | None = None):
    """x with every Deferred in it taken (a weight shared by two fields, as a tied head, once)."""
    if isinstance(x, Deferred):
        if seen is None:
            return x.take()
        if id(x) not in seen:
            seen[id(x)] = x.take()
        return seen[id(x)]
    if seen is None:  # a tensor that was never deferred
        return x.contiguous()
    if isinstance(x, (list, tuple)):
        return type(x)(_taken(v, seen) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        changes = {f.name: _taken(getattr(x, f.name), seen) for f in dataclasses.fields(x)}
        return dataclasses.replace(x, **changes)
    return x


def _worker(size, rank, host, port, path, device, dtype) -> None:
    """Ranks 1..K-1: load the checkpoint, shard it, run every step rank 0 sends until "stop"."""
    _die_with_parent()
    from ..loading import load_checkpoint
    from ..models import build_model
    from .torch_backend import TorchBackend

    backend = TorchBackend(device=_rank_device(device, rank), dtype=dtype)
    backend.tp = TensorParallel(size, rank, device)
    backend.ops.defer_weights = True  # each read once its shard is known
    checkpoint = load_checkpoint(path)
    model = build_model(checkpoint.config, checkpoint.tensors, backend.ops)
    backend.tp.join(host, port)
    backend.prepare(checkpoint, model)
    kv = None
    while True:
        what, *args = backend.tp.receive()
        if what == "stop":
            break
        if what == "allocate":
            kv = backend.allocate_kv(*args)
        elif what == "forward":
            backend.forward_shard(model, args[0], kv)
        elif what == "copy":
            backend.copy_blocks(kv, *args)
    dist.destroy_process_group()


def _rank_device(device: str, rank: int) -> str:
    """cuda:i -> cuda:i+rank (one device per rank); the CPU is shared."""
    d = torch.device(device)
    if d.type == "cpu":
        return "cpu"
    return f"{d.type}:{(d.index or 0) + rank}"


def _die_with_parent() -> None:
    """Linux: the kernel ends this worker when the engine's process dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _qkv_sizes(spec: Decoder) -> tuple[int, int, int]:
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    return q, kv, kv


def _split_rows(lins: tuple[Linear, ...], sizes: tuple[int, ...]) -> tuple[Linear, ...]:
    """(q, k, v) / (gate, up) as separate Linears: a fused matrix cut into its row ranges."""
    if len(lins) == len(sizes):
        return lins
    (lin,) = lins
    parts, start = [], 0
    for n in sizes:
        cut = slice(start, start + n)
        parts.append(Linear(lin.w[cut], None if lin.b is None else lin.b[cut]))
        start += n
    return tuple(parts)
