"""`tinyserve serve`: an OpenAI-compatible HTTP server on the batching engine.

One thread owns the Engine and runs its step loop; HTTP handlers (asyncio, starlette + uvicorn)
hand it commands through a lock-guarded queue and get RequestOutputs back through per-request
asyncio queues. Requests from many connections therefore join the same engine step (continuous
batching), and only the loop thread ever touches the engine or its KV cache (handlers use the
tokenizer's stateless encode / decode only: the tokenizer endpoints, logprob token strings).

Endpoints: POST /v1/completions, POST /v1/chat/completions (stream false / true, SSE chunks in
OpenAI's format ending with `data: [DONE]`), POST /v1/responses (the Responses API, streamed as
typed events), POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's), GET /v1/models,
GET /health, GET /metrics (Prometheus text). Errors are OpenAI-style JSON:
{"error": {"message", "type", "param", "code"}}.

Modules: protocol (limits, request validation, OpenAI JSON, HTTPError), responses (the Responses
API's requests, objects and events), engine_loop (the engine thread and its queue handoff),
metrics (Prometheus text), app (the ASGI app), cli (the command).
"""

from .app import create_app
from .cli import build_parser, main
from .protocol import ServerConfig

__all__ = ["ServerConfig", "build_parser", "create_app", "main"]
