"""The backend conformance kit: any backend, checked against the NumPy reference (needs pytest).

A backend author runs it with pytest from a test module of their own:

    from tinyserve.testing import conformance_tests
    TestMyBackend = conformance_tests("mybackend", device="cuda", dtype="bfloat16")

or subclasses `BackendConformance`, or calls the `check_*` functions directly. What it checks:
op parity against NumpyOps on random inputs (tolerances by dtype); logits parity on tiny random
checkpoints of every supported architecture variant - the Llama family, Gemma 3, Mixtral, Phi-3,
DeepSeek-V3 (built in-process, so nothing to download; the numpy backend is itself checked against
transformers by tests/test_hf_parity.py and tests/test_models_extra.py); greedy decoding picking
the reference's argmax; a batch of sequences == each sequence alone; a fragmented block pool == a
contiguous one; chunked prefill + cached decode == one full forward; a backend's fast form of a
model (its lowering) == the same backend running the model file op by op. Every family comes in
float32, Q8_0 and Q4_K (`<family>_q8_0`, `<family>_q4_k`).

Layout: tolerances.py (by dtype), checkpoints.py (the tiny random checkpoints), quantize.py (Q4_K
blocks), checks.py (the check_* functions), routing.py (pinning a router's choices),
conformance.py (the pytest face); accuracy.py (an engine's next-token distributions against the
reference's on real text: KL, top-1, perplexity; tests/test_int8_accuracy.py uses it).
"""

from .checkpoints import ARCHITECTURES, tiny_checkpoint
from .checks import (
    check_batched_equals_alone,
    check_greedy,
    check_logits,
    check_lowering_equals_op_by_op,
    check_ops,
    check_paged_equals_contiguous,
)
from .conformance import BackendConformance, conformance_tests, run_conformance

__all__ = [
    "ARCHITECTURES",
    "BackendConformance",
    "check_batched_equals_alone",
    "check_greedy",
    "check_logits",
    "check_lowering_equals_op_by_op",
    "check_ops",
    "check_paged_equals_contiguous",
    "conformance_tests",
    "run_conformance",
    "tiny_checkpoint",
]
