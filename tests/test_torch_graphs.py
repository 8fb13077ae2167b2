"""Decode graphs (backends/torch_graphs.py) and sampling on the device (device_sampling.py,
backends/torch_sampling.py), on the CPU.

No graph is captured here (that needs CUDA; scripts/gpu_check.py holds the captured path to the
eager one on a device). What runs here is everything around the capture: bucket choice, padding
to a scratch block, the static buffers, the decision which steps may be captured. The padded
static path, run eagerly, is held to the unpadded step; the device sampler to the NumPy
reference, to sampling.py's distribution (chi-square) and, greedy, to sample_row exactly."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_chi_square_fits

from tinyserve import LLM, SamplingParams
from tinyserve.batch import Batch
from tinyserve.device_sampling import DeviceSampling, sample_reference, uniform
from tinyserve.sampling import apply_penalties, filtered_probs, sample_row
from tinyserve.settings import settings
from tinyserve.step import StepMeta
from tinyserve.testing import tiny_checkpoint

torch = pytest.importorskip("torch")

from tinyserve.backends.lowering import NotLowerable
from tinyserve.backends.torch_backend import TorchBackend
from tinyserve.backends.torch_graphs import (
    DecodeGraphs,
    batch_buckets,
    bucket_for,
    context_bucket,
    graph_blocker,
    pad_decode_batch,
)
from tinyserve.backends.torch_sampling import sample_on_device
from tinyserve.models import build_model

HF_DIR = Path(__file__).parent / "fixtures" / "hf"
TINY = HF_DIR / "smollm2"

PROMPTS = [[5, 6, 7, 8, 9] * 6, [11, 12, 13, 14] * 5 + [11], [3, 90, 41, 7, 200, 18, 66]]


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


# -- buckets, padding, which steps are captured ----------------------------------------------------


def test_batch_buckets_are_capped_by_max_num_seqs():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert batch_buckets(1) == (1,)
    assert batch_buckets(1000)[-1] == 256
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        batch_buckets(0)
    buckets = batch_buckets(100)
    assert [bucket_for(n, buckets) for n in (1, 3, 8, 9, 65, 100, 101)] == [
        1,
        4,
        8,
        16,
        100,
        100,
        None,
    ]


def test_context_bucket_is_a_power_of_two_within_the_pool():
    assert [context_bucket(n, 64) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]
    assert context_bucket(9, 12) == 12  # never past the blocks a sequence could hold


def _decode_batch(BS=4):
    tables = [[0, 1, 2], [3], [4, 5]]
    lens = [10, 2, 5]  # context after this step
    return Batch.build([([7 + s], n - 1, t) for s, (t, n) in enumerate(zip(tables, lens))], BS)


def test_graph_blocker_names_the_steps_that_run_eagerly():
    buckets = batch_buckets(4)
    assert graph_blocker(StepMeta.build(_decode_batch()), buckets) is None
    prefill = Batch.build([([1, 2, 3], 0, [0]), ([4], 2, [1])], 4)
    assert graph_blocker(StepMeta.build(prefill), buckets) == "a prefill or mixed step"
    some_rows = Batch.build([([1], 3, [0]), ([4], 2, [1])], 4, logits_rows=[1])
    assert graph_blocker(StepMeta.build(some_rows), buckets) == "only some rows' logits are wanted"
    wide = Batch.build([([1], 0, [s]) for s in range(5)], 4)
    assert "past the largest bucket (4)" in graph_blocker(StepMeta.build(wide), buckets)


def test_padded_rows_write_and_read_only_the_scratch_block():
    b = _decode_batch()
    p = pad_decode_batch(b, n_seqs=8, n_blocks=4, scratch_block=9, block_size=4)
    assert (p.n_seqs, p.n_tokens, p.block_tables.shape) == (8, 8, (8, 4))
    np.testing.assert_array_equal(p.token_ids[:3], b.token_ids)
    np.testing.assert_array_equal(p.slots[:3], b.slots)
    np.testing.assert_array_equal(p.block_tables[:3, :3], b.block_tables)
    assert (p.block_tables[:3, 3] == 0).all()  # the real rows' extra columns: masked reads
    assert (p.slots[3:] == 9 * 4).all() and (p.positions[3:] == 0).all()
    assert (p.block_tables[3:, 0] == 9).all() and (p.seq_lens[3:] == 1).all()
    np.testing.assert_array_equal(p.logits_rows, np.arange(8))
    with pytest.raises(AssertionError, match="only decode steps"):
        pad_decode_batch(Batch.build([([1, 2], 0, [0])], 4), 2, 1, 9, 4)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3", "mistral"])
def test_padded_static_path_equals_the_unpadded_step(arch):
    """Two backends over the same weights: a prefill, then decode steps of 3 sequences (bucket 4,
    contexts padded to 4 then 8 blocks) through DecodeGraphs' static buffers, eagerly; the real
    rows' logits equal the plain step's, and outside the scratch block the pools stay equal:
    the padded rows wrote nowhere else."""
    ckpt = tiny_checkpoint(arch)
    BS, NB = 4, 24
    tables = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13, 14]]
    prompts = [list(range(3, 14)), [5, 9, 2], list(range(40, 47))]
    plain, padded = TorchBackend(), TorchBackend(graphs=True)
    models, pools = {}, {}
    for name, b in (("plain", plain), ("padded", padded)):
        models[name] = build_model(ckpt.config, ckpt.tensors, b.ops)
        pools[name] = b.allocate_kv(models[name].kv_layout(), NB, BS)
    assert next(iter(pools["padded"][0].values())).shape[0] == NB + 1  # the scratch block
    graphs = DecodeGraphs(padded.lowered(models["padded"]), max_batch=8, capture=False)
    lens = [len(p) for p in prompts]
    prefill = Batch.build([(p, 0, t) for p, t in zip(prompts, tables)], BS)
    for name, b in (("plain", plain), ("padded", padded)):
        b.forward(models[name], prefill, pools[name])
    for step in range(6):
        batch = Batch.build(
            [([20 + s + step], n, t) for s, (n, t) in enumerate(zip(lens, tables))], BS
        )
        before = [{k: v.clone() for k, v in layer.items()} for layer in pools["padded"]]
        want = plain.forward(models["plain"], batch, pools["plain"])
        with torch.inference_mode():
            got = graphs(StepMeta.build(batch), pools["padded"], NB).float().numpy()
        assert got.shape == want.shape == (3, ckpt.config.vocab_size)
        np.testing.assert_allclose(got, want, atol=2e-5 * float(want.std()), err_msg=f"{step}")
        written = set(batch.slots.tolist())
        for layer_before, layer_plain, layer_padded in zip(before, pools["plain"], pools["padded"]):
            for key, pool in layer_padded.items():
                flat_new = pool[:NB].reshape(NB * BS, -1)
                flat_old = layer_before[key][:NB].reshape(NB * BS, -1)
                untouched = [s for s in range(NB * BS) if s not in written]
                assert torch.equal(flat_new[untouched], flat_old[untouched]), "a live slot moved"
                np.testing.assert_allclose(
                    pool[:NB].numpy(), layer_plain[key].numpy(), atol=1e-5, rtol=1e-5
                )
        lens = [n + 1 for n in lens]
    assert graphs.n_replays == 6 and graphs.n_graphs == 0  # run eagerly: nothing captured


def test_mixture_of_experts_is_not_captured():
    b = TorchBackend(graphs=True)
    ckpt = tiny_checkpoint("mixtral")
    model = build_model(ckpt.config, ckpt.tensors, b.ops)
    with pytest.raises(NotLowerable, match="mixture-of-experts routing"):
        DecodeGraphs(b.lowered(model), max_batch=4, capture=False)
    kv = b.allocate_kv(model.kv_layout(), 8, 4)
    logits = b.forward(model, Batch.build([([1, 2, 3], 0, [0])], 4), kv)  # eager, no error
    assert logits.shape == (1, ckpt.config.vocab_size)
    assert "mixture-of-experts" in b.graph_reasons[model]


@pytest.mark.parametrize("path", [TINY, HF_DIR / "gemma3", HF_DIR / "phi3", HF_DIR / "qwen3"])
def test_generation_through_the_graph_path_equals_eager(path, monkeypatch):
    """Greedy, batched: every decode step through the padded static path (3 sequences in bucket
    4, contexts crossing block and bucket boundaries), the tokens of the eager backend."""
    calls = []
    real = DecodeGraphs.__call__

    def spy(self, step, kv, scratch):
        calls.append(step.n_seqs)
        return real(self, step, kv, scratch)

    monkeypatch.setattr(DecodeGraphs, "__call__", spy)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    eager = LLM(str(path), backend="torch", block_size=4).generate(PROMPTS, params)
    assert not calls
    llm = LLM(str(path), backend="torch", block_size=4, backend_options={"graphs": True})
    assert llm.backend.graphs and "cuda graphs" in llm.backend.describe()
    assert _tokens(llm.generate(PROMPTS, params)) == _tokens(eager)
    assert len(calls) >= 20 and max(calls) == 3


def test_graphs_are_off_unless_asked_and_enforce_eager_wins(monkeypatch):
    assert not LLM(str(TINY), backend="torch").backend.graphs
    on = {"graphs": True}
    assert LLM(str(TINY), backend="torch", backend_options=on, max_num_seqs=8).backend.graphs
    llm = LLM(str(TINY), backend="torch", backend_options=on, enforce_eager=True)
    assert not llm.backend.graphs
    assert LLM(str(TINY), backend="torch", max_num_seqs=8).backend.graph_max_batch == 8
    for value, want in (("1", True), ("0", False)):
        monkeypatch.setenv("TINYSERVE_TORCH_GRAPHS", value)
        settings.cache_clear()
        try:
            assert LLM(str(TINY), backend="torch").backend.graphs is want
            assert not LLM(str(TINY), backend="torch", enforce_eager=True).backend.graphs
        finally:
            monkeypatch.delenv("TINYSERVE_TORCH_GRAPHS")
            settings.cache_clear()


def test_cli_enforce_eager_flag():
    import argparse

    from tinyserve.cli import add_model_args, model_options

    p = argparse.ArgumentParser()
    add_model_args(p)
    assert model_options(p.parse_args([]))["enforce_eager"] is False
    assert model_options(p.parse_args(["--enforce-eager"]))["enforce_eager"] is True


# -- sampling on the device ------------------------------------------------------------------------

V = 50
PARAMS = [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3),
    SamplingParams(temperature=1.1, presence_penalty=0.5, frequency_penalty=0.7, logprobs=3),
    SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=0),
]


def _table(logits_rows, params, prompt=(1, 2, 3, 4), output=(4, 4, 7), seed=11):
    entries = [
        (r, p, seed, 0, list(prompt), list(output), len(output) + r)
        for r, p in zip(logits_rows, params)
    ]
    return DeviceSampling.build(entries, V)


def test_device_sampler_equals_the_reference():
    rng = np.random.default_rng(0)
    D = len(PARAMS) * 12
    logits = (rng.standard_normal((D, V)) * 3).astype(np.float32)
    t = _table(range(D), PARAMS * 12)
    want = sample_reference(logits, t)
    got = [x.numpy() for x in sample_on_device(torch.from_numpy(logits), t)]
    np.testing.assert_array_equal(got[0], want[0])
    asked = t.logprobs
    np.testing.assert_allclose(got[1][asked], want[1][asked], rtol=1e-5, atol=1e-5)
    for d, n in enumerate(t.top_n.tolist()):  # each row's own top-n (no ties: random logits)
        np.testing.assert_array_equal(got[2][d, :n], want[2][d, :n])
        np.testing.assert_allclose(got[3][d, :n], want[3][d, :n], rtol=1e-5, atol=1e-5)
    assert t.top_n.max() == 3 and (t.top_n == 0).sum() > 0
    samples = t.samples(*got)
    assert samples[5].top_logprobs is not None and len(samples[5].top_logprobs) == 3
    assert samples[6].top_logprobs == {} and not math.isnan(samples[6].logprob)
    assert samples[0].top_logprobs is None and math.isnan(samples[0].logprob)


def test_greedy_on_the_device_is_sample_rows_argmax():
    """temperature 0 with penalties: exactly sample_row's token, ties included (first index)."""
    rng = np.random.default_rng(1)
    logits = rng.integers(-3, 4, size=(40, V)).astype(np.float32)  # many exact ties
    p = SamplingParams(temperature=0, repetition_penalty=1.4, frequency_penalty=0.3)
    prompt, output = [1, 2, 3], [3, 9, 9]
    t = _table(range(40), [p] * 40, prompt, output)
    ids = sample_on_device(torch.from_numpy(logits), t)[0].numpy()
    want = [sample_row(row, p, None, prompt, output).token_id for row in logits]
    assert ids.tolist() == want


