"""benchmarks/data.py runs end to end at a tiny size and reports every stage."""

import importlib.util
import pathlib

PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "data.py"
spec = importlib.util.spec_from_file_location("benchmark_data", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_benchmark_reports_prepare_and_loader_rates(tmp_path, capsys):
    rows = bench.main(["--stories", "400", "--vocab_size", "400", "--prepare_workers", "1",
                       "--loader_workers", "0", "--batches", "20", "--train_steps", "0",
                       "--workdir", str(tmp_path)])
    stages = [(r["stage"], r.get("workers"), r.get("output")) for r in rows]
    assert stages == [("tokenizer", None, None), ("prepare", 1, None),
                      ("loader", 0, "numpy"), ("loader", 0, "jax.Array")]
    assert all(r["tokens_per_s"] > 0 for r in rows[1:])
    assert rows[1]["tokens"] > 400 * 20 and rows[1]["tokenise_tokens_per_s"] > 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(rows)


def test_benchmark_times_the_tiny_text_preset_train_step(tmp_path):
    rows = bench.main(["--stories", "300", "--vocab_size", "400", "--prepare_workers", "1",
                       "--loader_workers", "0", "--batches", "10", "--train_steps", "2",
                       "--workdir", str(tmp_path)])
    train = next(r for r in rows if r["stage"] == "train_step")
    assert train["preset"] == "mm_v1_small.py:tiny_text" and train["tokens_per_s"] > 0
    assert "width 64" in train["model"]
    assert rows[-1]["stage"] == "ratio" and rows[-1]["slowest_loader_over_train_step"] > 0
