"""The `torch` backend: the same model files on torch tensors, on cpu | cuda[:N] | npu | mps | xpu.

Weights are uploaded once at load (GGUF blocks and bf16 bits dequantized straight to the compute
dtype); the paged KV pools live in device memory; one forward runs the whole flat batch. Per step,
the batch's index arrays go to the device once, in a TorchStep (the StepMeta with device copies),
so no layer waits on the host. Attention gathers each sequence's blocks into a padded (S, L) view
and runs one masked scaled_dot_product_attention over all sequences, query heads grouped under
their KV head. A model declaring a Decoder spec runs the lowering of torch_decoder.py instead
(same maths, fewer kernel launches); `lower=False` runs it op by op. On CUDA that lowering's decode
steps can replay as CUDA graphs (torch_graphs.py, `graphs=True`), sampled rows are drawn on the
device (torch_sampling.py), and decode attention can come from FlashInfer or flash-attn
(torch_attention.py).

This module imports torch at import time; the registry imports it only when "torch" is asked for,
so `import tinyserve` never does.
"""

from __future__ import annotations

import importlib
import importlib.util
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..batch import Batch
from ..errors import BackendError
from ..models.spec import Decoder
from ..step import StepMeta, as_step
from .base import Backend
from .lowering import NotLowerable

try:
    import torch
    import torch.nn.functional as F

    from .torch_attention import KERNELS
    from .torch_decoder import TorchDecoder, to_device
    from .torch_graphs import DecodeGraphs
    from .torch_sampling import sample_on_device
    from .torch_tp import TensorParallel
except ImportError as _e:  # reported by TorchBackend.availability()
    torch = TorchDecoder = None
    _IMPORT_ERROR = str(_e)

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_KINDS = ("cpu", "cuda", "npu", "mps", "xpu")
_DEFAULT_DTYPE = {
    "cpu": "float32",
    "cuda": "bfloat16",
    "npu": "bfloat16",
    "mps": "float16",
    "xpu": "bfloat16",
}


def _device_problem(kind: str) -> str | None:
    """Why torch cannot run on this kind of device here, or None when it can."""
    if kind == "cpu":
        return None
    if kind == "cuda":
        if not torch.cuda.is_available():
            return f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda or 'not built'})"
        return None
    if kind == "npu":
        try:
            importlib.import_module("torch_npu")  # registers the "npu" device with torch
        except ImportError:
            return "torch_npu is not installed (Ascend NPUs need it)"
        return None if torch.npu.is_available() else "torch_npu found no NPU"
    if kind == "mps":
        return None if torch.backends.mps.is_available() else "no MPS device (Apple GPUs only)"
    if kind == "xpu":
        return None if hasattr(torch, "xpu") and torch.xpu.is_available() else "no XPU device"
    return f"unknown device kind {kind!r}; known: {', '.join(DEVICE_KINDS)}"


@dataclass(frozen=True, slots=True)
class TorchStep(StepMeta):
    """A StepMeta whose token_ids / positions / slots / logits_rows are device tensors, with the
    attention layout on the device too; built by TorchOps.step_meta in one host-to-device copy."""

    seq_of_t: Any = None  # (N,) sequence of each token
    local_t: Any = None  # (N,) its row within that sequence
    q_pos_t: Any = None  # (S, T) position of each padded query row (padding: 0)
    tables_t: Any = None  # (S, max_blocks) block tables
    masks: dict = None  # (window, G, L) -> this step's attention mask, made at first use


