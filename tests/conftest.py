"""Test-wide JAX settings: 8 fake CPU devices, a persistent compilation cache, fast compiles.

These must be set before jax is imported anywhere.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
jax.config.update("jax_compilation_cache_dir", str(REPO_ROOT / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


import pytest  # noqa: E402
from gcs_emulator import emulator_fixture, gcs_fixture  # noqa: E402

emulator = pytest.fixture(scope="module")(emulator_fixture)
gcs = pytest.fixture(gcs_fixture)

SLOW_TESTS = pathlib.Path(__file__).with_name("slow_tests.txt")


def slow_test_ids() -> set[str]:
    """The ids listed in ``tests/slow_tests.txt`` (comments and blank lines skipped)."""
    lines = SLOW_TESTS.read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def pytest_collection_modifyitems(config, items):
    """Mark the tests listed in ``slow_tests.txt`` slow (``-m slow`` selects them)."""
    slow = slow_test_ids()
    for item in items:
        if item.nodeid in slow:
            item.add_marker(pytest.mark.slow)
