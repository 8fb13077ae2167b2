"""The conformance kit on the built-in backends, and the kit catching backends that are wrong.

Each broken backend below differs from the reference by one plausible bug; the kit must fail it
(a check that cannot fail is a defect).
"""

from __future__ import annotations

import numpy as np
import pytest

from tinyserve import testing
from tinyserve.backends import backend_names, get_backend_class, register_backend
from tinyserve.backends.numpy_backend import NumpyBackend
from tinyserve.backends.numpy_ops import NumpyOps
from tinyserve.errors import BackendError
from tinyserve.testing.checkpoints import (
    MOE_ARCHITECTURES,
    QUANT_FAMILIES,
    QUANTIZED_ARCHITECTURES,
)
from tinyserve.testing.checks import _engine, _prompts
from tinyserve.testing.quantize import quantize_q4_k
from tinyserve.testing.routing import _pinned_routing


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
    assert ckpts["llama_q8_0"].tensors["lm_head.weight"].qtype.name == "Q8_0"
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


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "deepseek_v3_qlora"])
def test_pinned_routing_replays_the_reference_exactly(arch):
    """Replaying a run's own expert choices (the low-precision MoE path) changes no logit, and the
    recorded choices are real ones: several experts, not a constant."""
    from tinyserve.backends.numpy_backend import NumpyBackend

    ckpt = testing.tiny_checkpoint(arch)
    ids = _prompts(1, lengths=(29,))[0]
    choices: list = []
    with _pinned_routing(choices, replay=False):
        free = _engine(ckpt, NumpyBackend()).logits(ids)
    with _pinned_routing(choices, replay=True):
        pinned = _engine(ckpt, NumpyBackend()).logits(ids)
    np.testing.assert_allclose(pinned, free, rtol=1e-5, atol=1e-5)
    assert choices and len(np.unique(np.concatenate([c.ravel() for c in choices]))) >= 3


def test_tiny_checkpoints_of_the_newer_families():
    cfgs = {n: testing.tiny_checkpoint(n).config for n in ("gemma3", "phi3", "deepseek_v3")}
    assert cfgs["gemma3"].final_logit_softcapping and cfgs["gemma3"].is_sliding(0)
    assert cfgs["phi3"].rotary_dim < cfgs["phi3"].head_dim and cfgs["phi3"].rope_scaling
    assert cfgs["deepseek_v3"].q_lora_rank and cfgs["deepseek_v3"].first_k_dense_replace == 1
    assert testing.tiny_checkpoint("deepseek_v3_qlora").config.q_lora_rank is None


# -- quantized variants of every family ------------------------------------------------------------


def test_q4_k_blocks_decode_as_gguf_and_tinyserve_read_them():
    """The kit's Q4_K quantizer (gguf-py has none) writes blocks both dequantizers read alike,
    close to the input, with every 6-bit scale and min in use (the packing's upper bits too)."""
    import gguf

    from tinyserve.loading.ggml_quants import dequantize_blocks

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 512)).astype(np.float32) * np.linspace(
        0.1, 3, 512, dtype=np.float32
    )
    blocks = quantize_q4_k(w)
    assert blocks.shape == (6, 2 * 144) and blocks.dtype == np.uint8
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
    ours = dequantize_blocks(blocks.reshape(-1, 144), gguf.GGMLQuantizationType.Q4_K)
    np.testing.assert_array_equal(ours.reshape(w.shape), theirs)
    # per super-block, within one step of its widest sub-block's 15 levels
    x = w.reshape(-1, 8, 32)
    step = (x.max(axis=2) - np.minimum(x.min(axis=2), 0)).max(axis=1) / 15  # (n,)
    assert np.all(np.abs(theirs - w).reshape(-1, 256).max(axis=1) <= step)
    assert np.abs(theirs - w).mean() < 0.1 * np.abs(w).mean()


