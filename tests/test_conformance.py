"""The conformance kit on the built-in backends, and the kit catching backends that are wrong.

Each broken backend below differs from the reference by one plausible bug; the kit must fail it
(a check that cannot fail is a defect).
"""

from __future__ import annotations

import numpy as np
import pytest

from tinyserve import testing
from tinyserve.backends import backend_names, get_backend_class
from tinyserve.backends.numpy_backend import NumpyBackend
from tinyserve.backends.numpy_ops import NumpyOps
from tinyserve.errors import BackendError


def _available(name: str) -> tuple[bool, str]:
    if name not in backend_names():
        return False, f"backend {name!r} is not registered"
    try:
        return get_backend_class(name).availability()
    except BackendError as e:  # a plugin that fails to import reports itself this way
        return False, str(e)


def _for(name: str, device=None, dtype=None):
    ok, reason = _available(name)
    return pytest.mark.skipif(not ok, reason=reason or "")(
        testing.conformance_tests(name, device, dtype)
    )


TestNumpyConformance = _for("numpy")
TestCpuConformance = _for("cpu")
TestTorchCpuFloat32Conformance = _for("torch", "cpu", "float32")
TestTorchCpuBfloat16Conformance = _for("torch", "cpu", "bfloat16")


# -- the kit fails what is wrong ------------------------------------------------------------------


class _Broken(NumpyBackend):
    """The reference with one op replaced by a buggy one."""

    def __init__(self, ops: NumpyOps, dtype: str | None = None):
        super().__init__()
        self.ops = ops
        self.dtype = dtype


class _RopeWrongSign(NumpyOps):
    def rope(self, x, positions, inv_freq):
        return super().rope(x, -positions, inv_freq)  # rotates the wrong way


class _NoSlidingWindow(NumpyOps):
    def paged_attention(self, q, k_pool, v_pool, batch, scale, sliding_window=None):
        return super().paged_attention(q, k_pool, v_pool, batch, scale, None)


class _IgnoresBlockTable(NumpyOps):
    def write_kv(self, pool, x, slots):  # as if every sequence's blocks were 0, 1, 2, ...
        bs = pool.shape[1]
        super().write_kv(pool, x, np.arange(len(slots)) % (pool.shape[0] * bs))


class _LeaksAcrossSequences(NumpyOps):
    def paged_attention(self, q, k_pool, v_pool, batch, scale, sliding_window=None):
        out = super().paged_attention(q, k_pool, v_pool, batch, scale, sliding_window)
        return out + 1e-2 * out.mean(axis=0, keepdims=True) * (batch.n_seqs > 1)  # batch-dependent


class _HalfPrecisionMatmul(NumpyOps):
    def matmul(self, x, w):  # float16 arithmetic while claiming float32
        return (x.astype(np.float16) @ w.astype(np.float16).T).astype(np.float32)


def test_kit_fails_a_wrong_rope():
    backend = _Broken(_RopeWrongSign())
    with pytest.raises(AssertionError, match="rope"):
        testing.check_ops(backend)
    with pytest.raises(AssertionError, match="logits"):
        testing.check_logits(backend, "llama")


def test_kit_fails_a_missing_sliding_window():
    backend = _Broken(_NoSlidingWindow())
    with pytest.raises(AssertionError, match="window 3"):
        testing.check_ops(backend)
    with pytest.raises(AssertionError, match="mistral logits"):
        testing.check_logits(backend, "mistral")
    testing.check_logits(backend, "llama")  # no window there: the bug is invisible, rightly


def test_kit_fails_a_backend_that_ignores_block_tables():
    backend = _Broken(_IgnoresBlockTable())
    with pytest.raises(AssertionError, match="write_kv"):
        testing.check_ops(backend)
    with pytest.raises(AssertionError, match="fragmented pool"):
        testing.check_paged_equals_contiguous(backend)


def test_kit_fails_a_batch_dependent_result():
    with pytest.raises(AssertionError, match="batched vs alone"):
        testing.check_batched_equals_alone(_Broken(_LeaksAcrossSequences()))


