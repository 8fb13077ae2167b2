"""Compiled Cython kernels (built from ext/ by setup.py); absent on a pure-Python install."""

import os

# OpenMP workers that spin between parallel regions (libgomp's default) steal the core of the
# thread doing the work whenever the machine is shared: measured on a loaded 2-core box, one
# quantized GEMV went from 0.04 ms to 6.6 ms. Sleeping workers cost microseconds per region
# instead. libgomp reads this once, when the first extension module loads it, so it is set here,
# before any of them; a user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
