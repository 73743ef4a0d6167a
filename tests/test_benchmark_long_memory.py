"""benchmarks/long_memory.py runs end to end on a tiny model (no timing assertions: the
figures are for docs/results.md, measured side by side in one run)."""

import pytest
from benchmark_loading import load_benchmark


def _bench():
    return load_benchmark("long_memory")


TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--vocab", "32", "--window", "8",
        "--contexts", "64,128", "--exact_max", "64", "--page", "8", "--top_pages", "2",
        "--steps", "2", "--prefill", "16", "--prefill_chunk", "8"]


def test_paged_and_exact_get_their_figures_and_the_goals_are_printed(capsys):
    results = _bench().main(TINY)
    out = capsys.readouterr().out
    assert set(results["decode_ms"]["paged"]) == {64, 128}
    assert set(results["decode_ms"]["exact"]) == {64}  # past --exact_max: paged only
    assert all(v > 0 for kind in ("decode_ms", "prefill_tokens_per_s")
               for v in results[kind]["paged"].values())
    # bfloat16 pages and their bounds take less than the exact fp32 buffers
    assert results["cache_mib"]["paged"][64] < results["cache_mib"]["exact"][64]
    for dtype in ("bfloat16", "int8"):  # what narrow pages cost
        cost = results["page_rounding"][dtype]
        assert cost["max_abs"] > 0 and cost["cache_mib"] < cost["float32_cache_mib"]
    assert "paged decode at 128 / at 64" in out and "(goal <= 3)" in out


def test_bad_flags_are_refused():
    with pytest.raises(SystemExit):
        _bench().parse_args(["--contexts", "0"])
