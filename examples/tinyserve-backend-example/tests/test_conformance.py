"""The tinyserve conformance kit, run on this backend: `pytest tests/` after installing the package."""

from tinyserve.testing import conformance_tests

TestExampleConformance = conformance_tests("example")
