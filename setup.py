"""Build: the Cython kernels in ext/ (optional: without a compiler tinyserve runs on NumPy) and the
model catalog shipped as package data. Metadata lives in pyproject.toml."""

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class build_py_with_catalog(build_py):
    """Ship models/catalog.json inside the package as tinyserve/catalog.json."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "tinyserve"
        self.mkpath(str(target))
        self.copy_file(str(HERE / "models" / "catalog.json"), str(target / "catalog.json"))


class optional_build_ext(build_ext):
    """A failed compile leaves the NumPy path working instead of failing the install."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler, ...
            print(f"warning: native kernels not built ({e}); tinyserve will use NumPy", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"warning: {ext.name} not built ({e}); tinyserve will use NumPy", file=sys.stderr)


def extensions():
    sources = sorted((HERE / "ext").glob("*.pyx"))
    if not sources or os.environ.get("TINYSERVE_PURE_PYTHON") == "1":
        return []
    try:
        import numpy
        from Cython.Build import cythonize
    except ImportError:
        return []
    from setuptools import Extension

    flags = ["-O3", "-pthread", "-fopenmp-simd"]  # threads: ext/pool.h; OpenMP only for `omp simd`
    if os.environ.get("TINYSERVE_NATIVE") == "1":  # opt-in: tune for this very CPU
        flags.append("-march=native")
    else:
        flags += ["-mavx2", "-mfma", "-mf16c"] if os.uname().machine == "x86_64" else []
    exts = [
        Extension(
            f"tinyserve._ext.{src.stem}",
            [str(src.relative_to(HERE))],
            include_dirs=[numpy.get_include(), str(HERE / "ext")],
            # every header and include: one translation unit
            depends=[
                str(h.relative_to(HERE))
                for pattern in ("*.h", "*.pxi")
                for h in sorted((HERE / "ext").glob(pattern))
            ],
            extra_compile_args=flags,
            extra_link_args=["-pthread"],
        )
        for src in sources
    ]
    return cythonize(exts, language_level=3, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": optional_build_ext, "build_py": build_py_with_catalog})