@pytest.mark.parametrize("family", QUANT_FAMILIES)
def test_every_family_has_q8_0_and_q4_k_variants(family):
    """Matrices in the variant's type (Q4_K where rows are whole super-blocks, else Q8_0);
    norms, biases and routers float32; the same shapes in both variants."""
    q8, q4 = (testing.tiny_checkpoint(f"{family}_{q}") for q in ("q8_0", "q4_k"))
    for ckpt, qtype in ((q8, "Q8_0"), (q4, "Q4_K")):
        kinds = {}
        for name, t in ckpt.tensors.items():
            kind = t.qtype.name if hasattr(t, "qtype") else str(t.dtype)
            kinds[kind] = kinds.get(kind, 0) + 1
            if len(t.shape) == 1 or name.endswith(("gate.weight", "gate.e_score_correction_bias")):
                assert kind == "float32", f"{name} is {kind}"
            elif qtype == "Q4_K" and t.shape[1] % 256:
                assert kind == "Q8_0", f"{name}: a row of {t.shape[1]} falls back to Q8_0"
            else:
                assert kind == qtype, f"{name} is {kind}"
        assert kinds[qtype] >= 9, kinds
    assert {n: t.shape for n, t in q8.tensors.items()} == {
        n: t.shape for n, t in q4.tensors.items()
    }
    assert f"{family}_q8_0" in QUANTIZED_ARCHITECTURES
    if family in ("mixtral", "deepseek_v3"):
        assert f"{family}_q4_k" in MOE_ARCHITECTURES


def test_phi3_variants_stay_below_longrope_switch_when_chunked():
    """chunked == whole on LongRoPE holds only on one side of the switch (see the check): the
    fact the check leans on, so that it cannot pass by comparing nothing."""
    cfg = testing.tiny_checkpoint("phi3_q4_k").config
    assert cfg.rope_scaling["rope_type"] == "longrope"
    assert len(cfg.rope_scaling["short_factor"]) == cfg.rotary_dim // 2 == 24


# -- the fused lowering equals op by op -------------------------------------------------------------


class _Lowering(NumpyBackend):
    """A backend with a `lower` switch: lowered, it runs `fast_ops` and names its lowering."""

    fast_ops: type = NumpyOps
    claims_off: str | None = None  # what lowering(model) says with lower=False

    def __init__(self, device=None, dtype=None, lower: bool = True):
        super().__init__()
        self.lower = lower
        self.ops = self.fast_ops() if lower else NumpyOps()

    def lowering(self, model):
        return "fake_stack" if self.lower else self.claims_off


class _WrongLowering(_Lowering):
    fast_ops = _RopeWrongSign


class _LoweringNeverOff(_Lowering):
    claims_off = "fake_stack"


_LOWERING_BACKENDS = {}


def _registered(cls) -> str:
    name = f"test-{cls.__name__.strip('_').lower()}"
    if name not in _LOWERING_BACKENDS:
        register_backend(name, cls)
        _LOWERING_BACKENDS[name] = cls
    return name


def test_lowering_check_passes_a_faithful_lowering():
    assert testing.check_lowering_equals_op_by_op(_registered(_Lowering), "llama_q8_0") == (
        "fake_stack"
    )


def test_lowering_check_fails_a_wrong_lowering():
    with pytest.raises(AssertionError, match="lowering 'fake_stack' vs op by op"):
        testing.check_lowering_equals_op_by_op(_registered(_WrongLowering), "qwen2_q4_k")


def test_lowering_check_fails_a_backend_that_lowers_when_told_not_to():
    with pytest.raises(AssertionError, match="lower=False still lowers"):
        testing.check_lowering_equals_op_by_op(_registered(_LoweringNeverOff), "llama_q8_0")


def test_lowering_check_skips_a_backend_without_the_switch():
    with pytest.raises(pytest.skip.Exception, match="no `lower` argument"):
        testing.check_lowering_equals_op_by_op("numpy", "llama_q8_0")


def test_public_kit_names():
    """tinyserve.testing exports the kit and nothing else (its helpers live in its modules)."""
    import inspect

    public = {
        n for n, v in vars(testing).items() if not n.startswith("_") and not inspect.ismodule(v)
    }
    assert public == set(testing.__all__)
    assert {"conformance_tests", "run_conformance", "check_lowering_equals_op_by_op"} <= public
