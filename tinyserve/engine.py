"""Engine: the one generation loop. add_request / step / abort over a scheduler, a paged KV cache,
a backend that runs the model, the sampler and the incremental detokenizer.

Every path that generates text (LLM.generate, LLM.stream, the CLI, the server, the benchmarks)
drives this step loop; there is no other.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from .batch import Batch
from .detokenizer import IncrementalDetokenizer
from .device_sampling import DeviceSampling
from .errors import OutOfBlocks, RequestError
from .kv_cache import KVCacheManager
from .models import build_model
from .outputs import CompletionOutput, RequestOutput
from .sampling import Sample, SamplingParams, TokenRules, log_softmax, sample_row
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Request, Sequence, Status
from .speculative import SpeculativeConfig
from .structured import GrammarCompiler


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_tokens: int | None = None  # KV capacity in tokens; else from kv_cache_bytes
    kv_cache_bytes: int = 512 * 2**20
    enable_prefix_caching: bool = True
    chunk_size: int | None = None  # longest prefill chunk per sequence and step
    seed: int = 0  # seeds requests that bring no seed of their own
    speculative: SpeculativeConfig | None = None  # propose tokens, verify them in one forward

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(
                f"kv_cache_tokens must hold at least one block, got {self.kv_cache_tokens}"
            )


def token_id_list(prompt) -> list[int]:
    """A prompt of token ids -> list[int]; RequestError unless every id is an integer (533.0 and
    True are not: int() would take them silently)."""
    try:
        ids = list(prompt)
    except TypeError:
        raise RequestError(
            f"a prompt is a str or a list of token ids, got {prompt!r:.40}"
        ) from None
    for i, t in enumerate(ids):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise RequestError(f"prompt token ids must be integers, got {t!r:.40} at position {i}")
    return [int(t) for t in ids]


class Engine:
    """Serves many requests at once from one model (continuous batching over a paged KV cache)."""

    def __init__(self, checkpoint, tokenizer, backend, config: EngineConfig = EngineConfig()):
        self.config = config
        self.model_config = checkpoint.config
        self.tokenizer = tokenizer
        self.backend = backend
        self.model = build_model(checkpoint.config, checkpoint.tensors, backend.ops)
        backend.prepare(checkpoint, self.model)
        layout = self.model.kv_layout()
        num_blocks = self._num_blocks(layout)
        self.kv = backend.allocate_kv(layout, num_blocks, config.block_size)
        # a model whose cached K/V depend on more than the prefix (Phi-3's LongRoPE switches on the
        # whole length) opts out of prefix caching
        prefix_caching = config.enable_prefix_caching and getattr(
            self.model, "prefix_cacheable", True
        )
        self.kv_manager = KVCacheManager(num_blocks, config.block_size, prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.chunk_size),
            self.kv_manager,
        )
        self.requests: dict[str, Request] = {}
        self.eos_ids = set(checkpoint.config.eos_token_ids)
        if tokenizer is not None:
            self.eos_ids |= set(tokenizer.eos_token_ids)
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._n_admitted = 0  # requests admitted so far: a seedless request's seed derives from it
        self.n_prefilled_tokens = 0  # tokens computed by prefill steps (not served from cache)
        self.proposer = None
        if config.speculative is not None:
            self.proposer = config.speculative.proposer(
                backend, checkpoint.config.vocab_size, config.block_size, num_blocks
            )
        self.n_draft_tokens = 0  # speculation: tokens proposed (and computed), and kept
        self.n_accepted_tokens = 0
        self.n_steps = 0
        self.mask_seconds = 0.0  # time spent computing structured-output masks (bench reads it)
        self._grammar_compiler: GrammarCompiler | None = None  # built on the first constraint

    def _num_blocks(self, layout) -> int:
        c = self.config
        per_token = sum(int(np.prod(shape)) for spec in layout for shape in spec.values())
        bytes_per_block = per_token * c.block_size * self.backend.kv_itemsize
        if c.kv_cache_tokens is not None:
            return c.kv_cache_tokens // c.block_size
        useful = c.max_num_seqs * -(-self.model_config.context_len // c.block_size)
        return max(1, min(c.kv_cache_bytes // bytes_per_block, useful))

    # -- requests -------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises RequestError for one that can never be served."""
        params = params or SamplingParams()
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: pass token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, token_id_list(prompt)
        self._check_prompt(ids, params)
        encode = None if self.tokenizer is None else self._encode_plain
        rules = TokenRules.build(params, self.model_config.vocab_size, self.eos_ids, encode)
        seed = self._default_seed(self._n_admitted) if params.seed is None else params.seed
        self._n_admitted += 1
        req = Request(request_id, text, ids, params, seed)
        max_len = min(len(ids) + params.max_tokens, self.model_config.context_len)
        seq = Sequence(next(self._seq_ids), request_id, 0, ids, params, seed, max_len, rules)
        seq.detokenizer = self._detokenizer(params)
        if params.structured_outputs is not None:  # compiled now: a bad spec never gets queued
            seq.matcher = self.grammar_compiler.matcher(params.structured_outputs)
        req.seqs.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        return request_id

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-output compiler over this model's vocabulary (made on first use)."""
        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(
                self.tokenizer, self.model_config.vocab_size, self.eos_ids
            )
        return self._grammar_compiler

    def _encode_plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _default_seed(self, admission_index: int) -> int:
        """The seed of a request that brings none: the engine seed in the high bits, the
        request's admission index in the low ones, so runs repeat and requests differ."""
        return self.config.seed * 2**32 + admission_index

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        V, ctx = self.model_config.vocab_size, self.model_config.context_len
        if not ids:
            raise RequestError("empty prompt")
        if min(ids) < 0 or max(ids) >= V:
            raise RequestError(f"prompt token ids must be in [0, {V}), got {min(ids)}..{max(ids)}")
        if len(ids) >= ctx:
            raise RequestError(
                f"prompt of {len(ids)} tokens does not fit the model's context of {ctx}"
            )
        kv = self.kv_manager
        total = min(len(ids) + params.max_tokens, ctx)
        n = params.n_samples
        need = kv.blocks_for(total) + (n - 1) * (kv.blocks_for(params.max_tokens) + 1)
        if need > kv.num_blocks:
            raise RequestError(
                f"request needs {need} KV blocks ({total} tokens x n={n}) but the cache has only "
                f"{kv.num_blocks}; lower max_tokens or raise kv_cache_tokens"
            )

    def _detokenizer(self, params: SamplingParams):
        if self.tokenizer is None:
            return None
        # a constrained output's text is the bytes its grammar matched, a leading space too
        constrained = params.structured_outputs is not None
        return IncrementalDetokenizer(
            self.tokenizer, params.skip_special_tokens, keep_leading_space=constrained
        )

    def abort(self, request_id: str) -> None:
        """Stop a request now and free all its KV blocks."""
        req = self.requests.pop(str(request_id), None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.finished:
                self._finish(seq, "abort")
        req.forked = True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward over the flat batch, sample, and report what changed."""
        self._propose()
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        copies = self.kv_manager.take_copies()
        if copies:
            self.backend.copy_blocks(self.kv, [s for s, _ in copies], [d for _, d in copies])
        # logits rows, in flat order: a sequence's prompt-scoring rows (prompt_logprobs), then
        # the row it samples from once its chunk reaches its newest token (and one after each
        # speculative proposal); others need no logits
        chunks, rows, fast, plan = [], [], [], []
        on_device = []  # DeviceSampling.build's entries: rows the backend samples itself
        start = 0
        for seq, n in zip(sched.seqs, sched.n_tokens):
            c, newest = seq.num_computed, len(seq.token_ids) - 1
            seq.draft = seq.draft[: max(0, c + n - 1 - newest)]  # what the budget left room for
            chunks.append((seq.token_ids[c : c + n] + seq.draft, c, seq.block_table))
            scored = seq.prompt_rows(c, n)
            rows += [start + p - c for p in scored]
            fast += [False] * len(scored)
            done = c + n > newest
            n_rows = 1 + len(seq.draft) if done and seq.params.max_tokens > 0 else 0
            rows.extend(range(start + n - n_rows, start + n))
            if n_rows and self._samples_on_device(seq):
                on_device += [
                    self._device_entry(seq, len(rows) - n_rows + j, j) for j in range(n_rows)
                ]
                fast += [False] * n_rows
            else:
                fast += [self._argmax_only(seq)] * n_rows
            plan.append((seq, len(scored), n_rows, done))
            start += n
        batch = Batch.build(chunks, self.kv_manager.block_size, rows)
        now = time.perf_counter()
        for seq in sched.seqs:
            m = self.requests[seq.request_id].metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
        for seq in sched.preempted:
            self.requests[seq.request_id].metrics.n_preemptions += 1
        # rows that need only an argmax get it on the backend's device; the rest come back as logits
        fast = np.array(fast, dtype=bool)  # (R,)
        if on_device:
            table = DeviceSampling.build(on_device, self.model_config.vocab_size)
            greedy_ids, samples, logits, finite = self.backend.forward_sample(
                self.model, batch, self.kv, fast, table
            )
            sampled = dict(zip(table.rows.tolist(), samples))  # logits row -> its Sample
        else:
            greedy_ids, logits, finite = self.backend.forward_greedy(
                self.model, batch, self.kv, fast
            )
            sampled = {}
        self.n_steps += 1
        for seq, n in zip(sched.seqs, sched.n_tokens):
            if seq.num_computed < seq.prompt_len:
                prefilled = min(n, seq.prompt_len - seq.num_computed)
                self.n_prefilled_tokens += prefilled
                self.requests[seq.request_id].metrics.n_prefilled_tokens += prefilled
            seq.num_computed += n - len(seq.draft)  # proposals count once verified
            self.kv_manager.cache_full_blocks(seq)
        now = time.perf_counter()
        allowed = self._masks(
            [seq for seq, _, n_rows, _ in plan if n_rows and not self._argmax_only(seq)]
        )
        touched: dict[str, Request] = {}
        row = 0  # into logits (the rows not taken by their argmax), in row order
        flat = 0  # into fast / finite: every logits row, in row order
        ids_of = iter(greedy_ids)
        for seq, n_scored, n_rows, done in plan:
            req = self.requests[seq.request_id]
            # scored rows alone are not reported: a stream's first output has all the prompt's
            if n_scored:
                self._score_prompt(seq, logits[row : row + n_scored])
                row += n_scored
                flat += n_scored
            if done and not n_rows:  # max_tokens=0: the prompt was all there was to compute
                touched[req.request_id] = req
                self._fork(req)
                for s in req.seqs:
                    self._finish(s, "length")
                continue
            if not n_rows:
                continue
            touched[req.request_id] = req
            if n_rows > 1:  # speculation: the newest token's row and one after each proposal
                if fast[flat]:
                    taken = [
                        Sample(int(t), float("nan"), None) for t in itertools.islice(ids_of, n_rows)
                    ]
                elif flat in sampled:
                    taken = [sampled[flat + j] for j in range(n_rows)]
                else:
                    taken, row = logits[row : row + n_rows], row + n_rows
                self._verify(seq, taken, finite[flat : flat + n_rows], now)
                flat += n_rows
                continue
            is_fast, is_finite, done_here = fast[flat], finite[flat], sampled.get(flat)
            flat += 1
            if is_fast:
                done_here = Sample(int(next(ids_of)), float("nan"), None)
            elif done_here is None:
                sample_logits = logits[row]
                row += 1
            if not is_finite:  # NaN / Inf logits: no token to give, the request ends abnormally
                self._end_non_finite(req, seq)
                continue
            if done_here is not None:  # its argmax or its draw came from the device
                self._append(seq, done_here, now)
                continue
            mask = allowed.get(seq.seq_id)
            if not req.forked:
                self._fork(req)
                for sibling in req.seqs[1:]:  # a fresh copy of seq's matcher: the same mask
                    self._append(sibling, self._sample(sibling, sample_logits, mask), now)
            self._append(seq, self._sample(seq, sample_logits, mask), now)
        return [self._output(req) for req in touched.values()]

    # -- speculative decoding (speculative.py) ---------------------------------------------------

    def _propose(self) -> None:
        """Each decoding sequence's proposals for this step (none without a proposer)."""
        if self.proposer is None:
            return
        seqs, rooms = [], []
        for seq in self.scheduler.running:
            seq.draft = []
            # one token to compute (decoding), no grammar to walk through guesses
            if seq.n_uncomputed != 1 or seq.matcher is not None:
                continue
            p = seq.params
            # proposals plus the token sampled after them stay within max_tokens and max_len
            room = min(p.max_tokens - len(seq.output_ids), seq.max_len - len(seq.token_ids)) - 1
            if seq.spec_cap is not None:  # after a verification: what it kept, plus one
                room = min(room, seq.spec_cap)
            if room >= 1:
                seqs.append(seq)
                rooms.append(room)
        for seq, draft in zip(seqs, self.proposer.propose_all(seqs, rooms)):
            seq.draft = draft

    def _verify(self, seq: Sequence, rows, finite, now: float) -> None:
        """Sample the proposals' rows in order, as plain decoding would, while each sampled
        token is the proposal the model saw next; then roll back what the model saw beyond.
        rows: Samples the device took, or logits rows; finite: whether each row's logits are."""
        assert seq.matcher is None, "a constrained sequence never speculates: rows skip the mask"
        draft, seq.draft = seq.draft, []
        req = self.requests[seq.request_id]
        m = req.metrics
        accepted = 0
        for i, row in enumerate(rows):
            if not finite[i]:  # NaN / Inf logits: the request ends abnormally here
                self._end_non_finite(req, seq)
                break
            s = row if isinstance(row, Sample) else self._sample(seq, row, None)
            self._append(seq, s, now)
            if seq.finished or i == len(draft) or s.token_id != draft[i]:
                break
            seq.num_computed += 1  # row i + 1 was computed after exactly this token: it stands
            accepted += 1
        # the next proposal is as long as this one's kept run plus one: a sequence whose
        # guesses fail (prose) verifies a row or two, one that repeats itself grows back to k
        # (each row costs: on a 2-core AVX2 box 4 rows of a quantized matvec take ~2.1x one)
        seq.spec_cap = accepted + 1
        m.n_draft_tokens += len(draft)
        m.n_accepted_tokens += accepted
        m.n_spec_steps += 1
        self.n_draft_tokens += len(draft)
        self.n_accepted_tokens += accepted
        if not seq.finished:
            self.kv_manager.trim(seq)  # the rejected proposals' blocks back to the pool
            self.kv_manager.cache_full_blocks(seq)

    def _masks(self, seqs: list[Sequence]) -> dict[int, np.ndarray]:
        """seq_id -> (V,) bool: the tokens each constrained sequence may take next."""
        constrained = [seq for seq in seqs if seq.matcher is not None]
        if not constrained:
            return {}
        t0 = time.perf_counter()
        masks = self.grammar_compiler.masks([seq.matcher for seq in constrained])  # (R, V)
        self.mask_seconds += time.perf_counter() - t0
        return {seq.seq_id: m for seq, m in zip(constrained, masks)}

    def _score_prompt(self, seq: Sequence, logits: np.ndarray) -> None:
        """Append the prompt logprobs that these rows (K, V), in position order, give."""
        pl = seq.prompt_logprobs
        top_n = seq.params.prompt_logprobs
        logp = log_softmax(logits)  # (K, V)
        targets = np.array(seq.token_ids[len(pl) : len(pl) + len(logits)])  # (K,) scored tokens
        chosen = logp[np.arange(len(logits)), targets]  # (K,)
        if top_n:
            top = np.argpartition(-logp, top_n - 1, axis=-1)[:, :top_n]  # (K, top_n)
            top_lp = np.take_along_axis(logp, top, axis=-1)  # (K, top_n)
            order = np.argsort(-top_lp, axis=-1, kind="stable")
            top = np.take_along_axis(top, order, axis=-1)
            top_lp = np.take_along_axis(top_lp, order, axis=-1)
        for k, (t, v) in enumerate(zip(targets.tolist(), chosen.tolist())):
            entry = dict(zip(top[k].tolist(), top_lp[k].tolist())) if top_n else {}
            entry[t] = v
            pl.append(entry)

    def _end_non_finite(self, req: Request, seq: Sequence) -> None:
        """Finish seq with finish_reason "error" (never "stop" or "length": the text is cut short
        by the model's numbers, not by the request); siblings not yet forked share its row."""
        if not req.forked:
            self._fork(req)
            for sibling in req.seqs[1:]:
                self._finish(sibling, "error")
        self._finish(seq, "error")

    def _argmax_only(self, seq: Sequence) -> bool:
        """Greedy with nothing that needs the whole row: no penalties, token rules, logprobs or
        siblings to fork."""
        p = seq.params
        return (
            p.greedy
            and seq.matcher is None
            and p.logprobs is None
            and p.n_samples == 1
            and not seq.rules.active
            and p.repetition_penalty == 1.0
            and not p.presence_penalty
            and not p.frequency_penalty
        )

    def _samples_on_device(self, seq: Sequence) -> bool:
        """Whether the backend samples seq's rows itself: it can, and seq's sampling is all
        array maths (no grammar, token rules or siblings to fork; greedy rows with nothing else
        stay argmax-only)."""
        p = seq.params
        return (
            self.backend.samples_on_device
            and not self._argmax_only(seq)
            and seq.matcher is None
            and not seq.rules.active
            and p.n_samples == 1
        )

    @staticmethod
    def _device_entry(seq: Sequence, row: int, j: int) -> tuple:
        """DeviceSampling.build's entry for seq's row j of this step (j > 0: after proposals,
        whose tokens the row would follow)."""
        p = seq.params
        penalized = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        history = seq.output_ids + seq.draft[:j] if penalized else ()
        n_out = len(seq.token_ids) - seq.prompt_len + j
        prompt = seq.token_ids[: seq.prompt_len] if p.repetition_penalty != 1.0 else ()
        return (row, p, seq.seed, seq.index, prompt, history, n_out)

    @staticmethod
    def _sample(seq: Sequence, logits: np.ndarray, allowed: np.ndarray | None) -> Sample:
        rng = None if seq.params.greedy else seq.rng  # greedy rows make no generator
        prompt_ids = seq.token_ids[: seq.prompt_len]
        return sample_row(logits, seq.params, rng, prompt_ids, seq.output_ids, allowed, seq.rules)

    def _fork(self, req: Request) -> None:
        """n > 1: siblings share the computed prompt's blocks and sample their own tokens."""
        parent = req.seqs[0]
        for i in range(1, req.params.n_samples):
            child = Sequence(
                next(self._seq_ids),
                req.request_id,
                i,
                req.prompt_ids,
                req.params,
                req.seed,
                parent.max_len,
                parent.rules,
            )
            child.detokenizer = self._detokenizer(req.params)
            if parent.matcher is not None:  # each child walks the grammar on its own
                child.matcher = parent.matcher.fork()
            self.kv_manager.fork(parent, child)
            self.scheduler.add_running(child)
            req.seqs.append(child)
        req.forked = True

    def _append(self, seq: Sequence, s: Sample, now: float) -> None:
        """Append seq's next token and check every stop condition."""
        p = seq.params
        seq.token_ids.append(s.token_id)
        if seq.matcher is not None:  # the grammar follows exactly the tokens the output keeps
            seq.matcher.accept(s.token_id)
        if seq.logprobs is not None:
            seq.logprobs.append({**(s.top_logprobs or {}), s.token_id: s.logprob})
        if not math.isnan(s.logprob):  # computed for logprobs and for best_of's ranking
            seq.cumulative_logprob += s.logprob
        m = self.requests[seq.request_id].metrics
        if seq.index == 0:
            m.token_times.append(now)
            if m.first_token_time is None:
                m.first_token_time = now
        if (s.token_id in self.eos_ids and not p.ignore_eos) or s.token_id in p.stop_token_ids:
            # (min_tokens masked these until it was reached)
            return self._finish(seq, "stop")
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.add([s.token_id])
            if p.stop and self._cut_at_stop(seq):
                return self._finish(seq, "stop", flush=False)
        if seq.matcher is not None and seq.matcher.done:  # the grammar takes nothing more
            return self._finish(seq, "stop")
        if len(seq.output_ids) >= p.max_tokens or len(seq.token_ids) >= seq.max_len:
            self._finish(seq, "length")

    @staticmethod
    def _cut_at_stop(seq: Sequence) -> bool:
        """Truncate the text before the first stop string, if one has appeared."""
        window_start = max(0, seq.sent_text_len - max(len(s) for s in seq.params.stop))
        hits = [i for i in (seq.text.find(s, window_start) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        seq.text = seq.text[: min(hits)]
        return True

    def _finish(self, seq: Sequence, reason: str, flush: bool = True) -> None:
        if seq.detokenizer is not None and flush:
            seq.text += seq.detokenizer.finish()  # flush text held back for an incomplete character
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        if self.proposer is not None:
            self.proposer.forget(seq)
        req = self.requests.get(seq.request_id)
        if req is not None and all(s.finished for s in req.seqs):
            req.metrics.finish_time = time.perf_counter()

    def _output(self, req: Request) -> RequestOutput:
        outputs, deltas = [], []
        seqs = req.seqs
        best_of = req.params.n_samples > req.params.n
        if best_of:  # only the n best are shown, so nothing is until all have finished
            seqs = self._best(req) if req.finished else []
        for index, seq in enumerate(seqs):
            text = seq.text
            if (
                not seq.finished and seq.params.stop
            ):  # hold back what may be the start of a stop string
                text = text[
                    : max(seq.sent_text_len, len(text) - max(len(s) for s in seq.params.stop) + 1)
                ]
            out_ids = seq.output_ids
            lp = seq.logprobs
            cumulative = seq.cumulative_logprob if lp is not None or best_of else None
            outputs.append(
                CompletionOutput(
                    index, text, list(out_ids), seq.finish_reason, lp and list(lp), cumulative
                )
            )
            deltas.append(
                CompletionOutput(
                    index,
                    text[seq.sent_text_len :],
                    out_ids[seq.sent_token_len :],
                    seq.finish_reason,
                    None if lp is None else lp[seq.sent_token_len :],
                )
            )
            seq.sent_text_len, seq.sent_token_len = len(text), len(out_ids)
        finished = req.finished
        if finished:
            del self.requests[req.request_id]
        prompt_logprobs = req.seqs[0].prompt_logprobs
        if prompt_logprobs is not None and len(prompt_logprobs) < len(req.prompt_ids):
            prompt_logprobs = None  # not all computed yet
        return RequestOutput(
            req.request_id,
            req.prompt,
            req.prompt_ids,
            outputs,
            finished,
            req.metrics,
            deltas,
            prompt_logprobs,
        )

    @staticmethod
    def _best(req: Request) -> list[Sequence]:
        """best_of: the n samples with the highest cumulative logprob (ties: the earlier one)."""
        ranked = sorted(req.seqs, key=lambda seq: (-seq.cumulative_logprob, seq.index))
        return ranked[: req.params.n]

    # -- verification ---------------------------------------------------------------------------

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """(T,) -> (T, V) float32: one full forward over a fresh sequence, every row's logits."""
        ids = token_id_list(token_ids)
        self._check_prompt(ids, SamplingParams(max_tokens=1))
        seq = Sequence(-1, "<logits>", 0, ids, SamplingParams(max_tokens=1), None, len(ids))
        try:
            self.kv_manager.reserve(seq, len(ids))  # all or nothing
        except OutOfBlocks:
            raise RequestError(f"{len(ids)} tokens do not fit the free KV cache now") from None
        try:
            copies = self.kv_manager.take_copies()
            assert not copies, "a fresh sequence shares no blocks"
            batch = Batch.build(
                [(ids, 0, seq.block_table)], self.kv_manager.block_size, list(range(len(ids)))
            )
            return self.backend.forward(self.model, batch, self.kv)
        finally:
            self.kv_manager.free(seq)

    @property
    def n_preemptions(self) -> int:
        return self.scheduler.n_preemptions
