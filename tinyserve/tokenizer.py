"""Tokenizers (tokenizer.json, tokenizer.model, GGUF vocab): one `Tokenizer` face over two engines.

  - the `tokenizers` library, for tokenizer.json and for a GGUF vocab rebuilt as a
    `tokenizers.Tokenizer` (gguf_vocab.py);
  - the same for a bare tokenizer.model, read with `sentencepiece` and rebuilt as transformers does.

The engines live in tokenizer_engines.py, chat-template rendering in chat_template.py, the GGUF
vocab's rebuilding in gguf_vocab.py, and streamed decoding in detokenizer.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .chat_template import (
    check_messages,
    compile_chat_template,
    pick_template,
    render_chat_template,
)
from .errors import ConfigError, RequestError, TokenizerError
from .gguf_vocab import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    gguf_bpe,
    gguf_spm,
    spm_bpe,
)
from .tokenizer_engines import HFEngine, SPMEngine


# -- the public face -------------------------------------------------------------------------
class Tokenizer:
    """Text <-> token ids, special tokens and chat template of one model."""

    def __init__(
        self,
        engine: HFEngine,
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
        cfg = _read_json(path / "tokenizer_config.json", TOKENIZER_CONFIG_TYPES)
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
            engine: HFEngine = HFEngine(tok)
        elif (path / "tokenizer.model").is_file():
            tok, specials, prefix, sp_bos, sp_eos = _sentencepiece_bpe(
                path / "tokenizer.model", cfg
            )
            bos_token, eos_token = bos_token or sp_bos, eos_token or sp_eos
            add_bos = True if add_bos is None else bool(add_bos)  # LlamaTokenizer: BOS, not EOS
            _set_bos_eos_processor(
                tok, bos_token if add_bos else None, eos_token if add_eos else None
            )
            engine = SPMEngine(tok, specials, strip_leading_space=prefix != "never")
        else:
            raise TokenizerError(f"no tokenizer.json or tokenizer.model in {path}")

        bos_id = engine.token_to_id(bos_token) if bos_token else None
        eos_ids: list[int] = []
        if eos_token and engine.token_to_id(eos_token) is not None:
            eos_ids.append(engine.token_to_id(eos_token))
        for name in ("generation_config.json", "config.json"):
            special_ids = _read_json(path / name, SPECIAL_ID_TYPES)
            eos_ids += _as_id_list(special_ids.get("eos_token_id"))
            if bos_id is None:
                bos_id = special_ids.get("bos_token_id")
        template = pick_template(cfg.get("chat_template"))
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
        _check_gguf_types(meta)
        tokens = [str(t) for t in tokens]
        n = len(tokens)
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * n)]
        if len(types) != n:
            raise TokenizerError(f"GGUF token_type has {len(types)} entries for {n} tokens")
        # transformers makes the bos / eos / unk / pad tokens special (a user-defined one stays
        # plain: it is added again as such)
        for key in ("bos", "eos", "unknown", "padding"):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if i is not None and 0 <= int(i) < n and types[int(i)] in _PLAIN_TYPES:
                types[int(i)] = TOKEN_CONTROL
        if model == "gpt2":
            tok, add_bos_default = gguf_bpe(meta, tokens, types)
            engine: HFEngine = HFEngine(tok, vocab_size=n)
        elif model == "llama":
            tok, add_bos_default = gguf_spm(meta, tokens, types), True
            specials = [i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
            prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            engine = SPMEngine(tok, specials, strip_leading_space=prefix)
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
        _set_bos_eos_processor(  # the vocab's spelling: a byte-level vocab respells " " as "Ġ"
            tok,
            tok.id_to_token(bos_id) if add_bos and bos_id is not None else None,
            tok.id_to_token(eos_first) if add_eos and eos_first is not None else None,
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
        check_unicode(text)
        return self._engine.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """(T,) token ids -> str; incomplete UTF-8 at the end shows as U+FFFD.

        Special tokens are kept unless skip_special_tokens, as in transformers' decode (generated
        text follows SamplingParams.skip_special_tokens instead).

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

    def tokenizers_json(self) -> str | None:
        """The vocabulary as tokenizer.json text (grammar engines read it)."""
        tok = getattr(self._engine, "tok", None)
        return None if tok is None else tok.to_str()

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
        check_messages(messages)
        if self._compiled_template is None:
            self._compiled_template = compile_chat_template(self.chat_template)
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        variables.update(kwargs)
        return render_chat_template(
            self._compiled_template, messages, add_generation_prompt, variables
        )


