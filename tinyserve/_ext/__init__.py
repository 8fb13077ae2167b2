"""Compiled Cython kernels (built from ext/ by setup.py); absent on a pure-Python install."""
