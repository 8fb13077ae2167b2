"""LLM: the synchronous facade apps embed. Every method drives the one Engine step loop."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .engine import Engine, EngineConfig, token_id_list
from .errors import BackendError, RequestError, TokenizerError
from .outputs import CompletionOutput, RequestOutput
from .sampling import SamplingParams
from .settings import settings

Prompt = str | list[int]


def _load_tokenizer(ckpt):
    from .tokenizer import Tokenizer

    if ckpt.format == "gguf":
        return Tokenizer.from_gguf_metadata(ckpt.metadata)
    d = ckpt.model_dir
    if not any((d / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        print(
            f"tinyserve: warning: no tokenizer in {d}; prompts must be token ids", file=sys.stderr
        )
        return None
    return Tokenizer.from_dir(d)


def _create_backend(name: str, device: str | None, dtype: str | None, options: dict):
    from .backends import create_backend, get_backend_class, is_registered

    if name == "cpu":  # the native backend falls back to the reference when it is not built
        ok, reason = (
            get_backend_class("cpu").availability()
            if is_registered("cpu")
            else (False, "not built")
        )
        if not ok:
            print(
                f"tinyserve: warning: cpu backend unavailable ({reason}); using numpy",
                file=sys.stderr,
            )
            name, options = "numpy", {}
    return create_backend(name, device=device, dtype=dtype, **options)


class LLM:
    """A model loaded once, generating for many prompts at once.

    Args:
        model: a catalog name (pulled on first use), a HF checkpoint directory, or a .gguf file.
        backend: registered backend name ("cpu", "numpy", "torch", ...).
        device, dtype: passed to the backend (e.g. device="cuda:0", dtype="bfloat16").
        backend_options: the backend's own constructor arguments, e.g. {"num_threads": 2,
            "kv_dtype": "float16"} for "cpu", {"lower": False} to run the model file op by op.
        block_size: tokens per KV block.
        max_num_seqs, max_num_batched_tokens: scheduler limits per step.
        kv_cache_tokens: KV capacity in tokens (default: from a 512 MiB budget).
        enable_prefix_caching: reuse the KV blocks of shared prompt prefixes.
        seed: seeds the requests that bring no seed of their own: the k-th request admitted
            samples as if its seed were seed * 2**32 + k.
        speculative_config: speculative decoding, as vLLM spells it: {"method": "ngram",
            "num_speculative_tokens": k, "prompt_lookup_max": m, "prompt_lookup_min": n}; the
            output is what plain decoding gives (tinyserve/speculative.py), in fewer steps.
        enforce_eager: never run decode steps through CUDA graphs (backend "torch": they are
            off unless backend_options={"graphs": True} or TINYSERVE_TORCH_GRAPHS=1 ask).
        tensor_parallel_size: ranks one model is split over (backend "torch": heads and
            feed-forward split Megatron-style, experts spread over the ranks; gloo on the CPU,
            NCCL on CUDA, HCCL on Ascend). This process is rank 0; the others start here.

    The environment's backend settings (tinyserve.settings: TINYSERVE_NUM_THREADS, ...) are
    the defaults of backend_options; what backend_options names wins.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        backend: str = "cpu",
        device: str | None = None,
        dtype: str | None = None,
        backend_options: dict | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        kv_cache_tokens: int | None = None,
        kv_cache_bytes: int = 512 * 2**20,
        enable_prefix_caching: bool = True,
        chunk_size: int | None = None,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        speculative_config: dict | None = None,
        enforce_eager: bool = False,
    ):
        from . import catalog
        from .loading import load_checkpoint
        from .speculative import SpeculativeConfig

        path = catalog.resolve(str(model) if model is not None else catalog.DEFAULT_MODEL)
        self.checkpoint = load_checkpoint(path)
        self.config = self.checkpoint.config
        self.tokenizer = _load_tokenizer(self.checkpoint)
        options = {**settings().backend_options(backend), **(backend_options or {})}
        if tensor_parallel_size != 1:
            if backend != "torch":
                raise BackendError(f"tensor parallelism runs on the torch backend, not {backend!r}")
            options["tensor_parallel_size"] = tensor_parallel_size
        if backend == "torch":
            if enforce_eager:
                options["graphs"] = False
            options.setdefault("graph_max_batch", max_num_seqs)  # the largest batch bucket
        self.backend = _create_backend(backend, device, dtype, options)
        try:
            engine_config = EngineConfig(
                block_size=block_size,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                kv_cache_tokens=kv_cache_tokens,
                kv_cache_bytes=kv_cache_bytes,
                enable_prefix_caching=enable_prefix_caching,
                chunk_size=chunk_size,
                seed=seed,
                speculative=SpeculativeConfig.from_dict(speculative_config),
            )
        except RequestError:
            raise
        except ValueError as e:
            raise BackendError(f"invalid engine setting: {e}") from None
        self.engine = Engine(self.checkpoint, self.tokenizer, self.backend, engine_config)

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt together (continuous batching); outputs in prompt order."""
        prompts = _as_prompt_list(prompts)
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        ids = self._add_all(prompts, params_list)
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        finally:
            for rid in ids:  # an exception (or Ctrl-C) mid-way frees everything
                if rid not in done:
                    self.engine.abort(rid)
        return [done[rid] for rid in ids]

    def _add_all(self, prompts, params_list) -> list[str]:
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for rid in ids:  # all or nothing: a bad prompt must not leave the others queued
                self.engine.abort(rid)
            raise
        return ids

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> Iterator[CompletionOutput]:
        """Yield the new text / tokens of each step as they come; closing the iterator aborts."""
        (rid,) = self._add_all([prompt], [params])
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    finished = out.finished
                    for delta in out.deltas:
                        if delta.text or delta.token_ids or delta.finish_reason:
                            yield delta
        finally:
            if not finished:
                self.engine.abort(rid)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        tool_choice: str | dict = "auto",
        parallel_tool_calls: bool = True,
    ) -> list[RequestOutput]:
        """Render the model's chat template (sandboxed) and generate the assistant's reply.

        tools (OpenAI's function tools), tool_choice ("none", "auto", "required" or
        {"type": "function", "function": {"name": ...}}) and parallel_tool_calls as OpenAI takes
        them: a reply that calls tools has its `tool_calls` set (tools.ToolCall: name, arguments
        as JSON text, id), the call syntax taken out of its text and finish_reason "tool_calls".
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if tools is None:
            return self.generate(
                [self.chat_prompt(c, add_generation_prompt) for c in conversations], params
            )
        from .tools import ToolPlan, apply_tool_calls, call_syntax

        plan = ToolPlan(tools, tool_choice, parallel_tool_calls)
        syntax = call_syntax(self._chat_tokenizer())
        params = plan.sampling_params(params or SamplingParams(), syntax)
        prompts = [self.chat_prompt(c, tools=plan) for c in conversations]
        outs = self.generate(prompts, params)
        for out in outs:
            for o in out.outputs:
                apply_tool_calls(o, plan, syntax)
        return outs

    def chat_prompt(
        self, messages: list[dict], add_generation_prompt: bool = True, tools=None
    ) -> list[int]:
        """Token ids of a conversation rendered with the chat template (and a tools.ToolPlan)."""
        tokenizer = self._chat_tokenizer()
        if tools is not None:
            text = tools.render(tokenizer, messages)
        else:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt
            )
        return self.tokenizer.encode(
            text, add_special_tokens=False
        )  # the template wrote BOS if any

    def _chat_tokenizer(self):
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer, so no chat template")
        return self.tokenizer

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """(T,) -> (T, V) float32: one full forward, for verification."""
        return self.engine.logits(list(token_ids))


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, (int, float, np.number)) for t in prompts):
        return [prompts]  # one prompt of token ids (the engine checks they are integers)
    return [p if isinstance(p, str) else token_id_list(p) for p in prompts]
