"""The `tinyserve` command: generate, chat, pull, info, backends, bench, serve.

Generated text goes to stdout, streamed; stats, progress and errors go to stderr. A user error is
one line on stderr and a non-zero exit, never a traceback. Heavy imports happen inside the
subcommands so `tinyserve --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
import warnings

DEFAULT_BACKEND = "cpu"
_FLOAT_WARNINGS = r"(overflow|invalid value|divide by zero) encountered"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="catalog name, HF directory or .gguf file "
        "(default: the catalog's default model, pulled on first use)",
    )
    p.add_argument(
        "--backend", "-b", default=DEFAULT_BACKEND, help="backend name (see `tinyserve backends`)"
    )
    p.add_argument("--device", default=None, help="device for the backend, e.g. cuda:0")
    p.add_argument("--dtype", default=None, help="compute dtype for the backend, e.g. bfloat16")
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="ranks the model is split over (torch backend; gloo on the CPU, NCCL on CUDA)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="never capture CUDA graphs for decode (torch backend; they are off by default)",
    )
    p.add_argument(
        "--speculative-config",
        type=json_object,
        default=None,
        metavar="JSON",
        help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\'',
    )


def json_object(text: str) -> dict:
    """An argparse type: a JSON object (argparse turns the ValueError into one line, exit 2)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, not {type(value).__name__}")
    return value


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    # structured output (StructuredOutputsParams); give at most one
    p.add_argument("--json-schema", default=None, help="a JSON schema, or a .json file holding one")
    p.add_argument("--json-object", action="store_true", help="the output is any JSON object")
    p.add_argument("--regex", default=None, help="the output matches this regex in full")
    p.add_argument("--choice", action="append", default=None, help="an allowed output (repeatable)")
    p.add_argument("--grammar", default=None, help="a Lark or GBNF grammar, or a file holding one")


def _sampling_params(args):
    from .errors import RequestError
    from .sampling import SamplingParams

    if args.max_tokens < 1:  # 0 (score the prompt only) means nothing to print here
        raise RequestError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or (),
        structured_outputs=_structured_outputs(args),
    )


def _structured_outputs(args):
    from .structured import StructuredOutputsParams

    fields = {
        "json": _text_or_file(args.json_schema),
        "json_object": args.json_object,
        "regex": args.regex,
        "choice": args.choice,
        "grammar": _text_or_file(args.grammar),
    }
    given = {k: v for k, v in fields.items() if v not in (None, False)}
    return StructuredOutputsParams(**given) if given else None


def _text_or_file(value: str | None) -> str | None:
    """A flag's value, or the text of the file it names."""
    from pathlib import Path

    from .errors import RequestError

    if value is None or not value.endswith((".json", ".lark", ".gbnf")):
        return value
    try:
        return Path(value).read_text()
    except OSError as e:
        raise RequestError(f"cannot read {value}: {e.strerror}") from None


def model_options(args) -> dict:
    """LLM's keyword arguments from the flags add_model_args defines."""
    return {
        "model": args.model,
        "backend": args.backend,
        "device": args.device,
        "dtype": args.dtype,
        "tensor_parallel_size": args.tensor_parallel_size,
        "speculative_config": args.speculative_config,
        "enforce_eager": args.enforce_eager,
    }


def _load(args):
    from .api import LLM

    return LLM(**model_options(args))


def _stream(llm, prompt, params, stats: bool) -> str:
    """Print the completion as it comes; returns its text. Stats go to stderr."""
    import time

    t0 = time.perf_counter()
    t_first, n, text, finish = None, 0, [], None
    for delta in llm.stream(prompt, params):
        if delta.token_ids and t_first is None:
            t_first = time.perf_counter()
        n += len(delta.token_ids)
        text.append(delta.text)
        finish = delta.finish_reason or finish
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    t_end = time.perf_counter()
    sys.stdout.write("\n")
    if finish == "error":
        from .errors import WeightsError

        raise WeightsError(
            f"generation stopped after {n} tokens: the model's logits are NaN or infinite "
            "(finish_reason 'error'); its weights may be corrupt"
        )
    if stats and t_first is not None:
        n_prompt = len(prompt) if isinstance(prompt, list) else len(llm.tokenizer.encode(prompt))
        ttft = t_first - t0
        tpot = (t_end - t_first) / (n - 1) if n > 1 else float("nan")
        print(
            f"[stats] backend={llm.backend.name} "
            f"({llm.backend.lowering(llm.engine.model) or 'model file op by op'}) "
            f"prompt={n_prompt} tok  output={n} tok  "
            f"TTFT={ttft * 1e3:.1f} ms  TPOT={tpot * 1e3:.2f} ms  "
            f"decode={1 / tpot if n > 1 else float('nan'):.1f} tok/s  "
            f"prefill={n_prompt / ttft:.1f} tok/s  e2e={n / (t_end - t0):.1f} tok/s",
            file=sys.stderr,
        )
    return "".join(text)


def _utf8_text(text: str | bytes, what: str) -> str | None:
    """argv (a str, undecodable bytes kept as surrogates) or stdin bytes -> the text, or None
    after one line on stderr if it is not valid UTF-8."""
    try:
        return text.decode("utf-8") if isinstance(text, bytes) else text.encode("utf-8").decode()
    except UnicodeError as e:
        bad = e.object[e.start]
        byte = bad if isinstance(bad, int) else ord(bad) - 0xDC00  # surrogateescape's mapping
        shown = f"byte 0x{byte:02x}" if 0 <= byte < 256 else repr(bad)
        print(
            f"tinyserve: error: {what} is not valid UTF-8 ({shown} at {e.start})", file=sys.stderr
        )
        return None