def _set_bos_eos_processor(tok: Any, bos: str | None, eos: str | None) -> None:
    """Make encode(add_special_tokens=True) add BOS and/or EOS (and nothing else)."""
    from tokenizers import processors

    for t in (bos, eos):  # a template piece is "text:type_id"; "$A", "$B" are the sequences
        if t and (":" in t or t.startswith("$")):
            raise TokenizerError(f"BOS/EOS token {t!r} cannot be added by a tokenizers template")
    # lists of pieces, not one string split at spaces: a BOS token may hold a space
    single = [*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])]
    pair = [*single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])]
    specials = [(t, tok.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    if any(i is None for _, i in specials):
        raise TokenizerError(f"BOS/EOS token not in vocab: {specials}")
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )


def _sentencepiece_bpe(model: Path, cfg: Mapping[str, Any]) -> tuple:
    """tokenizer.model as transformers' LlamaTokenizer builds it.

    Returns (tokenizers.Tokenizer, special ids, prefix scheme, BOS piece, EOS piece).

    transformers 5 defaults to legacy=False: the dummy "▁" goes on the start of the text only, not
    after each special token (sentencepiece itself, and legacy=True, put one on every run).
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(model))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"cannot read {model}: {_first_line(e)}")

    def piece_type(i: int) -> int:
        if sp.is_unknown(i):
            return TOKEN_UNKNOWN
        if sp.is_control(i):
            return TOKEN_CONTROL
        if sp.is_unused(i):
            return TOKEN_UNUSED
        return TOKEN_BYTE if sp.is_byte(i) else TOKEN_NORMAL

    n = sp.get_piece_size()
    types = [piece_type(i) for i in range(n)]
    prefix = "never"
    if cfg.get("add_prefix_space") is not False:
        prefix = "always" if cfg.get("legacy") else "first"
    tokens = [sp.id_to_piece(i) for i in range(n)]
    tok = spm_bpe(tokens, [sp.get_score(i) for i in range(n)], types, prefix)
    specials = [i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    bos = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
    eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
    return tok, specials, prefix, bos, eos


# -- small helpers ---------------------------------------------------------------------------
_PLAIN_TYPES = (TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_BYTE)


def check_unicode(text: str) -> None:
    """RequestError for text that is not valid Unicode: a lone surrogate (from JSON's "\\ud800",
    or bytes that were not UTF-8 decoded with surrogateescape) has no UTF-8 form, and each engine
    fails on it its own way (sentencepiece's C++ with a RuntimeError, tokenizers with a TypeError)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            f"text is not valid Unicode: lone surrogate {text[e.start]!r} at position {e.start}"
        ) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _all(pred):
    """A predicate over a GGUF array: a list, a NumPy array (long numeric ones) or GGUFStrings."""

    def check(v: Any) -> bool:
        if isinstance(v, np.ndarray):  # one dtype: its first value speaks for all
            return v.ndim == 1 and (v.size == 0 or pred(v[:1].tolist()[0]))
        return isinstance(v, Sequence) and not isinstance(v, str) and all(map(pred, v))

    return check


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


# what each tokenizer.* key of GGUF metadata must hold (a file may say anything)
_GGUF_TOKENIZER_TYPES = {
    "tokenizer.ggml.model": ("text", lambda v: isinstance(v, str)),
    "tokenizer.ggml.pre": ("text", lambda v: isinstance(v, str)),
    "tokenizer.ggml.tokens": ("an array of strings", _all(lambda t: isinstance(t, str))),
    "tokenizer.ggml.merges": ("an array of strings", _all(lambda t: isinstance(t, str))),
    "tokenizer.ggml.token_type": ("an array of integers", _all(_is_int)),
    "tokenizer.ggml.scores": ("an array of numbers", _all(_is_number)),
    **{f"tokenizer.ggml.{k}_token_id": ("a token id", _is_int)
       for k in ("bos", "eos", "eot", "eom", "unknown", "padding")},
    **{f"tokenizer.ggml.{k}": ("a boolean", lambda v: isinstance(v, (bool, np.bool_)))
       for k in ("add_bos_token", "add_eos_token", "add_space_prefix")},
    "tokenizer.chat_template": ("text", lambda v: isinstance(v, str)),
}  # fmt: skip


def _check_gguf_types(meta: Mapping[str, Any]) -> None:
    for key, (what, ok) in _GGUF_TOKENIZER_TYPES.items():
        if key in meta and not ok(meta[key]):
            raise TokenizerError(f"GGUF metadata {key} must be {what}, got {meta[key]!r:.60}")


_TOKEN = ("string", "object", "null")  # a special token: its text, or an AddedToken object
# the JSON types of the fields read from tokenizer_config.json, and of the special ids read
# from generation_config.json / config.json
TOKENIZER_CONFIG_TYPES = {
    "bos_token": _TOKEN, "eos_token": _TOKEN, "add_bos_token": ("bool", "null"),
    "add_eos_token": ("bool", "null"), "chat_template": ("string", "array", "null"),
    "legacy": ("bool", "null"), "add_prefix_space": ("bool", "null"),
}  # fmt: skip
SPECIAL_ID_TYPES = {"bos_token_id": ("int", "null"), "eos_token_id": ("int", "int array", "null")}


def _read_json(path: Path, types: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """A JSON object from path, {} when the file is absent; the fields in types type-checked."""
    from .loading.json_file import check_field_types, read_json_object

    data = read_json_object(path, missing_ok=True) if not path.is_dir() else {}
    check_field_types(data, types, str(path))
    for key in ("bos_token", "eos_token"):
        if isinstance(data.get(key), dict) and not isinstance(data[key].get("content"), str):
            raise ConfigError(f"{path}: field {key!r} is an object without a string 'content'")
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


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
