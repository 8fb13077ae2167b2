#!/usr/bin/env bash
# The README's test command: install the test dependencies (torch pinned first: 2.13.0 CPU lies
# on disk on these machines; never let pip resolve another), build the package with its native
# kernels, pull the two real models once (~93 + 253 MB), then run the whole suite twice: once requiring
# the compiled kernels, once on the pure NumPy path (as an install without a compiler runs).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
# fuzz: atheris; ray: the replica tests run, never skip; failing to install either fails here
python -m pip install -q -e ".[test,fuzz,ray]"
python -m tinyserve.cli pull
python -m tinyserve.cli pull gemma3-270m
TINYSERVE_REQUIRE_NATIVE=1 python -m pytest -q "$@"
TINYSERVE_PURE_PYTHON=1 python -m pytest -q -m "not real_model" "$@"
