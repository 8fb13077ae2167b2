"""The exceptions tinyserve raises. Every user error is a TinyServeError with a one-line message."""


class TinyServeError(Exception):
    """Base class: the CLI prints these as one line on stderr and exits non-zero."""


class ConfigError(TinyServeError, ValueError):
    """A model config (config.json or GGUF metadata) is missing fields or inconsistent."""


class UnsupportedArchitecture(ConfigError):
    """The model's architecture has no implementation here."""


class WeightsError(TinyServeError):
    """Weights are missing, truncated, corrupt, or disagree with the config."""


class UnsafeCheckpoint(WeightsError):
    """A pickle-based checkpoint (.bin/.pt/.pth): refused, never unpickled."""


class ModelNotFound(TinyServeError, FileNotFoundError):
    """No such path or catalog name."""


class TokenizerError(TinyServeError):
    """The tokenizer files are missing or unreadable."""


class RequestError(TinyServeError, ValueError):
    """A request that cannot be served: prompt too long, invalid sampling parameters, ...

    `param` names the request field at fault when one is (the server's error names it too)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class GrammarError(TinyServeError):
    """The structured-output engine refused a token its own mask allowed: a fault inside the
    grammar engine or tinyserve, never the request's. The step fails instead of the token
    reaching the output (a plain assert would vanish under `python -O`)."""


class BackendError(TinyServeError):
    """Unknown backend name, a name registered twice, or a backend unavailable here."""


class OutOfBlocks(TinyServeError):
    """The KV cache has no free block (the scheduler preempts; users never see this)."""