@pytest.mark.parametrize("p", PARAMS[:6], ids=lambda p: f"T{p.temperature}")
def test_device_sampler_keeps_sampling_pys_distribution(p):
    """Chi-square of many draws from one row (a uniform per output position) against
    sampling.py's filtered probabilities after its penalties."""
    rng = np.random.default_rng(2)
    row = (rng.standard_normal(V) * 2).astype(np.float32)
    n = 4000
    prompt, output = [1, 2, 3, 4], [4, 4, 7]
    entries = [(r, p, 5, 0, prompt, output, r) for r in range(n)]
    t = DeviceSampling.build(entries, V)
    ids = sample_on_device(torch.from_numpy(np.tile(row, (n, 1))), t)[0].numpy()
    probs = filtered_probs(apply_penalties(row.astype(np.float64), p, prompt, output), p)
    assert set(np.unique(ids)) <= set(np.flatnonzero(probs > 0)), "drew a filtered-out token"
    assert_chi_square_fits(np.bincount(ids, minlength=V), probs)


def test_uniform_depends_on_seed_index_and_position_only():
    u = [uniform(7, 0, k) for k in range(2000)]
    assert all(0 <= x < 1 for x in u) and len(set(u)) == 2000
    assert abs(np.mean(u) - 0.5) < 0.02
    assert uniform(7, 0, 3) == uniform(7, 0, 3) != uniform(7, 1, 3) != uniform(8, 0, 3)
    assert uniform(2**70 + 5, 0, 0) == uniform(2**70 + 5, 0, 0)  # big seeds fold, no error


