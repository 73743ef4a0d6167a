"""benchmarks/generate.py runs end to end on tiny models and prints its table (no timing
assertions: the figures are for the README, measured side by side in one run)."""

import pytest
from benchmark_loading import load_benchmark


def _bench():
    return load_benchmark("generate")


TINY = ["--layers", "1", "--heads", "2", "--width", "16", "--vocab", "32", "--pmem", "8",
        "--window", "4", "--contexts", "12,20", "--batches", "1,2", "--steps", "3",
        "--repeats", "1"]


def test_every_model_batch_and_context_gets_a_row(capsys):
    rows = _bench().main(TINY)
    out = capsys.readouterr().out
    assert [(r["model"], r["batch"], r["context"]) for r in rows] == [
        (m, b, c) for m in ("v1", "v2", "gpt2") for b in (1, 2) for c in (12, 20)]
    for r in rows:
        assert r["recompute_ms"] > 0 and r["incremental_ms"] > 0
        assert r["speedup"] == pytest.approx(r["recompute_ms"] / r["incremental_ms"])
    assert "| model | batch | context | recompute ms/token | incremental ms/token | speedup |" \
        in out


@pytest.mark.parametrize("argv, message", [
    (["--models", "v3"], "unknown model 'v3'"),
    (["--contexts", "0"], "--contexts must be positive"),
    (["--contexts", "8", "--steps", "16"], "--contexts must exceed --steps + 1 = 17"),
    (["--width", "0"], "--width must be >= 1"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        _bench().parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
