"""``python -m mmjax.eval per_position``, ``extrapolate``, ``attention`` and ``retrieval`` on
tiny trained workdirs."""

import json

import numpy as np
import pytest

from mmjax.config import default_config
from mmjax.eval.__main__ import main
from mmjax.train.loop import train_and_evaluate


def _train(root, name, **model):
    config = default_config()
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
    return (_train(root, "memory_mosaic", pmem_size=16),
            _train(root, "gpt2", context_length=48),
            _train(root, "memory_mosaic_v2", mlp_dim=32, short_term_window=8,
                   long_term_skip_range=(2, 4), inference_long_term_skip=3, scan_layers=True))


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, (captured.err.strip().splitlines() or [""])[-1]


def test_per_position_plots_every_checkpoint(workdirs, tmp_path, capsys):
    mm, gpt2, _ = workdirs
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


def test_attention_maps_follow_each_memory_s_mask(workdirs, tmp_path, capsys):
    mm, gpt2, v2 = workdirs
    for workdir in (mm, gpt2, v2):
        factors = "1" if workdir == gpt2 else "1,2"  # GPT2's 48 positions: not 2 x 32
        code, out, _ = _run(capsys, "attention", "--workdir", workdir, "--factors", factors,
                            "--output", tmp_path / workdir.name)
        assert code == 0
        assert (tmp_path / workdir.name / "attention.png").stat().st_size > 1000
    maps = {w.name: json.loads((tmp_path / w.name / "attention.json").read_text())["maps"]
            for w in workdirs}
    assert set(maps["memory_mosaic"]) == {"32", "64"}
    for heads in maps["memory_mosaic"]["64"].values():  # v1: the diagonal is excluded
        w = np.array(heads)
        assert w.shape == (2, 64) and np.allclose(w.sum(-1), 1) and np.all(w[:, -1] == 0)
    for heads in maps["gpt2"]["32"].values():  # attention sees its own position
        assert np.all(np.array(heads)[:, -1] > 0)
    v2_maps = maps["memory_mosaic_v2"]["64"]
    assert set(v2_maps) == {"layer_0/mixer/short_term", "layer_0/mixer/long_term"}
    short, long = np.array(v2_maps["layer_0/mixer/short_term"]), \
        np.array(v2_maps["layer_0/mixer/long_term"])
    assert np.all(short[:, :64 - 1 - 8] == 0) and np.allclose(short.sum(-1), 1)  # window 8
    assert np.all(long[:, 64 - 1 - 3:] == 0) and np.allclose(long.sum(-1), 1)  # skip 3


def test_bad_input_is_one_line(workdirs, tmp_path, capsys):
    mm, gpt2, _ = workdirs
    cases = [
        (("extrapolate", "--workdir", gpt2, "--factors", "1,2"), "exceeds the 48 learned"),
        (("attention", "--workdir", gpt2, "--factors", "2"), "exceeds the 48 learned"),
        (("per_position", "--workdir", tmp_path / "none"), "no such directory"),
        (("per_position", "--workdir", mm, "--data", tmp_path / "nostore"),
         "no such token store"),
        (("per_position", "--workdir", mm, "--context", 1), "context must be >= 2"),
    ]
    for argv, message in cases:
        code, _, err = _run(capsys, *argv, "--output", tmp_path / "out")
        assert code == 1 and message in err, (argv, err)


# ----------------------------------------------------------------------------- retrieval


def test_needle_prompts_hold_their_facts_and_the_copy_oracle_scores_1():
    from mmjax.eval import needles

    for facts in (1, 4):
        tasks = needles.needle_tasks(0, vocab_size=64, context=100, facts=facts, num_tasks=30)
        key, val, query = needles.markers(64)
        for t in tasks:
            assert len(t.prompt) == 100 and len(t.answer) == 2
            assert t.prompt.count(key) == facts and t.prompt.count(query) == 1
            assert t.prompt[-1] == val and t.prompt[-4] == query
        answers = [needles.copy_oracle(t.prompt, 64, 2) for t in tasks]
        assert needles.exact_match(answers, tasks) == 1.0
        assert needles.exact_match([[0, 0]] * len(tasks), tasks) < 0.2


def test_qa_files_are_checked_line_by_line(tmp_path):
    from mmjax.eval import needles

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"context": "c", "question": "q", "answers": ["a"]}) + "\n\n"
                    + json.dumps({"context": "c", "question": "q", "answers": "b"}) + "\n")
    assert [t["answers"] for t in needles.qa_tasks(good)] == [["a"], ["b"]]
    cases = [("{nope", "good.jsonl:1: not a JSON object"),
             (json.dumps({"context": "c", "answers": ["a"]}), "missing field(s) ['question']"),
             (json.dumps({"context": "c", "question": "q", "answers": []}), "non-empty"),
             ("", "no question in the file")]
    for text, message in cases:
        bad = tmp_path / "good.jsonl"
        bad.write_text(text)
        with pytest.raises(ValueError) as info:
            needles.qa_tasks(bad)
        assert message in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        needles.qa_tasks(tmp_path / "missing.jsonl")


