"""The kit's pytest face: BackendConformance, conformance_tests and run_conformance."""

from __future__ import annotations

from pathlib import Path

from ..backends import create_backend
from .checkpoints import (
    ARCHITECTURES,
    BATCH_ARCHITECTURES,
    GREEDY_ARCHITECTURES,
    LOWERING_ARCHITECTURES,
    MOE_ARCHITECTURES,
)
from .checks import (
    check_batched_equals_alone,
    check_greedy,
    check_logits,
    check_lowering_equals_op_by_op,
    check_ops,
    check_paged_equals_contiguous,
)
from .tolerances import _dtype


class BackendConformance:
    """The checks as pytest tests. Subclass as `Test...` and set backend / device / dtype."""

    backend: str = "numpy"
    device: str | None = None
    dtype: str | None = None

    def make_backend(self):
        return create_backend(self.backend, device=self.device, dtype=self.dtype)

    def pytest_generate_tests(self, metafunc):  # pytest calls this for the class's own tests
        if "conformance_arch" in metafunc.fixturenames:
            metafunc.parametrize("conformance_arch", list(ARCHITECTURES))
        if "conformance_greedy_arch" in metafunc.fixturenames:
            metafunc.parametrize("conformance_greedy_arch", GREEDY_ARCHITECTURES)
        if "conformance_batch_arch" in metafunc.fixturenames:
            metafunc.parametrize("conformance_batch_arch", BATCH_ARCHITECTURES)
        if "conformance_lowering_arch" in metafunc.fixturenames:
            metafunc.parametrize("conformance_lowering_arch", LOWERING_ARCHITECTURES)

    def test_availability(self):
        from ..backends import get_backend_class

        ok, reason = get_backend_class(self.backend).availability()
        assert isinstance(ok, bool) and isinstance(reason, str)
        assert ok, f"backend {self.backend!r} is unavailable: {reason}"

    def test_ops(self):
        check_ops(self.make_backend())

    def test_logits(self, conformance_arch):
        check_logits(self.make_backend(), conformance_arch)

    def test_greedy(self, conformance_greedy_arch):
        backend = self.make_backend()
        if conformance_greedy_arch in MOE_ARCHITECTURES and _dtype(backend) != "float32":
            import pytest

            pytest.skip("a router's near-tie may flip below float32 (test_logits pins routing)")
        check_greedy(backend, conformance_greedy_arch)

    def test_batched_equals_alone(self, conformance_batch_arch):
        check_batched_equals_alone(self.make_backend(), conformance_batch_arch)

    def test_paged_equals_contiguous(self, conformance_batch_arch):
        check_paged_equals_contiguous(self.make_backend(), conformance_batch_arch)

    def test_lowering_equals_op_by_op(self, conformance_lowering_arch):
        check_lowering_equals_op_by_op(
            self.backend, conformance_lowering_arch, self.device, self.dtype
        )


def conformance_tests(backend: str, device: str | None = None, dtype: str | None = None) -> type:
    """A pytest test class running the whole kit on one backend: `TestMine = conformance_tests("mine")`."""
    suffix = "".join(
        part.capitalize()
        for part in f"{backend} {device or ''} {dtype or ''}".replace(":", " ").split()
    )
    return type(
        f"Test{suffix}Conformance",
        (BackendConformance,),
        {
            "backend": backend,
            "device": device,
            "dtype": dtype,
            "__module__": "tinyserve.testing",  # where backend authors import it from
        },
    )


def run_conformance(
    backend: str,
    device: str | None = None,
    dtype: str | None = None,
    pytest_args: tuple[str, ...] = ("-q",),
) -> int:
    """Run the kit on one backend outside a test suite (scripts, CI); returns pytest's exit code."""
    import tempfile

    import pytest

    with tempfile.TemporaryDirectory() as tmp:
        # a fresh module name per run: pytest refuses a second module of the same name
        module = Path(tmp) / f"test_conformance_{Path(tmp).name.lstrip('tmp_')}.py"
        module.write_text(
            "from tinyserve.testing import conformance_tests\n"
            f"TestConformance = conformance_tests({backend!r}, {device!r}, {dtype!r})\n"
        )
        return int(pytest.main([str(module), "-p", "no:cacheprovider", *pytest_args]))
