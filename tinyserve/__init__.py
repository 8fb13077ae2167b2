"""tinyserve: a small, readable LLM inference runtime.

from tinyserve import LLM, SamplingParams
llm = LLM("smollm2-135m-instruct")
print(llm.generate("The capital of France is", SamplingParams(temperature=0))[0].outputs[0].text)
"""

from .api import LLM
from .backends import list_backends, register_backend
from .errors import TinyServeError
from .outputs import CompletionOutput, RequestOutput
from .sampling import SamplingParams
from .structured import StructuredOutputsParams

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "CompletionOutput",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "TinyServeError",
    "list_backends",
    "register_backend",
]
