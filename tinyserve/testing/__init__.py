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
contiguous one; chunked prefill + cached decode == one full forward.

Layout: tolerances.py (by dtype), checkpoints.py (the tiny random checkpoints), checks.py (the
check_* functions), routing.py (pinning a router's choices), conformance.py (the pytest face).
"""

# ruff: noqa: F401 - a re-export module: every name the single-module kit had at its top level,
# private helpers included (tests use some), still resolves as tinyserve.testing.<name>

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import create_backend
from ..backends.numpy_backend import NumpyBackend
from ..backends.numpy_ops import NumpyOps
from ..batch import Batch
from ..config import ModelConfig
from ..engine import Engine, EngineConfig
from ..loading import Checkpoint
from ..models import build_model
from ..models.rope import rope_inv_freq
from ..sampling import SamplingParams
from .checkpoints import (
    _BASE,
    _DEEPSEEK_V3,
    _FAMILY_TENSORS,
    ARCHITECTURES,
    GREEDY_ARCHITECTURES,
    MOE_ARCHITECTURES,
    _deepseek_v3_tensors,
    _gemma3_tensors,
    _llama_tensors,
    _mixtral_tensors,
    _phi3_tensors,
    _stored,
    tiny_checkpoint,
)
from .checks import (
    _check_kv_ops,
    _check_moe,
    _close,
    _engine,
    _greedy,
    _prompts,
    check_batched_equals_alone,
    check_greedy,
    check_logits,
    check_ops,
    check_paged_equals_contiguous,
)
from .conformance import BackendConformance, conformance_tests, run_conformance
from .routing import _pinned_routing
from .tolerances import (
    QUANTIZED_ACTIVATION_TOLERANCE,
    TOLERANCES,
    Tolerance,
    _dtype,
    _logits_atol,
    tolerance,
)
