"""Tokenizers (tokenizer.json, tokenizer.model, GGUF vocab), incremental detokenizer, chat templates.

One `Tokenizer` face over two engines:
  - the `tokenizers` library, for tokenizer.json and for a GGUF vocab rebuilt as a
    `tokenizers.Tokenizer` (byte-level BPE with llama.cpp's pre-tokenizer regexes, or an
    SPM-equivalent BPE with byte fallback, as HF's LlamaConverter builds it);
  - `sentencepiece`, for a bare tokenizer.model.

References: llama.cpp src/llama-vocab.cpp (pre-tokenizer regexes, SPM space prefix),
transformers convert_slow_tokenizer.py (LlamaConverter), vLLM detokenizer_utils.py
(prefix_offset / read_offset), transformers chat template rendering (sandboxed jinja2).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import RequestError, TokenizerError

SPIECE_UNDERLINE = "\u2581"  # "▁": sentencepiece's visible space

# GGUF tokenizer.ggml.token_type values (llama.cpp llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(
    1, 7
)

# -- llama.cpp pre-tokenizers ----------------------------------------------------------------
# llama.cpp applies its regexes one after another, each splitting the pieces the previous one
# produced (matches and the gaps between them both stay pieces): a tokenizers Split with
# behavior="isolated" per regex reproduces that. Strings copied from llama-vocab.cpp; where
# llama.cpp notes an "original regex from tokenizer.json" we use that original (onig handles
# the (?i:...) group llama.cpp had to expand).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "llama-bpe": (_LLAMA3,),
    "smollm": (r"\p{N}", _GPT2),
    "qwen2": (_QWEN2,),
}
_PRE_ALIASES = {
    "": "default",
    "gpt2": "gpt-2",
    "phi-2": "gpt-2",
    "mpt": "gpt-2",
    "olmo": "gpt-2",
    "jais": "gpt-2",
    "llama3": "llama-bpe",
    "llama-v3": "llama-bpe",
    "falcon3": "llama-bpe",
    "dbrx": "llama-bpe",
    "smaug-bpe": "llama-bpe",
    "starcoder": "smollm",
    "refact": "smollm",
    "command-r": "smollm",
    "codeshell": "smollm",
    "exaone": "smollm",
    "minerva-7b": "smollm",
    "stablelm2": "qwen2",
    "qwen35": "qwen2",
}
_IGNORE_MERGES = {"llama-bpe"}  # llama.cpp: a word already in the vocab is one token
_ADD_BOS_DEFAULT = {"llama-bpe"}


# -- the two engines -------------------------------------------------------------------------
class _HFEngine:
    """A `tokenizers.Tokenizer` (from tokenizer.json or rebuilt from GGUF metadata)."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self.tok.token_to_id(s)


class _SPMEngine(_HFEngine):
    """An SPM vocab in a tokenizers BPE, decoded here piece by piece as llama.cpp does.

    tokenizers' ByteFallback decoder turns a whole run of byte pieces into U+FFFD when any of
    them is invalid, so decoding is not local; joining piece bytes and decoding with
    errors="replace" is, which the incremental detokenizer relies on.
    """

    def __init__(self, tok: Any, special_ids: Iterable[int], strip_leading_space: bool):
        super().__init__(tok)
        self.special_ids = frozenset(special_ids)
        self.strip_leading_space = strip_leading_space
        self.piece_bytes = [_spm_piece_bytes(tok.id_to_token(i)) for i in range(self.vocab_size)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        skip = self.special_ids if skip_special_tokens else frozenset()
        text = b"".join(self.piece_bytes[i] for i in ids if i not in skip).decode(
            "utf-8", "replace"
        )
        return text[1:] if self.strip_leading_space and text.startswith(" ") else text


def _spm_piece_bytes(piece: str | None) -> bytes:
    """'<0x0A>' -> b'\\n'; '▁the' -> b' the'."""
    if piece is None:
        return b""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace(SPIECE_UNDERLINE, " ").encode("utf-8")


class _SPEngine:
    """A sentencepiece model; control-token strings in text become their ids, as in HF's slow tokenizer."""

    def __init__(self, sp: Any, add_bos: bool, add_eos: bool):
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.add_bos, self.add_eos = add_bos, add_eos
        specials = [
            sp.id_to_piece(i)
            for i in range(self.vocab_size)
            if sp.is_control(i) or sp.is_unknown(i)
        ]
        specials = sorted({s for s in specials if s}, key=len, reverse=True)
        self.special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        if add_special_tokens and self.add_bos and self.sp.bos_id() >= 0:
            ids.append(self.sp.bos_id())
        pos = 0
        for m in self.special_re.finditer(text) if self.special_re else ():
            if m.start() > pos:
                ids += self.sp.encode(text[pos : m.start()])
            ids.append(self.sp.piece_to_id(m.group()))
            pos = m.end()
        if pos < len(text):
            ids += self.sp.encode(text[pos:])
        if add_special_tokens and self.add_eos and self.sp.eos_id() >= 0:
            ids.append(self.sp.eos_id())
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        ids = list(ids)
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if not self._is_special(i)])
        # Render control/unknown tokens as their text; the run after one keeps its leading space.
        out, run, start = [], [], 0
        for k, i in enumerate(ids + [None]):
            if i is None or self._is_special(i):
                if run:
                    text = self.sp.decode(run)
                    if start > 0 and self.sp.id_to_piece(run[0]).startswith(SPIECE_UNDERLINE):
                        text = " " + text
                    out.append(text)
                if i is not None:
                    out.append(self.sp.id_to_piece(i))
                run, start = [], k + 1
            else:
                run.append(i)
        return "".join(out)

    def _is_special(self, i: int) -> bool:
        return self.sp.is_control(i) or self.sp.is_unknown(i)

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None

    def token_to_id(self, s: str) -> int | None:
        i = self.sp.piece_to_id(s)
        return None if i == self.sp.unk_id() and s != self.sp.id_to_piece(i) else i


