"""Model load time and peak memory: checkpoint read, weights handed to the backend, KV allocated."""

from __future__ import annotations

from . import _common

MODELS = ["tiny", _common.DEFAULT_MODEL]


class Load:
    params = (["numpy", "cpu"], MODELS)
    param_names = ("backend", "model")
    timeout = 300
    number = 1  # a load takes seconds: one per sample
    repeat = (1, 3, 60.0)
    rounds = 1
    warmup_time = 0

    def setup_cache(self):
        return str(_common.write_tiny_checkpoint("tiny-model"))

    def setup(self, tiny_path, backend, model):
        reason = _common.backend_unavailable(backend)
        if reason is not None:
            raise NotImplementedError(reason)
        self.path = tiny_path if model == "tiny" else _common.default_model_path()
        if self.path is None:
            raise NotImplementedError(f"{model} not pulled")
        _common.use_threads(1)  # loading is single-threaded NumPy work; keep it comparable

    def _load(self, backend):
        from tinyserve import LLM
        from tinyserve.bench import thread_options

        return LLM(
            self.path,
            backend=backend,
            backend_options=thread_options(backend, 1),
            max_num_seqs=1,
            kv_cache_tokens=1024,
        )

    def time_load(self, tiny_path, backend, model):
        self._load(backend)

    def peakmem_load(self, tiny_path, backend, model):
        self._load(backend)
