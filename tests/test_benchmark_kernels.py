"""benchmarks/kernels.py runs on CPU: its correctness rows and (in interpret mode) its timing."""

import importlib.util
import pathlib

import jax.numpy as jnp
import pytest

from mmjax.ops import MaskSpec

PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "kernels.py"
spec = importlib.util.spec_from_file_location("benchmark_kernels", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_visible_pairs_and_peaks():
    assert bench.visible_pairs(5, MaskSpec()) == 0 + 1 + 2 + 3 + 4
    assert bench.visible_pairs(5, MaskSpec(window=2, skip=1)) == 0 + 0 + 1 + 1 + 1
    assert bench.peak_tflops("TPU v5 lite") == 197.0
    assert bench.peak_tflops("cpu") is None


def test_interpret_rows_report_small_errors():
    rows = bench.interpret_rows(t=40, heads=1, dim=16, masks=("window40",))
    assert [r["kernel"] for r in rows] == ["pallas_tpu (interpret)", "pallas_gpu (interpret)"]
    assert all(r["max_rel_error"] < 1e-5 for r in rows)


@pytest.mark.slow
def test_speed_rows_run_in_interpret_mode():
    rows = bench.speed_rows(lengths=(64,), heads=1, dim=16, dtype=jnp.float32, repeats=1,
                            platform="gpu", interpret=True, masks=("skip64",))
    assert len(rows) == 4 and all("seconds" in r for r in rows)