def test_the_retrieval_command_scores_a_checkpoint(workdirs, tmp_path, capsys):
    mm, gpt2, _ = workdirs
    code, out, _ = _run(capsys, "retrieval", "--workdir", mm, "--contexts", "24,40",
                        "--facts", "1,2", "--tasks", 3, "--output", tmp_path)
    assert code == 0, out
    rows = json.loads((tmp_path / "retrieval.json").read_text())
    assert [(r["facts"], r["context"]) for r in rows] == [(1, 24), (1, 40), (2, 24), (2, 40)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert all(len(r["answered"]) == 3 and r["accuracy"] == sum(r["answered"]) / 3
               for r in rows)
    code, _, err = _run(capsys, "retrieval", "--workdir", gpt2, "--contexts", "64")
    assert code == 1 and "exceeds the 48 learned positions" in err
    code, _, err = _run(capsys, "retrieval", "--workdir", mm, "--contexts", "8", "--facts",
                        "3")
    assert code == 1 and "too short for 3 facts" in err
    code, _, err = _run(capsys, "retrieval", "--workdir", mm, "--qa", tmp_path / "x.jsonl")
    assert code == 1 and "no tokenizer" in err


def test_the_page_diagnosis_ranks_the_needle_s_page_as_the_choice_does(workdirs, tmp_path,
                                                                        capsys):
    """Every page kept: each head's kept pages hold all of its exact weight. Fewer kept:
    the needle's page is kept exactly when it is the newest or ranks among the best."""
    from mmjax.eval import needles

    v2 = workdirs[2]
    every = needles.page_diagnosis(
        v2, context=72, facts=2, num_tasks=2,
        memory=dict(long_term_memory="paged", long_term_page=4, long_term_top_pages=100))
    assert len(every) == 2 * 2  # tasks x heads of the one (scanned) layer
    assert {r["memory"] for r in every} == {"blocks/layer/mixer/long_term[0]"}
    for r in every:
        assert r["kept"] and r["kept_weight"] == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= r["needle_weight"] <= r["max_weight"] <= 1.0
        assert r["competing_pages"] == 67 // 4  # pairs 0..67 seen (skip 3), the newest page apart
    code, out, _ = _run(capsys, "retrieval", "--workdir", v2, "--contexts", "72", "--facts",
                        "2", "--tasks", "2", "--memory", "paged", "--page", "4", "--top_pages",
                        "2", "--diagnose", "--output", tmp_path)
    assert code == 0 and out.count("| 2 | 72 |") == 2  # the best head of each task
    two = json.loads((tmp_path / "diagnosis.json").read_text())
    assert len(two) == 4 and {(r["facts"], r["context"]) for r in two} == {(2, 72)}
    assert [r["needle_weight"] for r in two] == pytest.approx(
        [r["needle_weight"] for r in every], abs=1e-6)
    assert all(r["kept"] == (r["needle_page_rank"] < 1) for r in two), two
    assert {r["kept"] for r in two} == {True, False}  # both cases occur
    assert all(r["kept_weight"] <= 1.0 + 1e-6 for r in two)
    assert min(r["kept_weight"] for r in two) < 0.999
    with pytest.raises(SystemExit):
        main(["retrieval", "--workdir", str(v2), "--diagnose"])


def test_the_retrieval_command_reads_a_v2_memory_in_pages(workdirs, tmp_path, capsys):
    mm, _, v2 = workdirs
    runs = {}
    for name, flags in (("exact", []), ("all", ["--memory", "paged", "--page", 4,
                                                "--top_pages", 100]),
                        ("two", ["--memory", "paged", "--page", 4, "--top_pages", 2])):
        code, out, _ = _run(capsys, "retrieval", "--workdir", v2, "--contexts", "72",
                            "--facts", "2", "--tasks", 2, "--output", tmp_path / name, *flags)
        assert code == 0, out
        runs[name] = json.loads((tmp_path / name / "retrieval.json").read_text())
    assert {r["memory"] for r in runs["two"]} == {"paged 4 x 2"}
    assert [r["accuracy"] for r in runs["all"]] == [r["accuracy"] for r in runs["exact"]]
    # keeping every page reads the memory exactly: the same continuations, token for token
    from mmjax.eval import needles
    from mmjax.generate.workdir import load_workdir

    prompts = [t.prompt for t in needles.needle_tasks(0, vocab_size=64, context=72, facts=2,
                                                      num_tasks=2)]
    paged = dict(long_term_memory="paged", long_term_page=4, long_term_top_pages=100)
    continued = lambda trained: needles.continue_greedily(trained.model, trained.params,
                                                          prompts, 6)
    assert continued(load_workdir(v2, model_overrides=paged)) == continued(load_workdir(v2))
    code, _, err = _run(capsys, "retrieval", "--workdir", mm, "--memory", "paged")
    assert code == 1 and "has no setting long_term_memory" in err
    with pytest.raises(SystemExit) as info:
        main(["retrieval", "--workdir", str(v2), "--top_pages", "2"])
    assert info.value.code == 2