def test_backend_reference_and_torch_forward_sample_agree():
    """Backend.forward_sample's host reference (the numpy backend) and the torch backend's, on
    one mixed step: greedy rows, device rows and a host row each where the seam says."""
    from tinyserve.backends import create_backend

    ckpt = tiny_checkpoint("llama")
    batch = Batch.build([([1, 2, 3], 0, [0]), ([4, 5], 0, [1]), ([6], 0, [2]), ([7], 0, [3])], 4)
    greedy = np.array([True, False, False, False])
    params = [SamplingParams(temperature=0.9, top_k=7), SamplingParams(temperature=0.5, logprobs=2)]
    entries = [(r, p, 3, 0, [], [], 0) for r, p in zip((1, 3), params)]
    t = DeviceSampling.build(entries, ckpt.config.vocab_size)
    got = {}
    for name in ("numpy", "torch"):
        b = create_backend(name)
        model = build_model(ckpt.config, ckpt.tensors, b.ops)
        kv = b.allocate_kv(model.kv_layout(), 4, 4)
        got[name] = b.forward_sample(model, batch, kv, greedy, t)
    (ids_a, s_a, rest_a, fin_a), (ids_b, s_b, rest_b, fin_b) = got["numpy"], got["torch"]
    assert ids_a.tolist() == ids_b.tolist() and fin_a.tolist() == fin_b.tolist() == [True] * 4
    assert [s.token_id for s in s_a] == [s.token_id for s in s_b]
    assert rest_a.shape == rest_b.shape == (1, ckpt.config.vocab_size)  # row 2: the host's
    np.testing.assert_allclose(rest_a, rest_b, rtol=1e-4, atol=1e-4)
    assert s_b[1].top_logprobs.keys() == s_a[1].top_logprobs.keys()


