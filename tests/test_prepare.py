"""prepare -> token store: contents, split, manifest, no-op re-runs, interruptions, bad input."""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mmjax.data import prepare, stories, tokenizer
from mmjax.data.store import TokenStore
from mmjax.data.text import DataError


def numbered_stories(n, seed=0):
    """Stories that say their own index, so a decoded document tells where it came from."""
    return [f"Story {i}. {s}" for i, s in enumerate(stories.make_stories(n, seed))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = numbered_stories(1500)
    # three text files and two JSONL files; sorted paths keep the story order
    stories.write_story_files(root / "in", docs[:900], num_files=3, prefix="a")
    stories.write_story_files(root / "in", docs[900:], num_files=2, prefix="b", jsonl=True)
    tok = tokenizer.train_tokenizer(docs, root / "tok.model", vocab_size=600)
    return {"root": root, "docs": docs, "tok": tok, "pattern": str(root / "in" / "*")}


def run_prepare(corpus, output, **kwargs):
    kwargs.setdefault("progress", False)
    return prepare.prepare(corpus["pattern"], corpus["root"] / "tok.model", output, **kwargs)


def test_every_document_once_in_order_with_eot_and_disjoint_split(corpus, tmp_path):
    # two worker processes and small chunks: documents of one file go to several workers
    manifest = run_prepare(corpus, tmp_path / "store", workers=2, chunk_mb=0.02,
                           val_fraction=0.1, seed=3)
    assert manifest["options"]["chunks"] > 10
    store = TokenStore(tmp_path / "store")
    tok, docs = corpus["tok"], corpus["docs"]
    expected = tok.encode(docs)
    seen = {}
    for name in ("train", "val"):
        split = store.split(name)
        indices = []
        for d in range(split.num_documents):
            ids = split.document(d)
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
            index = int(re.match(r"Story (\d+)\.", tok.decode([ids[:-1]])[0]).group(1))
            np.testing.assert_array_equal(ids[:-1], expected[index])
            indices.append(index)
        assert indices == sorted(indices), f"{name} documents out of order"
        seen[name] = indices
    assert not set(seen["train"]) & set(seen["val"])  # no training document in validation
    assert sorted(seen["train"] + seen["val"]) == list(range(len(docs)))  # each exactly once
    assert len(seen["val"]) == 150
    assert store.split("train").num_tokens == sum(len(expected[i]) + 1 for i in seen["train"])


def test_manifest_records_tokenizer_counts_and_sources(corpus, tmp_path):
    manifest = run_prepare(corpus, tmp_path / "store")
    on_disk = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert on_disk["splits"] == manifest["splits"]
    tok_path = corpus["root"] / "tok.model"
    assert on_disk["tokenizer"]["path"] == str(tok_path.resolve())
    assert on_disk["tokenizer"]["sha256"] == hashlib.sha256(tok_path.read_bytes()).hexdigest()
    assert on_disk["tokenizer"]["vocab_size"] == 600 and on_disk["dtype"] == "uint16"
    assert on_disk["total_tokens"] == sum(len(x) + 1 for x in corpus["tok"].encode(
        corpus["docs"]))
    sources = on_disk["sources"]
    assert [pathlib_name(s["path"]) for s in sources] == [
        "a_000.txt", "a_001.txt", "a_002.txt", "b_000.jsonl", "b_001.jsonl"]
    for s in sources:
        assert s["sha256"] == hashlib.sha256(open(s["path"], "rb").read()).hexdigest()
    assert sum(s["documents"] for s in sources) == len(corpus["docs"])
    assert (tmp_path / "store" / "train.tokens").stat().st_size == 2 * (
        on_disk["splits"]["train"]["tokens"])


def pathlib_name(path):
    return os.path.basename(path)


def test_rerun_is_a_no_op_and_other_inputs_need_overwrite(corpus, tmp_path, caplog):
    out = tmp_path / "store"
    run_prepare(corpus, out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with caplog.at_level(logging.INFO, logger="mmjax.data.prepare"):
        again = run_prepare(corpus, out)
    assert "is up to date: nothing to do" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert again["splits"] == TokenStore(out).manifest["splits"]
    with pytest.raises(DataError, match=r"holds a store prepared from other inputs "
                                        r"\(differs in: val_fraction\).*--overwrite"):
        run_prepare(corpus, out, val_fraction=0.2)
    rebuilt = run_prepare(corpus, out, val_fraction=0.2, overwrite=True)
    assert rebuilt["splits"]["val"]["documents"] == 300
    assert TokenStore(out).manifest["splits"]["val"]["documents"] == 300
    assert not list(tmp_path.glob(".store.*"))  # the old store is gone


def test_interrupted_run_leaves_no_store_that_looks_complete(corpus, tmp_path, monkeypatch):
    out = tmp_path / "store"

    def interrupted(tmp, output):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(corpus, out)
    assert not out.exists() and not list(tmp_path.glob(".store.*"))  # cleaned up


def test_killed_run_leaves_no_store_that_looks_complete(corpus, tmp_path):
    """SIGKILL-like death at the worst moment: every file written, the rename not done."""
    out = tmp_path / "store"
    script = (
        "import os, sys\n"
        "from mmjax.data import prepare\n"
        "prepare._publish = lambda tmp, output: os._exit(9)\n"
        f"prepare.prepare({corpus['pattern']!r}, {str(corpus['root'] / 'tok.model')!r}, "
        f"{str(out)!r}, progress=False)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    assert not out.exists()
    (partial,) = tmp_path.glob(".store.partial-*")  # hidden, never at the output path
    with pytest.raises(DataError, match="no token store at"):
        TokenStore(out)
    run_prepare(corpus, out)  # the next run cleans up and finishes
    assert not partial.exists() and TokenStore(out).split("train").num_tokens > 0


def test_store_without_manifest_and_corrupt_store(corpus, tmp_path):
    out = tmp_path / "store"
    run_prepare(corpus, out)
    manifest = (out / "manifest.json").read_text()
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"has no manifest.json: not a finished token store"):
        TokenStore(out)
    with pytest.raises(DataError, match="exists and is not a token store"):
        run_prepare(corpus, out)  # prepare never writes into a foreign directory
    (out / "manifest.json").write_text(manifest)
    tokens = (out / "train.tokens").read_bytes()
    (out / "train.tokens").write_bytes(tokens[:-10])
    with pytest.raises(DataError, match=r"corrupt store .*: train.tokens holds \d+ bytes, "
                                        r"the manifest says \d+"):
        TokenStore(out)
    (out / "train.tokens").write_bytes(tokens)
    (out / "val.docs").unlink()
    with pytest.raises(DataError, match="corrupt store .*: val.docs is missing"):
        TokenStore(out)
    (out / "manifest.json").write_text("{ half a manif")
    with pytest.raises(DataError, match="corrupt store .*: unreadable manifest.json"):
        TokenStore(out)


@pytest.mark.parametrize("case, message, workers", [
    ("nomatch", "no files match the input pattern", 1),
    ("empty", r"empty file: .*bad\.txt", 1),
    ("blank", r"empty file: .*bad\.txt \(no non-blank document\)", 1),
    ("latin1", r"not UTF-8: .*bad\.txt \(byte 11: invalid", 2),  # raised in a worker
])
def test_cli_bad_input_is_one_clear_line_and_writes_nothing(corpus, tmp_path, capsys, case,
                                                            message, workers):
    indir = tmp_path / "in"
    stories.write_story_files(indir, corpus["docs"][:20])
    if case == "empty":
        (indir / "bad.txt").write_bytes(b"")
    elif case == "blank":
        (indir / "bad.txt").write_text("\n \n<|endoftext|>\n")
    elif case == "latin1":
        (indir / "bad.txt").write_bytes("Story 1. Olá, Bär".encode("latin-1"))
    pattern = str(indir / ("*.none" if case == "nomatch" else "*.txt"))
    rc = prepare.main(["--input", pattern, "--tokenizer", str(corpus["root"] / "tok.model"),
                       "--output", str(tmp_path / "store"), "--workers", str(workers),
                       "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: ") and "\n" not in err, err
    assert re.search(message, err), err
    assert not (tmp_path / "store").exists() and not list(tmp_path.glob(".store.*"))


def test_cli_writes_a_store(corpus, tmp_path, capsys):
    rc = prepare.main(["--input", corpus["pattern"], "--tokenizer",
                       str(corpus["root"] / "tok.model"), "--output", str(tmp_path / "s"),
                       "--workers", "1", "--val_fraction", "0", "--no_progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["val"] == {"tokens": 0, "documents": 0}
    store = TokenStore(tmp_path / "s")
    assert store.split("val").tokens.shape == (0,)
    assert store.split("train").num_documents == len(corpus["docs"])


def test_tokenizer_without_end_of_text_is_an_error(corpus, tmp_path):
    tokenizer.train_tokenizer(corpus["docs"][:300], tmp_path / "noeos.model", vocab_size=400,
                              eos_id=-1)
    with pytest.raises(DataError, match="has no end-of-text .*--eot_id"):
        prepare.prepare(corpus["pattern"], tmp_path / "noeos.model", tmp_path / "s",
                        progress=False)
    manifest = prepare.prepare(corpus["pattern"], tmp_path / "noeos.model", tmp_path / "s",
                               eot_id=3, progress=False)  # the pad piece stands in
    assert manifest["tokenizer"]["eot_id"] == 3


def test_store_and_tokenizer_beside_the_text_are_not_input(corpus, tmp_path):
    """``--input 'DIR/*'`` with the tokenizer and the store in DIR: re-runs stay no-ops."""
    stories.write_story_files(tmp_path, corpus["docs"][:50])
    (tmp_path / "notes").mkdir()  # a directory matched by the wildcard is skipped
    assert tokenizer.main(["--input", str(tmp_path / "*"), "--vocab_size", "400",
                           "--output", str(tmp_path / "tok.model")]) == 0
    assert tokenizer.main(["--input", str(tmp_path / "*"), "--vocab_size", "400",
                           "--output", str(tmp_path / "tok.model")]) == 0
    for _ in range(2):
        manifest = prepare.prepare(str(tmp_path / "*"), tmp_path / "tok.model",
                                   tmp_path / "store", progress=False)
    assert [pathlib_name(s["path"]) for s in manifest["sources"]] == ["stories_000.txt"]
    assert prepare.prepare(str(tmp_path), tmp_path / "tok.model", tmp_path / "store",
                           progress=False)["fingerprint"] == manifest["fingerprint"]
