"""Structured output: a grammar (JSON schema, regex, choice, Lark / GBNF) as a token mask per step.

The grammar engine is llguidance (Microsoft's; no dependencies, a few MB): it compiles a spec to
a parser over the tokenizer's byte strings and, at each step, writes the set of tokens that keep
the output inside the grammar as a bitmask (V / 32 int32 words per row). The engine keeps one
`Matcher` per sequence, fed exactly the tokens it appends, so its state follows the output
through forks (n > 1, each child a copy), preemption (the tokens stay, only KV is recomputed)
and prefix-cache hits (which change the KV, never the tokens). EOS is in the mask only where the
grammar accepts; a grammar that can take no further byte ends the request at once.

It is an optional extra (`pip install 'tinyserve[structured]'`); asking for structured output
without it is a RequestError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GrammarError, RequestError

_INSTALL = "structured output needs llguidance: pip install 'tinyserve[structured]'"
# JSON may carry the whitespace models write, compact, one space, or a newline and an indent (so
# an unconstrained answer that already fits the schema keeps its text), but never long runs of
# it: a sampled output cannot pad itself out to max_tokens
_MAX_CACHED_GRAMMARS = 256
_LABELS = {
    "json": "JSON schema",
    "json_object": "JSON object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}
_JSON_OPTIONS = {"whitespace_pattern": r"\x20?|\x0A\x20{0,16}"}


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """The one constraint on a request's output, as vLLM spells it (set exactly one field).

    Args:
        json: a JSON schema (dict or its JSON text); the output is one JSON value it accepts.
        regex: the output matches this regular expression (Rust `regex` syntax) in full.
        choice: the output is exactly one of these strings.
        grammar: a Lark grammar (llguidance's dialect) or a GBNF one (llama.cpp's, with `::=`).
        json_object: the output is any JSON object (OpenAI's `response_format: json_object`).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self):
        if isinstance(self.json, dict):  # kept as text so the params stay hashable
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise RequestError("structured_outputs.choice must be a list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice:
                raise RequestError("structured_outputs.choice must not be empty")
        for name in ("json", "regex", "grammar"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise RequestError(f"structured_outputs.{name} must be a string")
        n_set = sum(
            getattr(self, k) is not None for k in ("json", "regex", "choice", "grammar")
        ) + bool(self.json_object)
        if n_set != 1:
            raise RequestError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                f"json_object (got {n_set})"
            )

    @classmethod
    def from_dict(cls, d: Any) -> StructuredOutputsParams:
        """From user input (server JSON): unknown keys are an error."""
        if not isinstance(d, dict):
            raise RequestError("structured_outputs must be an object")
        unknown = sorted(set(d) - {"json", "regex", "choice", "grammar", "json_object"})
        if unknown:
            raise RequestError(f"unknown structured_outputs field(s): {', '.join(unknown)}")
        return cls(**d)

    @property
    def kind(self) -> str:
        """Which field is set: "json", "regex", "choice", "grammar" or "json_object"."""
        if self.json_object:
            return "json_object"
        return next(
            k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None
        )


def available() -> bool:
    """Whether the grammar engine is installed."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise RequestError(_INSTALL) from None
    return llguidance


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The spec as an llguidance grammar (RequestError for JSON that is not a schema)."""
    llg = _llguidance()
    M = llg.LLMatcher
    if spec.json is not None or spec.json_object:
        schema: Any = {"type": "object"} if spec.json_object else _parse_schema(spec.json)
        try:
            return M.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise RequestError(f"invalid JSON schema: {e}") from None
    if spec.regex is not None:
        return M.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        # JSON string literals are valid Lark ones (same quotes and escapes)
        return M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    try:  # "grammar" takes Lark or GBNF, told apart by llguidance
        return llg.grammar_from("grammar", spec.grammar)
    except ValueError as e:
        raise RequestError(f"invalid grammar: {e}") from None


def _parse_schema(text: str) -> Any:
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise RequestError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise RequestError("a JSON schema must be an object (or true / false)")
    return schema


class Matcher:
    """One sequence's place in its grammar: which tokens may come next, and the tokens taken."""

    def __init__(self, inner):
        self.inner = inner  # llguidance.LLMatcher

    def fork(self) -> Matcher:
        return Matcher(self.inner.deep_copy())

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token (always one the mask allowed; GrammarError if not).

        Checked, not asserted: a refused token leaves llguidance in its error state, where
        is_stopped() is true, so without the check the request would end as a normal "stop"
        with an out-of-grammar token in its text."""
        if not self.inner.consume_token(token_id):
            reason = " ".join(self.inner.get_error().split())[:300]
            raise GrammarError(
                f"the grammar refused token {token_id}, which its mask allowed: {reason}"
            )

    @property
    def done(self) -> bool:
        """The grammar can take no further byte: the output is complete."""
        return self.inner.is_stopped()


class GrammarCompiler:
    """Compiles specs to matchers over one tokenizer's vocabulary and fills batched masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        llg = _llguidance()
        import llguidance.numpy  # noqa: F401 - the mask helpers

        if tokenizer is None:
            raise RequestError("structured output needs a tokenizer (this model has none)")
        self.vocab_size = vocab_size
        self.tokenizer = llg.LLTokenizer(
            _llg_tokenizer(llg, tokenizer), n_vocab=vocab_size, eos_token=sorted(eos_ids)
        )
        self.executor = llg.LLExecutor()
        self._grammars: dict[StructuredOutputsParams, str] = {}

    def matcher(self, spec: StructuredOutputsParams) -> Matcher:
        """A fresh matcher for spec; RequestError naming the reason for a spec it cannot serve."""
        llg = _llguidance()
        grammar = self._grammars.get(spec)
        if grammar is None:
            grammar = grammar_text(spec)
        inner = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if inner.is_error():
            reason = " ".join(inner.get_error().split())[:300]  # one line: it reaches a client
            raise RequestError(f"invalid or unsupported {_LABELS[spec.kind]}: {reason}")
        if len(self._grammars) >= _MAX_CACHED_GRAMMARS:  # a server sees unboundedly many specs
            self._grammars.clear()
        self._grammars[spec] = grammar
        return Matcher(inner)

    def masks(self, matchers: list[Matcher]) -> np.ndarray:
        """(R,) matchers -> (R, V) bool: the tokens each may take next (computed in parallel)."""
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

        bits = allocate_token_bitmask(len(matchers), self.vocab_size)  # (R, ceil(V / 32)) int32
        fill_next_token_bitmask_par(
            self.executor, [(m.inner, i) for i, m in enumerate(matchers)], bits
        )
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")  # (R, 32 W)
        return allowed[:, : self.vocab_size].astype(bool)


def _llg_tokenizer(llg, tokenizer):
    """What llguidance reads a vocabulary from: tokenizer.json text, or each token's bytes."""
    text = tokenizer.tokenizers_json()
    if text is not None:  # a `tokenizers.Tokenizer` (tokenizer.json or a GGUF vocab)
        return text
    return llg.TokenizerWrapper(_SentencePieceVocab(tokenizer))


class _SentencePieceVocab:
    """The TokenizerWrapper interface over a bare sentencepiece model."""

    def __init__(self, tokenizer):
        from .tokenizer_engines import _spm_piece_bytes

        self.eos_token_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [
            _spm_piece_bytes(tokenizer.id_to_token(i)) for i in range(tokenizer.vocab_size)
        ]
        self.special_token_ids = [
            i for i in (self.eos_token_id, self.bos_token_id) if i is not None
        ]
        self._tokenizer = tokenizer

    def __call__(self, s: str) -> list[int]:
        return self._tokenizer.encode(s, add_special_tokens=False)