def cmd_generate(args) -> int:
    if args.prompt is not None:
        prompt = _utf8_text(args.prompt, "the prompt")
    else:
        stdin = getattr(sys.stdin, "buffer", sys.stdin)  # bytes where there are any
        prompt = _utf8_text(stdin.read(), "the prompt on stdin")
    system = args.system and _utf8_text(args.system, "--system")
    if prompt is None or system is None and args.system:
        return 2  # a usage error, as argparse's own
    params = _sampling_params(args)  # validate before the (slow) load
    llm = _load(args)
    if args.chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt = llm.chat_prompt(messages)
    _stream(llm, prompt, params, args.stats)
    return 0


def cmd_chat(args) -> int:
    params = _sampling_params(args)
    llm = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("tinyserve chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = _stream(llm, llm.chat_prompt(messages), params, args.stats)
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_pull(args) -> int:
    from . import catalog

    path = catalog.pull(args.name or catalog.DEFAULT_MODEL)
    print(path)
    return 0


def cmd_info(args) -> int:
    from . import catalog
    from .errors import TinyServeError
    from .loading import load_checkpoint

    ckpt = load_checkpoint(catalog.resolve(args.model))
    cfg = ckpt.config
    kinds: dict[str, int] = {}
    n_params = 0
    for t in ckpt.tensors.values():
        kind = getattr(t, "qtype", None)
        kind = (
            kind.name
            if kind is not None
            else (getattr(getattr(t, "dtype", None), "name", None) or "bf16")
        )
        kinds[kind] = kinds.get(kind, 0) + 1
        size = 1
        for s in t.shape:
            size *= int(s)
        n_params += size
    lines = [
        ("path", str(ckpt.path)),
        ("format", ckpt.format),
        ("architecture", f"{cfg.model_type} (family {cfg.family})"),
        ("parameters", f"{n_params / 1e6:.1f} M"),
        ("layers / hidden / ffn", f"{cfg.n_layers} / {cfg.hidden_size} / {cfg.intermediate_size}"),
        ("heads / kv heads / head dim", f"{cfg.n_heads} / {cfg.n_kv_heads} / {cfg.head_dim}"),
        ("vocab", str(cfg.vocab_size)),
        ("context", str(cfg.context_len)),
        ("rope", f"theta={cfg.rope_theta:g} scaling={cfg.rope_scaling}"),
        ("sliding window", str(cfg.sliding_window)),
        ("tied embeddings", str(cfg.tie_word_embeddings)),
        ("tensor types", ", ".join(f"{k}x{v}" for k, v in sorted(kinds.items()))),
    ]
    try:
        from .api import _load_tokenizer

        tok = _load_tokenizer(ckpt)
        if tok is not None:
            lines.append(
                (
                    "tokenizer",
                    (
                        f"{tok.vocab_size} tokens, eos={list(tok.eos_token_ids)}, "
                        f"chat template={'yes' if tok.has_chat_template else 'no'}"
                    ),
                )
            )
    except TinyServeError as e:  # info should still print what it could read
        lines.append(("tokenizer", f"unreadable ({e})"))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_backends(args) -> int:
    from .backends import list_backends

    for info in list_backends():
        state = "available" if info.available else "unavailable"
        print(f"{info.name:<10} {state:<12} {info.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyserve", description="A small, readable LLM inference runtime."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt (streamed to stdout)")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read stdin)")
    add_model_args(p)
    _add_sampling_args(p)
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--stats", action="store_true", help="print TTFT, TPOT and tokens/s to stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, streamed")
    add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None)
    p.add_argument("--stats", action="store_true")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("pull", help="fetch a catalog model (progress bar, sha256 check)")
    p.add_argument("name", nargs="?", default=None)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("info", help="architecture, parameters, quant types, context, tokenizer")
    p.add_argument("model")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("backends", help="registered backends and their availability")
    p.set_defaults(func=cmd_backends)

    for name, module, text in [
        ("bench", "tinyserve.bench", "measure TTFT, TPOT and tokens/s"),
        ("serve", "tinyserve.serving", "OpenAI-compatible HTTP server"),
    ]:
        p = sub.add_parser(name, help=text, add_help=False)
        p.set_defaults(func=_delegate(module), module=module)
    return parser


def _delegate(module: str):
    """Subcommands that own their arguments: `module.main(argv)`, imported only when used."""

    def run(args, rest):
        import importlib

        return importlib.import_module(module).main(rest)

    run.delegate = True
    return run


def main(argv: list[str] | None = None) -> int:
    from .errors import TinyServeError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parser.parse_known_args(argv)
    try:
        if getattr(args.func, "delegate", False):
            return int(args.func(args, rest) or 0)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        with warnings.catch_warnings():
            # a model whose numbers overflow ends its request with finish_reason "error", said
            # in one line: NumPy's floating-point warnings on the way there would be more lines
            warnings.filterwarnings("ignore", _FLOAT_WARNINGS, RuntimeWarning)
            return int(args.func(args) or 0)
    except TinyServeError as e:
        print(f"tinyserve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
