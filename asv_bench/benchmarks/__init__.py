"""asv benchmarks for tinyserve: serving (TPOT, TTFT, tokens/s), kernels, model loading."""