# -- the public face -------------------------------------------------------------------------
class Tokenizer:
    """Text <-> token ids, special tokens and chat template of one model."""

    def __init__(
        self,
        engine: _HFEngine | _SPEngine,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        self._engine = engine
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self.chat_template = chat_template
        self.bos_token = bos_token if bos_token is not None else self._token_or_none(bos_token_id)
        first_eos = self.eos_token_ids[0] if self.eos_token_ids else None
        self.eos_token = eos_token if eos_token is not None else self._token_or_none(first_eos)
        self._compiled_template: Any = None

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (or tokenizer.model) plus tokenizer_config.json of an HF model dir."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"tokenizer directory not found: {path}")
        cfg = _read_json(path / "tokenizer_config.json")
        bos_token = _token_content(cfg.get("bos_token"))
        eos_token = _token_content(cfg.get("eos_token"))
        add_bos, add_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
                raise TokenizerError(f"cannot read {path / 'tokenizer.json'}: {_first_line(e)}")
            if add_bos is not None or add_eos is not None:
                # HF's Llama/Gemma fast tokenizers rebuild the post-processor from these flags.
                _set_bos_eos_processor(
                    tok, bos_token if add_bos else None, eos_token if add_eos else None
                )
            engine: _HFEngine | _SPEngine = _HFEngine(tok)
        elif (path / "tokenizer.model").is_file():
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor()
            try:
                sp.load(str(path / "tokenizer.model"))
            except (OSError, RuntimeError) as e:
                raise TokenizerError(f"cannot read {path / 'tokenizer.model'}: {_first_line(e)}")
            # HF's LlamaTokenizer defaults: add BOS, not EOS.
            engine = _SPEngine(
                sp, add_bos=True if add_bos is None else bool(add_bos), add_eos=bool(add_eos)
            )
            bos_token = bos_token or (sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None)
            eos_token = eos_token or (sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None)
        else:
            raise TokenizerError(f"no tokenizer.json or tokenizer.model in {path}")

        bos_id = engine.token_to_id(bos_token) if bos_token else None
        eos_ids: list[int] = []
        if eos_token and engine.token_to_id(eos_token) is not None:
            eos_ids.append(engine.token_to_id(eos_token))
        for name in ("generation_config.json", "config.json"):
            eos_ids += _as_id_list(_read_json(path / name).get("eos_token_id"))
            if bos_id is None:
                bos_id = _read_json(path / name).get("bos_token_id")
        template = _pick_template(cfg.get("chat_template"))
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(
            engine,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            chat_template=template,
            bos_token=bos_token,
            eos_token=eos_token,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Rebuild the vocab stored in GGUF metadata (tokenizer.ggml.*) as a tokenizers.Tokenizer."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise TokenizerError(
                "GGUF metadata has no tokenizer (tokenizer.ggml.model / .tokens missing)"
            )
        tokens = [str(t) for t in tokens]
        n = len(tokens)
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * n)]
        if len(types) != n:
            raise TokenizerError(f"GGUF token_type has {len(types)} entries for {n} tokens")
        if model == "gpt2":
            tok, add_bos_default = _gguf_bpe(meta, tokens, types)
            engine: _HFEngine = _HFEngine(tok)
        elif model == "llama":
            tok, add_bos_default = _gguf_spm(meta, tokens, types), True
            specials = [i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
            prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            engine = _SPMEngine(tok, specials, strip_leading_space=prefix)
        else:
            raise TokenizerError(
                f"unsupported GGUF tokenizer model {model!r}; supported: gpt2, llama"
            )

        def opt_id(key: str) -> int | None:
            v = meta.get(key)
            return int(v) if v is not None and 0 <= int(v) < n else None

        bos_id = opt_id("tokenizer.ggml.bos_token_id")
        eos_ids = [
            i
            for k in ("eos", "eot", "eom")
            if (i := opt_id(f"tokenizer.ggml.{k}_token_id")) is not None
        ]
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        eos_first = eos_ids[0] if eos_ids else None
        _set_bos_eos_processor(
            tok,
            tokens[bos_id] if add_bos and bos_id is not None else None,
            tokens[eos_first] if add_eos and eos_first is not None else None,
        )
        template = meta.get("tokenizer.chat_template")
        return cls(
            engine,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            chat_template=str(template) if template is not None else None,
        )

    # -- text <-> ids ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._engine.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """str -> (T,) token ids; BOS/EOS added only where the model asks for them."""
        if not isinstance(text, str):
            raise RequestError(f"encode expects a str, got {type(text).__name__}")
        return self._engine.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """(T,) token ids -> str; incomplete UTF-8 at the end shows as U+FFFD.

        Ids past the tokenizer's vocab (models pad their embedding beyond it) have no text."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._engine.decode(ids, skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        """Token id -> its vocab string (byte-level or '▁' form, as stored)."""
        s = self._engine.id_to_token(int(i)) if 0 <= int(i) < self.vocab_size else None
        if s is None:
            raise TokenizerError(f"token id {i} out of range for a vocab of {self.vocab_size}")
        return s

    def token_to_id(self, s: str) -> int:
        """Vocab string -> token id."""
        i = self._engine.token_to_id(s)
        if i is None:
            raise TokenizerError(f"token {s!r} is not in the vocab")
        return i

    def _token_or_none(self, i: int | None) -> str | None:
        return self._engine.id_to_token(i) if i is not None else None

    # -- chat templates ----------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render messages with the model's jinja2 chat template in a sandbox (as HF does)."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        if not isinstance(messages, Sequence) or not all(
            isinstance(m, Mapping) and "role" in m for m in messages
        ):
            raise RequestError("messages must be a list of {'role': ..., 'content': ...} dicts")
        import jinja2

        if self._compiled_template is None:
            try:
                self._compiled_template = _jinja_env().from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise TokenizerError(f"chat template does not compile: {_first_line(e)}") from e
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        variables.update(kwargs)
        try:
            return self._compiled_template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except Exception as e:  # raise_exception, SecurityError, or a template's own bug
            raise TokenizerError(f"chat template error: {_first_line(e)}") from e


# -- incremental detokenizer -----------------------------------------------------------------
class IncrementalDetokenizer:
    """Streams the text of generated ids: the deltas concatenate to tokenizer.decode(output ids).

    Each step decodes only a short window ids[prefix_offset:] and emits what it adds beyond the
    already-emitted ids[prefix_offset:read_offset] (vLLM's scheme). Decoding with left context
    keeps SPM's leading-space stripping, which applies only at the start of a decode, from eating
    the space of a token in mid-stream. Text ending in U+FFFD (half a UTF-8 character) is held
    back until the next ids complete it; `finish()` flushes what is left at the end.
    `prompt_ids` is kept for the engine (`all_ids`); the deltas depend on output ids only.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens=True
    ):
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.skip_special_tokens = skip_special_tokens
        self.output_ids: list[int] = []
        self.text = ""  # all text emitted so far
        self._prefix_offset = 0  # window start: context already emitted
        self._read_offset = 0  # ids before this are emitted
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append generated ids; return the newly stable text (may be "")."""
        self.output_ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        new_text = self._decode(self.output_ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing new, or a UTF-8 character still incomplete
        return self._emit(new_text)

    def finish(self) -> str:
        """Flush held-back text (e.g. a trailing incomplete character, shown as U+FFFD)."""
        new_text = self._decode(self.output_ids[self._prefix_offset :])
        return self._emit(new_text) if len(new_text) > len(self._prefix_text) else ""

    def _emit(self, new_text: str) -> str:
        delta = new_text[len(self._prefix_text) :]
        self.text += delta
        # The next window starts at the old read offset. Its text is decoded on its own: an SPM
        # decode strips the window's leading space, which then belongs to text already emitted.
        self._prefix_offset = self._read_offset
        self._prefix_text = self._decode(self.output_ids[self._prefix_offset :])
        self._read_offset = len(self.output_ids)
        return delta


# -- GGUF vocab -> tokenizers.Tokenizer ------------------------------------------------------
def _gguf_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> tuple[Any, bool]:
    """Byte-level BPE with the pre-tokenizer llama.cpp uses for tokenizer.ggml.pre."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pre = str(meta.get("tokenizer.ggml.pre", "") or "")
    pre = _PRE_ALIASES.get(pre, pre)
    if pre not in _PRE_REGEXES:
        known = sorted(set(_PRE_REGEXES) | set(_PRE_ALIASES) - {""})
        raise TokenizerError(
            f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(known)}"
        )
    raw_merges = meta.get("tokenizer.ggml.merges")
    if raw_merges is None:
        raise TokenizerError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    merges = []
    for m in raw_merges:
        left, sep, right = str(m).partition(" ")
        if not sep:
            raise TokenizerError(f"malformed GGUF merge {m!r} (expected 'left right')")
        merges.append((left, right))
    vocab = _vocab_dict(tokens)
    tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_REGEXES[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    _add_gguf_special_tokens(tok, tokens, types)
    return tok, pre in _ADD_BOS_DEFAULT


def _gguf_spm(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> Any:
    """SPM vocab as a BPE with byte fallback whose merges follow the piece scores (LlamaConverter)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    n = len(tokens)
    scores = [float(s) for s in meta.get("tokenizer.ggml.scores", [0.0] * n)]
    if len(scores) != n:
        raise TokenizerError(f"GGUF scores has {len(scores)} entries for {n} tokens")
    vocab = _vocab_dict(tokens)
    normal = {t: i for i, t in enumerate(tokens) if types[i] == TOKEN_NORMAL and vocab[t] == i}
    # sentencepiece BPE merges the adjacent pair whose union scores highest; a merge list sorted
    # by the union's score gives the same order (ties: lower ids first, as in HF's extractor).
    merges = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((-scores[i], normal[left], normal[right], left, right))
    merges.sort()
    unk_id = next((i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
    bpe = models.BPE(
        vocab,
        [(m[3], m[4]) for m in merges],
        unk_token=tokens[unk_id] if unk_id is not None else None,
        byte_fallback=True,
        fuse_unk=True,
    )
    tok = HFTokenizer(bpe)
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm = [normalizers.Replace(" ", SPIECE_UNDERLINE)]
    steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        # llama.cpp prefixes a space to the text and after every special token, as the
        # per-segment Prepend normalizer does.
        norm.insert(0, normalizers.Prepend(SPIECE_UNDERLINE))
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence(steps)
    _add_gguf_special_tokens(tok, tokens, types)
    return tok


def _add_gguf_special_tokens(tok: Any, tokens: list[str], types: list[int]) -> None:
    """Control/unknown tokens become special added tokens (skipped on decode); user-defined ones plain added tokens."""
    from tokenizers import AddedToken

    special = [i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    """token -> id; a duplicated string keeps its first id (as llama.cpp's text_to_token does)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _set_bos_eos_processor(tok: Any, bos: str | None, eos: str | None) -> None:
    """Make encode(add_special_tokens=True) add BOS and/or EOS (and nothing else)."""
    from tokenizers import processors

    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join(
        [single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])]
    )
    specials = [(t, tok.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    if any(i is None for _, i in specials):
        raise TokenizerError(f"BOS/EOS token not in vocab: {specials}")
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )


# -- chat template environment ---------------------------------------------------------------
def _jinja_env() -> Any:
    """HF's chat-template environment: immutable sandbox, trim/lstrip blocks, its helpers."""
    import jinja2.ext
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class StrictSandbox(ImmutableSandboxedEnvironment):
        """Touching an unsafe attribute raises at once instead of yielding an Undefined."""

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
            )

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


# -- small helpers ---------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from path, {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {_first_line(e)}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} is not a JSON object")
    return data


def _token_content(tok: Any) -> str | None:
    """A special token given as a string or as an AddedToken dict -> its text."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _as_id_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, list) else [int(v)]


def _pick_template(t: Any) -> str | None:
    """tokenizer_config chat_template: a string, or a list of {name, template} (take "default")."""
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        if "default" in named:
            return named["default"]
        raise TokenizerError(
            f"chat_template list has no 'default' entry (has {sorted(map(str, named))})"
        )
    raise TokenizerError(f"chat_template must be a string or a list, got {type(t).__name__}")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
