"""``python -m mmjax.generate``: a trained workdir (checkpoint, config, tokenizer) to text."""

import os
import shutil
import subprocess
import sys

import pytest

from mmjax.config import default_config
from mmjax.data import stories
from mmjax.generate import Decoder, Sampling, generate
from mmjax.generate.__main__ import main
from mmjax.generate.workdir import load_workdir
from mmjax.train.loop import train_and_evaluate


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 1-layer v1 model trained 2 steps on a story store, with its workdir."""
    root = tmp_path_factory.mktemp("generate")
    store_dir, tok = stories.make_story_store(root / "data", 300, seed=3)
    config = default_config()
    config.model.vocab_size = tok.vocab_size
    config.model.num_layers, config.model.embed_dim, config.model.pmem_size = 1, 32, 32
    config.data = dict(corpus="tokens", path=str(store_dir), context_length=32, batch_size=8)
    config.train.num_steps = 2
    train_and_evaluate(config, str(root / "run"), progress=False)
    return root / "run"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()[-1] if out.err.strip() else ""


def test_training_keeps_the_tokenizer_in_the_workdir(workdir):
    trained = load_workdir(workdir)
    assert (workdir / "tokenizer.model").is_file()
    assert trained.tokenizer is not None and trained.tokenizer.vocab_size <= \
        trained.model.vocab_size
    assert trained.step_dir.name == "2"


def test_a_text_prompt_is_continued_as_the_api_continues_it(workdir, capsys):
    code, out, _ = _run(capsys, "--workdir", workdir, "--prompt", "Once upon a time",
                        "--max_new_tokens", 6, "--temperature", 0)
    assert code == 0
    trained = load_workdir(workdir)
    ids = [trained.tokenizer.eos_id] + trained.tokenizer.encode(["Once upon a time"])[0]
    decoder = Decoder(trained.model, trained.params, batch_size=1, cache_length=len(ids) + 6)
    tokens = generate(decoder, [ids], max_new_tokens=6, sampling=Sampling(temperature=0),
                      eos_id=trained.tokenizer.eos_id)[0]
    assert out.strip() == trained.tokenizer.decode([tokens])[0].strip()


def test_prompts_file_beam_search_and_ids(workdir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat\n\nA dog sat\n")
    code, out, _ = _run(capsys, "--workdir", workdir, "--prompts", prompts,
                        "--max_new_tokens", 4, "--top_k", 5, "--top_p", 0.9, "--seed", 1)
    assert code == 0 and out.startswith("[0]\n") and "\n[1]\n" in out and "[2]" not in out
    code, out, _ = _run(capsys, "--workdir", workdir, "--prompt", "The cat", "--beam", 2,
                        "--max_new_tokens", 4)
    assert code == 0 and out.strip()
    code, out, _ = _run(capsys, "--workdir", workdir, "--prompt_ids", "5 6 7",
                        "--max_new_tokens", 3, "--temperature", 0)
    assert code == 0 and all(x.isdigit() for x in out.split())


def test_bad_input_is_one_line(workdir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(workdir, bare)
    (bare / "tokenizer.model").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    vocab = load_workdir(workdir).model.vocab_size
    cases = [
        ((bare, "--prompt", "hi"), "has no tokenizer"),
        ((empty, "--prompt", "hi"), "no checkpoint"),
        ((tmp_path / "nowhere", "--prompt", "hi"), "no such directory"),
        ((workdir, "--prompt", "  "), "prompt 0 is empty"),
        ((workdir, "--prompt", "Once upon a time", "--cache_length", 4),
         "but the cache holds 4"),
        ((workdir, "--prompt_ids", f"1 {vocab}"), f"token id {vocab} outside"),
        ((workdir, "--prompt_ids", "1 x"), "--prompt_ids must be integers"),
        ((workdir, "--prompts", tmp_path / "missing.txt"), "no such file"),
        ((workdir, "--prompt", "hi", "--step", 7), "no checkpoint of step 7"),
    ]
    for (wd, *rest), message in cases:
        code, _, err = _run(capsys, "--workdir", wd, *rest)
        assert code == 1 and message in err, (rest, err)


def test_the_command_logs_no_warning(workdir):
    """``python -m mmjax.generate`` on a trained workdir: stderr stays empty (Orbax warned
    "Metadata file does not exist" through absl's logger on every run)."""
    result = subprocess.run(
        [sys.executable, "-m", "mmjax.generate", "--workdir", str(workdir), "--prompt_ids",
         "1 2", "--max_new_tokens", "2"], env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "WARNING" not in result.stderr and "absl" not in result.stderr, result.stderr


def test_bad_flags_exit_2(workdir, capsys):
    for argv in (["--temperature", "-1"], ["--top_p", "2"], ["--max_new_tokens", "0"]):
        with pytest.raises(SystemExit) as info:
            main(["--workdir", str(workdir), "--prompt", "x", *argv])
        assert info.value.code == 2
    capsys.readouterr()


def test_question_answering_on_a_jsonl(workdir, tmp_path, capsys):
    """``python -m mmjax.eval retrieval --qa``: runs on a text model; the matching rule."""
    import json

    from mmjax.eval.__main__ import main as eval_main
    from mmjax.eval.needles import qa_match

    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"context": "Tom has a red ball.", "question": q,
                                         "answers": ["red"]}) for q in
                            ("What colour is the ball?", "What does Tom have?")))
    assert eval_main(["retrieval", "--workdir", str(workdir), "--qa", str(qa),
                      "--output", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "retrieval.json").read_text())
    assert rows[0]["questions"] == 2 and 0.0 <= rows[0]["accuracy"] <= 1.0
    capsys.readouterr()
    assert qa_match(" Red, of course.", ["red"]) and qa_match("the  Big dog", ["The big"])
    assert not qa_match("blue", ["red"]) and not qa_match("", ["red"])


def test_in_context_classification_by_shots(workdir, tmp_path, capsys):
    import json

    from mmjax.eval import classify
    from mmjax.eval.__main__ import main as eval_main

    assert eval_main(["icl_classify", "--workdir", str(workdir), "--synthetic", "12",
                      "--shots", "0,2", "--queries", "4", "--output", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "icl_classify.json").read_text())
    assert [(r["shots"], r["anonymized"]) for r in rows] == [(0, False), (2, False),
                                                             (0, True), (2, True)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["queries"] == 4 for r in rows)
    capsys.readouterr()
    examples = classify.synthetic_examples(0, 50)
    assert {e["label"] for e in examples} == set(classify.TOPICS)
    for e in examples:
        assert sum(w in classify.TOPICS[e["label"]] for w in e["text"].split()) == 3
    prompt = classify.build_prompt(examples[:2], "rain and sun", {k: k for k in classify.TOPICS})
    assert prompt.count("Input:") == 3 and prompt.endswith("Input: rain and sun\nLabel:")


def test_classification_data_errors(tmp_path):
    import json

    from mmjax.eval import classify

    path = tmp_path / "d.jsonl"
    for text, message in [(json.dumps({"text": "x"}), "missing field(s) ['label']"),
                          ("{", "d.jsonl:1: not a JSON object"),
                          (json.dumps({"text": "x", "label": "a"}), "at least 2 labels")]:
        path.write_text(text)
        with pytest.raises(ValueError) as info:
            classify.read_examples(path)
        assert message in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        classify.read_examples(tmp_path / "none.jsonl")
