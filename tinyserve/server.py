"""`tinyserve serve`: the OpenAI-compatible server; the code lives in tinyserve.serving."""

from .serving import ServerConfig, build_parser, create_app, main

__all__ = ["ServerConfig", "build_parser", "create_app", "main"]
