"""``python -m mmjax.eval per_position`` and ``extrapolate`` on tiny trained workdirs."""

import json

import pytest

from mmjax.eval.__main__ import main
from mmjax.train import defaults
from mmjax.train.loop import train_and_evaluate


def _train(root, name, **model):
    config = defaults.get_config()
    config.model = dict(name=name, vocab_size=64, num_layers=1, num_heads=2, embed_dim=16,
                        **model)
    config.data.context_length = 32
    config.data.batch_size = 8
    config.train.num_steps = 2
    train_and_evaluate(config, str(root / name), progress=False)
    return root / name


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("positions")
    return (_train(root, "memory_mosaic", pmem_size=16, context_length=32),
            _train(root, "gpt2", context_length=48))


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, (captured.err.strip().splitlines() or [""])[-1]


def test_per_position_plots_every_checkpoint(workdirs, tmp_path, capsys):
    mm, gpt2 = workdirs
    code, out, _ = _run(capsys, "per_position", "--workdir", mm, "--workdir", gpt2,
                        "--batches", 2, "--output", tmp_path)
    assert code == 0, out
    curves = json.loads((tmp_path / "per_position.json").read_text())["curves"]
    assert len(curves) == 2 and all(len(c) == 32 for c in curves.values())
    assert all(v is not None and v > 0 for c in curves.values() for v in c)
    assert (tmp_path / "per_position.png").stat().st_size > 1000
    assert "memory_mosaic" in out and "gpt2" in out


def test_extrapolate_runs_at_multiples_of_the_context(workdirs, tmp_path, capsys):
    code, out, _ = _run(capsys, "extrapolate", "--workdir", workdirs[0], "--factors", "1,3",
                        "--batches", 1, "--output", tmp_path)
    assert code == 0
    curves = json.loads((tmp_path / "extrapolate.json").read_text())["curves"]
    assert [len(c) for c in curves.values()] == [32, 96]
    assert (tmp_path / "extrapolate.png").stat().st_size > 1000


def test_bad_input_is_one_line(workdirs, tmp_path, capsys):
    mm, gpt2 = workdirs
    cases = [
        (("extrapolate", "--workdir", gpt2, "--factors", "1,2"), "exceeds the 48 learned"),
        (("per_position", "--workdir", tmp_path / "none"), "no such directory"),
        (("per_position", "--workdir", mm, "--data", tmp_path / "nostore"),
         "no such token store"),
        (("per_position", "--workdir", mm, "--context", 1), "context must be >= 2"),
    ]
    for argv, message in cases:
        code, _, err = _run(capsys, *argv, "--output", tmp_path / "out")
        assert code == 1 and message in err, (argv, err)