def test_kit_fails_low_precision_that_claims_float32():
    backend = _Broken(_HalfPrecisionMatmul())
    with pytest.raises(AssertionError, match="matmul"):
        testing.check_ops(backend)
    with pytest.raises(AssertionError, match="logits"):
        testing.check_logits(backend, "qwen2")
    testing.check_logits(_Broken(_HalfPrecisionMatmul(), dtype="float16"), "qwen2")  # honest


def test_greedy_check_fails_a_wrong_choice(monkeypatch):
    backend = NumpyBackend()
    real_forward = backend.forward
    monkeypatch.setattr(backend, "forward", lambda *a: -real_forward(*a))  # picks the argmin
    with pytest.raises(AssertionError, match="greedy step 0"):
        testing.check_greedy(backend, "llama")


def test_tiny_checkpoints_cover_every_variant():
    ckpts = {name: testing.tiny_checkpoint(name) for name in testing.ARCHITECTURES}
    cfgs = {name: c.config for name, c in ckpts.items()}
    assert cfgs["llama_mqa"].n_kv_heads == 1 and cfgs["smollm2"].tie_word_embeddings
    assert cfgs["mistral"].sliding_window == 8 and cfgs["qwen3"].qk_norm
    assert cfgs["qwen3"].head_dim * cfgs["qwen3"].n_heads != cfgs["qwen3"].hidden_size
    assert "model.layers.0.self_attn.q_proj.bias" in ckpts["qwen2"].tensors
    assert type(ckpts["llama_q8_0"].tensors["lm_head.weight"]).__name__ == "QuantTensor"
    assert type(ckpts["llama_bf16"].tensors["lm_head.weight"]).__name__ == "BF16Array"
    with pytest.raises(ValueError, match="known: llama"):
        testing.tiny_checkpoint("gpt2")


def test_conformance_tests_names_the_class():
    cls = testing.conformance_tests("torch", "cuda:0", "bfloat16")
    assert cls.__name__ == "TestTorchCuda0Bfloat16Conformance"
    assert (cls.backend, cls.device, cls.dtype) == ("torch", "cuda:0", "bfloat16")


class _MoeIgnoresWeights(NumpyOps):
    def moe(self, x, expert_ids, expert_weights, experts, act="silu"):
        return super().moe(x, expert_ids, np.ones_like(expert_weights), experts, act)


def test_kit_fails_a_moe_that_ignores_router_weights():
    backend = _Broken(_MoeIgnoresWeights())
    with pytest.raises(AssertionError, match="moe"):
        testing.check_ops(backend)
    with pytest.raises(AssertionError, match="mixtral logits"):
        testing.check_logits(backend, "mixtral")
    testing.check_logits(backend, "gemma3")  # no experts there


@pytest.mark.parametrize("arch", testing.MOE_ARCHITECTURES)
def test_pinned_routing_replays_the_reference_exactly(arch):
    """Replaying a run's own expert choices (the low-precision MoE path) changes no logit, and the
    recorded choices are real ones: several experts, not a constant."""
    from tinyserve.backends.numpy_backend import NumpyBackend

    ckpt = testing.tiny_checkpoint(arch)
    ids = testing._prompts(1, lengths=(29,))[0]
    choices: list = []
    with testing._pinned_routing(choices, replay=False):
        free = testing._engine(ckpt, NumpyBackend()).logits(ids)
    with testing._pinned_routing(choices, replay=True):
        pinned = testing._engine(ckpt, NumpyBackend()).logits(ids)
    np.testing.assert_allclose(pinned, free, rtol=1e-5, atol=1e-5)
    assert choices and len(np.unique(np.concatenate([c.ravel() for c in choices]))) >= 3


def test_tiny_checkpoints_of_the_newer_families():
    cfgs = {n: testing.tiny_checkpoint(n).config for n in ("gemma3", "phi3", "deepseek_v3")}
    assert cfgs["gemma3"].final_logit_softcapping and cfgs["gemma3"].is_sliding(0)
    assert cfgs["phi3"].rotary_dim < cfgs["phi3"].head_dim and cfgs["phi3"].rope_scaling
    assert cfgs["deepseek_v3"].q_lora_rank and cfgs["deepseek_v3"].first_k_dense_replace == 1
    assert testing.tiny_checkpoint("deepseek_v3_qlora").config.q_lora_rank is None