SAMPLED = SamplingParams(
    max_tokens=20, temperature=0.8, top_p=0.9, top_k=20, seed=3, ignore_eos=True, logprobs=2
)


def test_engine_samples_on_the_device_reproducibly():
    """Seeded: the same tokens twice, and batched as alone; the reported logprobs are the
    model's (the host path's numbers for the same tokens)."""
    llm = LLM(str(TINY), backend="torch", backend_options={"device_sampling": True})
    assert llm.backend.samples_on_device and "device sampling" in llm.backend.describe()
    a = llm.generate(PROMPTS, SAMPLED)
    assert _tokens(a) == _tokens(llm.generate(PROMPTS, SAMPLED))
    assert _tokens(a)[2:] == _tokens(llm.generate(PROMPTS[2:], SAMPLED))
    out = a[1].outputs[0]
    logits = llm.logits(PROMPTS[1] + out.token_ids)[len(PROMPTS[1]) - 1 : -1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    for k, (t, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert len(lp) >= 2 and lp[t] == pytest.approx(float(logp[k, t]), abs=1e-4)


def test_greedy_with_penalties_on_the_device_equals_the_host_sampler():
    p = SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.3, ignore_eos=True)
    host = LLM(str(TINY), backend="torch").generate(PROMPTS, p)
    dev = LLM(str(TINY), backend="torch", backend_options={"device_sampling": True})
    assert _tokens(dev.generate(PROMPTS, p)) == _tokens(host)


def test_speculation_with_device_sampling_equals_plain_device_sampling():
    """A proposal's row draws with the uniform of its output position, after the proposals
    before it: the kept tokens are plain device sampling's."""
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    p = SamplingParams(
        max_tokens=24, temperature=0.7, seed=9, ignore_eos=True, repetition_penalty=1.1
    )
    opts = {"device_sampling": True}
    plain = LLM(str(TINY), backend="torch", backend_options=opts).generate(PROMPTS, p)
    spec = LLM(str(TINY), backend="torch", backend_options=opts, speculative_config=ngram)
    assert _tokens(spec.generate(PROMPTS, p)) == _tokens(plain)
    assert spec.engine.n_accepted_tokens > 0


def test_rows_the_device_cannot_sample_stay_on_the_host():
    """n > 1, token rules: sample_row's seeded stream, unchanged by device_sampling."""
    p = SamplingParams(max_tokens=12, temperature=0.8, seed=4, n=2, logit_bias={5: 2.0})
    host = LLM(str(TINY), backend="torch").generate(PROMPTS, p)
    dev = LLM(str(TINY), backend="torch", backend_options={"device_sampling": True})
    got = dev.generate(PROMPTS, p)
    assert [[o.token_ids for o in r.outputs] for r in got] == [
        [o.token_ids for o in r.outputs] for r in host
    ]


# -- decode attention from a kernel library (torch_attention.py) ------------------------------------


def test_kernel_choice_falls_back_to_sdpa_with_the_reason(monkeypatch):
    from tinyserve.backends import create_backend
    from tinyserve.backends.torch_attention import choose_kernel
    from tinyserve.errors import BackendError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_kernel("auto", cpu, torch.float32) == ("sdpa", "paged kernels need CUDA, not cpu")
    assert choose_kernel("sdpa", cuda, torch.bfloat16) == ("sdpa", "")
    assert choose_kernel("auto", cuda, torch.float32) == (
        "sdpa",
        "paged kernels take float16 / bfloat16, not torch.float32",
    )
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # neither imports, installed or not
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    kernel, why = choose_kernel("auto", cuda, torch.bfloat16)
    assert kernel == "sdpa" and "flashinfer does not import" in why and "flash_attn does" in why
    kernel, why = choose_kernel("flash_attn", cuda, torch.float16)
    assert kernel == "sdpa" and "flashinfer" not in why
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert choose_kernel("auto", cuda, torch.bfloat16) == ("flash_attn", "")
    with pytest.raises(ValueError, match="attention must be one of auto, sdpa"):
        choose_kernel("triton", cpu, torch.float32)
    with pytest.raises(BackendError, match="attention must be one of"):
        create_backend("torch", attention="triton")
    assert create_backend("torch").attention == "auto"


def _attend(q, keys, values, scale):
    """(H, Dh), (L, KVH, Dh) x2 -> (H, Dh): one query row over its context, heads grouped."""
    G = q.shape[0] // keys.shape[1]
    k = keys.repeat_interleave(G, dim=1).float()  # (L, H, Dh)
    v = values.repeat_interleave(G, dim=1).float()
    w = torch.softmax(torch.einsum("hd,lhd->hl", q.float(), k) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", w, v).to(q.dtype)


def _fake_flash_attn(calls):
    """flash_attn_with_kvcache as its documentation says it reads a paged cache."""

    def flash_attn_with_kvcache(q, k, v, cache_seqlens, block_table, softmax_scale, causal):
        calls.append(q.shape[0])
        BS, out = k.shape[1], torch.empty_like(q)
        for s in range(q.shape[0]):
            n = int(cache_seqlens[s])
            blocks = block_table[s, : -(-n // BS)].long()
            keys = k[blocks].reshape(-1, *k.shape[2:])[:n]
            vals = v[blocks].reshape(-1, *v.shape[2:])[:n]
            out[s, 0] = _attend(q[s, 0], keys, vals, softmax_scale)
        return out

    mod = types.ModuleType("flash_attn")
    mod.flash_attn_with_kvcache = flash_attn_with_kvcache
    return mod


def _fake_flashinfer(calls):
    """FlashInfer's paged decode wrapper as its documentation lays the pages out."""

    class BatchDecodeWithPagedKVCacheWrapper:
        def __init__(self, workspace, layout):
            assert layout == "NHD"

        def plan(self, indptr, indices, last, H, KVH, Dh, page_size, **kw):
            self.layout, self.scale = (indptr, indices, last, page_size), kw["sm_scale"]

        def run(self, q, kv):
            calls.append(q.shape[0])
            (k, v), (indptr, indices, last, BS) = kv, self.layout
            out = torch.empty_like(q)
            for s in range(q.shape[0]):
                pages = indices[indptr[s] : indptr[s + 1]].long()
                n = (len(pages) - 1) * BS + int(last[s])
                keys = k[pages].reshape(-1, *k.shape[2:])[:n]
                vals = v[pages].reshape(-1, *v.shape[2:])[:n]
                out[s] = _attend(q[s], keys, vals, self.scale)
            return out

    mod = types.ModuleType("flashinfer")
    mod.BatchDecodeWithPagedKVCacheWrapper = BatchDecodeWithPagedKVCacheWrapper
    return mod


@pytest.mark.parametrize("kernel", ["flash_attn", "flashinfer"])
def test_kernel_library_decode_is_wired_as_sdpa(kernel, monkeypatch):
    """The lowering's calls into each library, against a stand-in that reads the paged cache as
    the library documents (the libraries need CUDA; scripts/gpu_check.py runs the real ones):
    decode steps, eager and (flash-attn) through the padded static path, equal SDPA's."""
    calls = []
    fake = _fake_flash_attn(calls) if kernel == "flash_attn" else _fake_flashinfer(calls)
    monkeypatch.setitem(sys.modules, kernel, fake)
    ckpt = tiny_checkpoint("llama")
    BS = 256 if kernel == "flash_attn" else 4  # flash-attn's paged cache: 256-token blocks
    NB = 10
    tables = [[0, 1, 2, 3], [4, 5], [6, 7, 8]]
    prompts = [list(range(3, 14)), [5, 9, 2], list(range(40, 47))]
    runs = {}
    for name in ("sdpa", kernel):
        b = TorchBackend(graphs=True)
        model = build_model(ckpt.config, ckpt.tensors, b.ops)
        kv = b.allocate_kv(model.kv_layout(), NB, BS)
        lowered = b.lowered(model)
        lowered.kernel = name  # what choose_kernel picks on CUDA when the library imports
        graphs = DecodeGraphs(lowered, max_batch=4, capture=False)
        b.forward(model, Batch.build([(p, 0, t) for p, t in zip(prompts, tables)], BS), kv)
        lens, out = [len(p) for p in prompts], []
        for step in range(4):
            batch = Batch.build(
                [([20 + s + step], n, t) for s, (n, t) in enumerate(zip(lens, tables))], BS
            )
            with torch.inference_mode():
                if step % 2 and kernel == "flash_attn":  # the captured path's plan
                    out.append(graphs(StepMeta.build(batch), kv, NB).numpy())
                else:
                    out.append(lowered(b.step_meta(batch), kv).numpy())
            lens = [n + 1 for n in lens]
        runs[name] = out
    n_layers = ckpt.config.n_layers
    assert len(calls) == 4 * n_layers, "the library was not called at every decode layer"
    for a, want in zip(runs[kernel], runs["sdpa"]):
        np.testing.assert_allclose(a, want, atol=1e-5 * float(want.std()) + 1e-6)


def test_each_pool_set_pads_into_its_own_scratch_block(monkeypatch):
    """Two engines on one backend (plain and speculative, say): padded rows of a step over the
    first pools write into the first pools' scratch block, not a block index of the second's;
    pools allocated without one run eagerly."""
    seen = []
    real = DecodeGraphs.__call__
    monkeypatch.setattr(
        DecodeGraphs,
        "__call__",
        lambda self, step, kv, sb: seen.append(sb) or real(self, step, kv, sb),
    )
    b = TorchBackend(graphs=True)
    ckpt = tiny_checkpoint("llama")
    model = build_model(ckpt.config, ckpt.tensors, b.ops)
    BS, tables = 4, [[0, 1], [2], [3, 4]]
    kv_a = b.allocate_kv(model.kv_layout(), 6, BS)
    b.allocate_kv(model.kv_layout(), 3, BS)  # the second engine's: its scratch is block 3
    b.forward(model, Batch.build([([1, 2, 3, 4, 5], 0, tables[0]), ([6], 0, tables[1]),
                                  ([7, 8], 0, tables[2])], BS), kv_a)  # fmt: skip
    before = [{k: v.clone() for k, v in layer.items()} for layer in kv_a]
    batch = Batch.build([([9], 5, tables[0]), ([9], 1, tables[1]), ([9], 2, tables[2])], BS)
    b.forward(model, batch, kv_a)
    assert seen == [6]
    live = [s for s in range(6 * BS) if s not in set(batch.slots.tolist())]
    for old, new in zip(before, kv_a):
        for key, pool in new.items():
            flat_new, flat_old = pool.reshape(7 * BS, -1), old[key].reshape(7 * BS, -1)
            assert torch.equal(flat_new[live], flat_old[live]), "a live slot was written"
    eager_kv = TorchBackend().allocate_kv(model.kv_layout(), 6, BS)  # no scratch block
    b.forward(model, Batch.build([([1], 0, [0])], BS), eager_kv)
    assert seen == [6]