class TorchOps:
    """The NumpyOps op set on torch tensors of one device and compute dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        # float64 rope angles where the device has float64 (MPS does not)
        self.angle_dtype = torch.float32 if device.type == "mps" else torch.float64
        # tensor parallelism: weights stay in the checkpoint until the shard reads its part
        self.defer_weights = False

    # -- weights and arrays -------------------------------------------------------------------

    def _upload(self, w, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(w, torch.Tensor):
            return w.to(self.device, dtype).contiguous()
        if hasattr(w, "dequantize"):  # QuantTensor / BF16Array: widened on the host, once
            w = w.dequantize()
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not w.flags.writeable:  # a memory-mapped checkpoint: torch wants memory it may own
            w = w.copy()
        return torch.from_numpy(w).to(self.device, dtype)

    def weight(self, w) -> torch.Tensor:
        """A matrix for matmul / embedding, dequantized to the compute dtype on the device (under
        tensor parallelism a torch_tp.Deferred, read by the shard)."""
        if self.defer_weights and not isinstance(w, torch.Tensor):
            from .torch_tp import Deferred

            return Deferred(w, self)
        return self.upload_weight(w)

    def deferred_rows(self, w, order):
        """With deferred weights: weight(w's rows in order) that reads only the rows a rank
        keeps (DeepSeek's per-head row order); None otherwise."""
        if not self.defer_weights or isinstance(w, torch.Tensor):
            return None
        from .torch_tp import Deferred

        return Deferred(w, self, np.asarray(order))

    def upload_weight(self, w) -> torch.Tensor:
        """What weight() returns without deferral."""
        return self._upload(w, self.dtype)

    def vector(self, w) -> torch.Tensor:
        """A small parameter (norm weight, bias, rope frequencies), kept in float32: rope angles
        pos * inv_freq need its precision, and the ops cast activations back where it matters."""
        return self._upload(w, torch.float32)

    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            return (x.float() if x.is_floating_point() else x).cpu().numpy()
        return np.asarray(x)

    def from_numpy(self, x) -> torch.Tensor:
        """Integer arrays as int64 indices, float arrays in the compute dtype, on the device."""
        if isinstance(x, torch.Tensor):
            return x.to(self.device)
        x = np.asarray(x)
        if x.dtype.kind in "iub":
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(self.device)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(
            self.device, self.dtype
        )

    # -- per-step metadata ----------------------------------------------------------------------

    def step_meta(self, batch: Batch) -> TorchStep:
        """The step's index arrays and attention layout on the device, in one copy."""
        host = StepMeta.build(batch)
        S, T = batch.n_seqs, host.max_q_len
        q_pos = np.zeros((S, T), dtype=np.int64)  # padding rows look at position 0 only
        q_pos[host.seq_of, host.local] = batch.positions
        arrays = [
            batch.token_ids,
            batch.positions,
            batch.slots,
            batch.logits_rows,
            host.seq_of,
            host.local,
            q_pos,
            batch.block_tables,
        ]
        flat = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays])
        dev = to_device(flat, self.device)
        views, offset = [], 0
        for a in arrays:
            views.append(dev[offset : offset + a.size].view(a.shape))
            offset += a.size
        return TorchStep.build(
            batch,
            token_ids=views[0],
            positions=views[1],
            slots=views[2],
            logits_rows=views[3],
            seq_of_t=views[4],
            local_t=views[5],
            q_pos_t=views[6],
            tables_t=views[7],
            masks={},
        )

    # -- the ops ------------------------------------------------------------------------------

    def embedding(self, ids, w: torch.Tensor) -> torch.Tensor:
        """(N,), (V, D) -> (N, D)."""
        return F.embedding(self.from_numpy(ids), w)

    def matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(N, K), (M, K) -> (N, M): x @ w.T, the layout of nn.Linear weights."""
        return F.linear(x.to(w.dtype), w)

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """(..., D), (D,) -> (..., D): x / rms(x) * w, the statistics in float32 (as HF does)."""
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
        return (y * w.float()).to(x.dtype)

    def rope(self, x: torch.Tensor, positions, inv_freq: torch.Tensor) -> torch.Tensor:
        """(N, h, Dh), (N,), (R/2,) -> (N, h, Dh): rotate the first R dims in halves (NeoX / HF)."""
        positions = self.from_numpy(positions)
        half = inv_freq.shape[0]
        angles = positions.to(self.angle_dtype)[:, None] * inv_freq.to(self.angle_dtype)  # (N, R/2)
        # rounded like NumPy's: float64 -> float32, then to the activations' dtype
        cos = torch.cos(angles).float()[:, None, :].to(x.dtype)  # (N, 1, R/2)
        sin = torch.sin(angles).float()[:, None, :].to(x.dtype)
        x1, x2 = x[..., :half], x[..., half : 2 * half]  # (N, h, R/2) each
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        if 2 * half == x.shape[-1]:
            return rotated
        return torch.cat([rotated, x[..., 2 * half :]], dim=-1)  # partial rotary: the rest passes

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """(N, F), (N, F) -> (N, F): silu(gate) * up."""
        return F.silu(gate) * up

    def gelu_tanh_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """(N, F), (N, F) -> (N, F): gelu_tanh(gate) * up, the GeGLU feed-forward's middle (Gemma)."""
        return F.gelu(gate, approximate="tanh") * up

    def softcap(self, x: torch.Tensor, cap: float) -> torch.Tensor:
        """(...) -> (...): cap * tanh(x / cap), in float32, a smooth clamp to (-cap, cap)."""
        return (torch.tanh(x.float() / cap) * cap).to(x.dtype)

    def head_matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(N, h, K), (h, M, K) -> (N, h, M): per head x[:, i] @ w[i].T, in w's dtype (MLA)."""
        y = torch.bmm(x.to(w.dtype).transpose(0, 1), w.transpose(1, 2))  # (h, N, M)
        return y.transpose(0, 1).to(x.dtype)  # (N, h, M)

    def moe(self, x: torch.Tensor, expert_ids, expert_weights, experts: list[tuple], act="silu"):
        """(N, D), (N, K) int, (N, K), E x (gate (F, D), up (F, D), down (D, F)) -> (N, D):
        sum over k of weight[n, k] * expert[ids[n, k]](x[n]), each expert a gated MLP.

        The (token, choice) pairs are sorted by expert: one gather of the tokens, then one batched
        gated MLP per expert in use on its contiguous run of rows, then each token's K results
        summed in float32 (no atomics: the same sum batched or alone). Routing decided on the host
        (NumPy ids) is grouped there and sent over once; ids on the device cost one sync (counts)."""
        act_mul = self.silu_mul if act == "silu" else self.gelu_tanh_mul
        N, K = expert_ids.shape
        if isinstance(expert_ids, torch.Tensor):
            flat = expert_ids.reshape(-1).to(self.device, torch.int64)  # (N*K,)
            order = torch.argsort(flat, stable=True)  # (N*K,) pairs grouped by expert
            counts = torch.bincount(flat, minlength=len(experts)).tolist()  # the one sync
        else:
            flat = np.asarray(expert_ids, dtype=np.int64).reshape(-1)  # (N*K,)
            counts = np.bincount(flat, minlength=len(experts)).tolist()
            order = torch.from_numpy(np.argsort(flat, kind="stable")).to(self.device)
        if isinstance(expert_weights, torch.Tensor):
            weights = expert_weights.to(self.device, torch.float32)
        else:
            weights = torch.from_numpy(np.asarray(expert_weights, np.float32)).to(self.device)
        xs = x.index_select(0, torch.div(order, K, rounding_mode="floor"))  # (N*K, D) by expert
        D = x.shape[1]
        ys = torch.empty((N * K, D), dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n and experts[e] is None:  # held by another rank (expert parallel): adds there
                ys[start : start + n] = 0
                start += n
            elif n:
                gate, up, down = experts[e]
                xe = xs[start : start + n]  # (n_e, D) the tokens routed to expert e
                ys[start : start + n] = self.matmul(
                    act_mul(self.matmul(xe, gate), self.matmul(xe, up)), down
                )  # (n_e, D)
                start += n
        # back in (token, choice) order: each token's K rows next to each other
        ys = torch.empty_like(ys).index_copy_(0, order, ys)  # (N*K, D)
        out = (ys.view(N, K, D) * weights.view(N, K, 1)).sum(dim=1)  # (N, D)
        return out.to(x.dtype)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., K) over the last axis, accumulated in float32."""
        return torch.softmax(x.float(), dim=-1).to(x.dtype)

    # -- paged KV cache -----------------------------------------------------------------------

    def write_kv(self, pool: torch.Tensor, x: torch.Tensor, slots) -> None:
        """(NB, BS, *shape), (N, *shape), (N,) -> None: store token n at slot = block * BS + offset."""
        pool.view(-1, *pool.shape[2:]).index_copy_(0, self.from_numpy(slots), x.to(pool.dtype))

    def copy_blocks(self, pool: torch.Tensor, src, dst) -> None:
        """Copy whole blocks src[i] -> dst[i] (copy-on-write of a shared block)."""
        pool[self.from_numpy(dst)] = pool[self.from_numpy(src)]

    def paged_attention(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        step: StepMeta | Batch,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """(N, H, Dh), (NB, BS, KVH, Dh) x2 -> (N, H, Dh): causal attention of each sequence's new
        tokens over its whole context, all sequences in one padded, masked kernel call."""
        if not isinstance(step, TorchStep):  # called outside a forward (e.g. the conformance kit)
            step = self.step_meta(as_step(step).batch)
        seq_of, local, q_pos, tables = step.seq_of_t, step.local_t, step.q_pos_t, step.tables_t
        T, max_len = step.max_q_len, step.max_seq_len
        q = q.to(k_pool.dtype)
        H, Dh = q.shape[1:]
        BS, KVH, Dv = v_pool.shape[1:]
        G = H // KVH  # query heads per kv head (GQA)
        S = tables.shape[0]
        n_blocks = -(-max_len // BS)
        L = n_blocks * BS
        # gather every sequence's context through its block table; padding reads block 0, masked
        k = k_pool[tables[:, :n_blocks]].reshape(S, L, KVH, Dh).transpose(1, 2)  # (S, KVH, L, Dh)
        v = v_pool[tables[:, :n_blocks]].reshape(S, L, KVH, Dv).transpose(1, 2)  # (S, KVH, L, Dv)
        qp = q.new_zeros(S, T, H, Dh)
        qp[seq_of, local] = q  # (S, T, H, Dh) padded per sequence
        # the G query heads of a kv head become G x T query rows against that head's keys
        qp = qp.view(S, T, KVH, G, Dh).permute(0, 2, 1, 3, 4).reshape(S, KVH, T * G, Dh)
        mask = step.masks.get((sliding_window, G, L))
        if mask is None:  # once per forward and window: every layer shares it
            k_pos = torch.arange(L, device=q.device)  # (L,)
            allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # (S, T, L) causal
            if sliding_window is not None:
                allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
            mask = allowed[:, None, :, None, :].expand(S, 1, T, G, L).reshape(S, 1, T * G, L)
            step.masks[(sliding_window, G, L)] = mask
        o = F.scaled_dot_product_attention(
            qp, k, v, attn_mask=mask, scale=scale
        )  # (S, KVH, T*G, Dv)
        o = o.view(S, KVH, T, G, Dv).permute(0, 2, 1, 3, 4).reshape(S, T, H, Dv)
        return o[seq_of, local]  # (N, H, Dv)


class TorchBackend(Backend):
    """torch on one device; float32 / bfloat16 / float16 compute; paged KV pools on the device.

    Args:
        device: "cpu" (default), "cuda", "cuda:N", "npu[:N]" (torch_npu), "mps" or "xpu[:N]".
        dtype: "float32", "bfloat16" or "float16"; default float32 on cpu, float16 on mps,
            bfloat16 elsewhere.
        lower: run declared specs through torch_decoder.py (False: the model file op by op).
        tensor_parallel_size: ranks that share the model (torch_tp.py: heads and feed-forward
            split Megatron-style, experts spread); this process is rank 0, the others are started
            on the same checkpoint at prepare(). On CUDA rank r uses device index + r.
        graphs: run decode steps of the lowering through CUDA graphs (torch_graphs.py), one per
            batch bucket; off by default (LLM(enforce_eager=True) and TINYSERVE_TORCH_GRAPHS=0
            keep it off). Without CUDA the padded static path runs eagerly (a check, no gain).
        graph_max_batch: the largest batch bucket (the engine's max_num_seqs).
        device_sampling: sample on the device (device_sampling.py), so only token ids cross to
            the host. Off by default: it has not run on a GPU yet (as the graph path), and its
            seeded stream differs from sample_row's; on a CPU the host sampler is as fast.
        attention: decode attention's kernel: "auto" (FlashInfer's paged decode or flash-attn's
            flash_attn_with_kvcache where one imports and can run the step, else SDPA),
            "sdpa", "flashinfer" or "flash_attn" (torch_attention.py; a missing one falls
            back to SDPA, the reason in the lowering's kernel_reason).
    """

    name = "torch"
    lowerings: ClassVar[dict] = {Decoder: TorchDecoder} if TorchDecoder is not None else {}

    def __init__(
        self,
        device: str | None = None,
        dtype: str | None = None,
        lower: bool = True,
        tensor_parallel_size: int = 1,
        graphs: bool = False,
        graph_max_batch: int = 256,
        device_sampling: bool = False,
        attention: str = "auto",
    ):
        ok, reason = self.availability()
        if not ok:
            raise ValueError(reason)
        device = device or "cpu"
        kind = device.partition(":")[0]
        problem = _device_problem(kind)
        if problem:
            raise ValueError(f"device {device!r}: {problem}")
        dtype = dtype or _DEFAULT_DTYPE[kind]
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        try:
            dev = torch.device(device)
            torch.empty(1, device=dev)  # a bad index ("cuda:7" on a 1-GPU box) fails here
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"device {device!r} is not usable: {str(e).splitlines()[0]}") from None
        super().__init__(device, dtype, lower=lower)
        self.torch_device = dev
        self.torch_dtype = getattr(torch, dtype)
        self.kv_itemsize = torch.tensor([], dtype=self.torch_dtype).element_size()
        self.ops = TorchOps(dev, self.torch_dtype)
        if int(tensor_parallel_size) < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.tp = (
            TensorParallel(int(tensor_parallel_size), 0, device)
            if tensor_parallel_size > 1
            else None
        )
        self.ops.defer_weights = self.tp is not None  # each read once its shard is known
        if int(graph_max_batch) < 1:
            raise ValueError(f"graph_max_batch must be >= 1, got {graph_max_batch}")
        self.graphs = bool(graphs) and self.tp is None
        self.graph_max_batch = int(graph_max_batch)
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> runner
        self.graph_reasons: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # why none
        # pools allocated with a scratch block past the engine's, by id of their first tensor
        # (weakly: tensors compare elementwise, so no WeakSet): padded rows write there
        self._scratch_pools: dict[int, weakref.ref] = {}
        on = bool(device_sampling)
        self.samples_on_device = on and self.tp is None
        if attention not in KERNELS:
            raise ValueError(f"attention must be one of {', '.join(KERNELS)}, got {attention!r}")
        self.attention = attention

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if torch is None:
            return False, f"torch is not installed ({_IMPORT_ERROR}); pip install torch"
        return True, ""

    @classmethod
    def summary(cls) -> str:
        """What `tinyserve backends` prints: torch's version and the devices it can use here."""
        devices = ["cpu"]
        cuda_problem = _device_problem("cuda")
        if cuda_problem is None:
            devices.append(f"cuda x{torch.cuda.device_count()}")
        devices += [k for k in ("mps", "xpu") if _device_problem(k) is None]
        if importlib.util.find_spec("torch_npu") is not None and _device_problem("npu") is None:
            devices.append("npu")
        text = f"torch {torch.__version__}; devices: {', '.join(devices)}"
        return text if cuda_problem is None else f"{text} ({cuda_problem})"

    def describe(self) -> str:
        text = f"torch {torch.__version__} on {self.torch_device} ({self.dtype})"
        extras = [
            name
            for name, on in (
                ("cuda graphs", self.graphs),
                ("device sampling", self.samples_on_device),
            )
            if on
        ]
        return f"{text}, {', '.join(extras)}" if extras else text

    # -- tensor parallelism: rank 0 hands each call to the other ranks first ----------------------

    def prepare(self, checkpoint, model) -> None:
        """With tensor_parallel_size > 1: shard the model's lowering here (a ConfigError when
        its heads do not split), then start the other ranks on the same checkpoint."""
        if self.tp is None:
            return
        if self.lowered(model) is None:
            reason = self._lowered.reasons.get(model, "lower=False")
            raise BackendError(
                f"tensor parallelism runs the torch lowering; this model has none ({reason})"
            )
        if self.tp.rank == 0:
            self.tp.launch(checkpoint.path, self.device or "cpu", self.dtype)
            weakref.finalize(self, self.tp.close)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks now (else when this backend is collected)."""
        if self.tp is not None:
            self.tp.close()

    def forward_shard(self, model, batch: Batch, kv) -> None:
        """Ranks 1..K-1: this rank's part of a step (its collectives meet rank 0's); no head."""
        with torch.inference_mode():
            self.lowered(model).hidden(self.step_meta(batch), kv)

    def _tell_ranks(self, *message) -> None:
        if self.tp is not None and self.tp.rank == 0:
            self.tp.send(*message)

    def allocate_kv(
        self, layer_specs: list[dict[str, tuple[int, ...]]], num_blocks: int, block_size: int
    ) -> list[dict[str, Any]]:
        """Per layer, one zeroed pool (NB, BS, *shape) per cache entry, in device memory (under
        tensor parallelism: this rank's kv heads)."""
        if self.tp is not None:
            self._tell_ranks("allocate", layer_specs, num_blocks, block_size)
            layer_specs = self.tp.kv_layout(layer_specs)
        dev, dt = self.torch_device, self.torch_dtype
        # with graphs, one block more than the engine hands out: padded rows write there
        n_pool = num_blocks + 1 if self.graphs else num_blocks
        kv = [
            {
                name: torch.zeros((n_pool, block_size, *shape), dtype=dt, device=dev)
                for name, shape in spec.items()
            }
            for spec in layer_specs
        ]
        if self.graphs and kv and kv[0]:
            first = next(iter(kv[0].values()))
            key = id(first)
            self._scratch_pools[key] = weakref.ref(
                first, lambda _: self._scratch_pools.pop(key, None)
            )
        return kv

    def copy_blocks(self, kv: list[dict[str, Any]], src: list[int], dst: list[int]) -> None:
        """Copy KV blocks src[i] -> dst[i] in every pool (copy-on-write)."""
        self._tell_ranks("copy", src, dst)
        src_t, dst_t = self.ops.from_numpy(np.asarray(src)), self.ops.from_numpy(np.asarray(dst))
        with torch.inference_mode():
            for layer in kv:
                for pool in layer.values():
                    pool[dst_t] = pool[src_t]

    def step_meta(self, batch: Batch) -> TorchStep:
        return self.ops.step_meta(batch)

    def forward(self, model, batch: Batch, kv: list[dict[str, Any]]) -> np.ndarray:
        """Run the model over one batch; float32 logits (R, V) of batch.logits_rows, on the host."""
        _, logits, _ = self.forward_greedy(
            model, batch, kv, np.zeros(len(batch.logits_rows), dtype=bool)
        )
        return logits

    def forward_greedy(
        self, model, batch: Batch, kv, greedy: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Argmax on the device for the greedy rows; only the other rows' logits cross to the host
        (with every row's finite flag, as Backend.forward_greedy says)."""
        self._tell_ranks("forward", batch)
        with torch.inference_mode():
            logits = self._logits(model, batch, kv)  # (R, V) on the device
            ids = logits.argmax(dim=-1)  # (R,): cheap, and no data-dependent shapes (no sync)
            # (2, R): the ids and finite flags (a row's sum is NaN / Inf exactly when a value
            # is) cross to the host in one copy
            # (summed in float32: an f16 sum of finite logits could overflow)
            finite = torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))
            ids_finite = torch.stack([ids, finite.to(ids.dtype)])
            if greedy.all():
                host_rows = np.zeros((0, logits.shape[1]), dtype=np.float32)
            else:
                rest = np.nonzero(~greedy)[0]
                rows = logits.index_select(
                    0, torch.from_numpy(rest).to(logits.device)
                ).float()  # (R-G, V)
                host_rows = self._to_host(rows)
            ids, finite = ids_finite.cpu().numpy()  # the step's one wait on the device
            return ids[greedy], host_rows, finite.astype(bool)

    def forward_sample(
        self, model, batch: Batch, kv, greedy: np.ndarray, table
    ) -> tuple[np.ndarray, list, np.ndarray, np.ndarray]:
        """Backend.forward_sample with the table's rows sampled on the device
        (torch_sampling.py): ids, finite flags and asked-for logprobs cross; the other
        rows' logits too."""
        self._tell_ranks("forward", batch)
        with torch.inference_mode():
            logits = self._logits(model, batch, kv)  # (R, V) on the device
            rows = torch.from_numpy(table.rows).to(logits.device)
            ids, chosen, top_ids, top_lp = sample_on_device(logits.index_select(0, rows), table)
            finite = torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))
            in_table = np.zeros(len(greedy), dtype=bool)
            in_table[table.rows] = True
            rest = np.nonzero(~(greedy | in_table))[0]
            host_rows = self._to_host(
                logits.index_select(0, torch.from_numpy(rest).to(logits.device)).float()
            )  # (R-G-D, V)
            R, D, n = len(greedy), table.n_rows, top_ids.shape[1]
            # (R,) argmax, (D,) draws, (R,) finite flags, (D, n) top ids: one copy, one wait
            ints = [logits.argmax(dim=-1), ids, finite.long(), top_ids.reshape(-1)]
            small = torch.cat(ints).cpu().numpy()
            floats = torch.cat([chosen.float()[:, None], top_lp.float()], dim=1).cpu().numpy()
            top = small[2 * R + D :].reshape(D, n)
            samples = table.samples(small[R : R + D], floats[:, 0], top, floats[:, 1:])
            return small[:R][greedy], samples, host_rows, small[R + D : 2 * R + D].astype(bool)

    def _logits(self, model, batch: Batch, kv) -> torch.Tensor:
        """(R, V) logits on the device: a decode step through its CUDA graph where one can run
        it, else the lowering (or the model file op by op) eagerly."""
        lowered = self.lowered(model)
        graphs = self._graph_runner(model, lowered) if self.graphs else None
        first = next(iter(kv[0].values())) if kv and kv[0] else None
        known = self._scratch_pools.get(id(first))
        if graphs is not None and known is not None and known() is first:
            host = StepMeta.build(batch)
            if graphs.blocker(host) is None:  # the last block is the scratch one
                return graphs(host, kv, first.shape[0] - 1)
        step = self.step_meta(batch)
        return model.forward(step, kv) if lowered is None else lowered(step, kv)

    def _graph_runner(self, model, lowered) -> DecodeGraphs | None:
        """model's DecodeGraphs, made at first use; None (the reason in graph_reasons) when its
        steps cannot be captured."""
        try:
            return self._graphs[model]
        except KeyError:
            pass
        runner = None
        if lowered is None:
            self.graph_reasons[model] = "no lowering: the model file runs op by op"
        else:
            try:
                runner = DecodeGraphs(
                    lowered, self.graph_max_batch, capture=self.torch_device.type == "cuda"
                )
            except NotLowerable as e:
                self.graph_reasons[model] = str(e)
        self._graphs[model] = runner
        return runner

    def _to_host(self, x: torch.Tensor) -> np.ndarray:
        if self.torch_device.type != "cuda" or x.numel() == 0:
            return x.cpu().numpy()
        # through page-locked memory: several times faster than a pageable copy (R x V is
        # 128 MB at R=256, V=128256); the block returns to torch's cache once freed
        host = torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(x)
        return host.numpy()
