"""`tinyserve serve`: parse the flags, load the model, run uvicorn on the app."""

from __future__ import annotations

import argparse
import sys

from ..cli import add_model_args, model_options
from ..settings import settings
from .app import _MISSING_EXTRA, create_app
from .protocol import ServerConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinyserve serve", description="OpenAI-compatible HTTP server."
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=settings().api_key,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $TINYSERVE_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send (default: the model's name)",
    )
    defaults = ServerConfig()
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the context - 1")
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=defaults.max_tokens_limit,
        help="largest max_tokens a request may ask for",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=defaults.max_queue,
        help="requests in flight at most; more get 503",
    )
    p.add_argument(
        "--max-pending-chunks",
        type=int,
        default=defaults.max_pending_chunks,
        help="a request's outputs waiting for a slow client at most (more are folded into one)",
    )
    p.add_argument(
        "--slow-reader-timeout",
        type=float,
        default=defaults.slow_reader_timeout,
        help="seconds a client may leave its stream unread before its request is aborted",
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step")
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--log-level", default="info")
    ray = p.add_argument_group("replicas on Ray Serve (pip install 'tinyserve[ray]')")
    ray.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="engine processes behind one ingress, routed by prompt prefix (default 1: no Ray)",
    )
    ray.add_argument(
        "--ray-address",
        default=None,
        help="an existing Ray cluster (e.g. ray://head:10001); default: start one here",
    )
    ray.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    ray.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    return p


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The limits and identity the flags ask for; ValueError for a bad one."""
    from pathlib import Path

    from .. import catalog

    return ServerConfig(
        model_name=args.served_model_name or Path(args.model or catalog.DEFAULT_MODEL).stem,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_queue=args.max_queue,
        max_pending_chunks=args.max_pending_chunks,
        slow_reader_timeout=args.slow_reader_timeout,
    )


def llm_options(args: argparse.Namespace) -> dict:
    """LLM's keyword arguments from the flags (each replica builds its own LLM from them)."""
    return {
        **model_options(args),
        "max_num_seqs": args.max_num_seqs,
        "kv_cache_tokens": args.kv_cache_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    """`tinyserve serve ...`: load the model, then serve until Ctrl-C. Returns the exit code."""
    args = build_parser().parse_args(argv)
    if _MISSING_EXTRA is not None:
        print(f"tinyserve: error: {_MISSING_EXTRA}", file=sys.stderr)
        return 1
    try:
        import uvicorn
    except ImportError:
        print(
            "tinyserve: error: uvicorn is not installed: pip install 'tinyserve[serve]'",
            file=sys.stderr,
        )
        return 1
    from ..api import LLM

    try:
        config = server_config(args)
        if args.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {args.replicas}")
    except ValueError as e:
        print(f"tinyserve: error: {e}", file=sys.stderr)
        return 2
    if args.replicas > 1 or args.ray_address is not None:
        try:
            from .ray import serve_replicas
        except ImportError as e:
            print(
                f"tinyserve: error: {e.name} is not installed: pip install 'tinyserve[ray]'",
                file=sys.stderr,
            )
            return 1
        return serve_replicas(args)
    llm = LLM(**llm_options(args))
    print(
        f"tinyserve: serving '{config.model_name}' on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    uvicorn.run(create_app(llm, config), host=args.host, port=args.port, log_level=args.log_level)
    return 0
