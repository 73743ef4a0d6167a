"""Sentencepiece tokenizer: training, round-trip, byte fallback, CLI, bad input."""

import pickle
import re

import pytest

from mmjax.data import stories, text, tokenizer
from mmjax.data.text import DataError


@pytest.fixture(scope="module")
def corpus():
    return stories.make_stories(2000, seed=1)


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return tokenizer.train_tokenizer(corpus, path, vocab_size=600)


def test_round_trip_on_generated_text(tok, corpus):
    ids = tok.encode(corpus)
    assert tok.decode(ids) == corpus
    # a real subword vocabulary: far fewer tokens than bytes
    assert sum(map(len, ids)) < 0.4 * sum(len(s.encode()) for s in corpus)
    assert max(max(row) for row in ids) < tok.vocab_size == 600


def test_byte_fallback_for_unseen_characters(tok):
    unseen = ["Der Bär aß ☃ und 日本語 🙂", "  two  spaces,\ttab\nnewline\n"]
    ids = tok.encode(unseen)
    assert tok.decode(ids) == unseen
    pieces = [tok.processor.id_to_piece(i) for i in ids[0]]
    assert "<0xE2>" in pieces and tok.unk_id not in ids[0]  # bytes, never <unk>


def test_special_ids_and_load(tok, tmp_path):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    loaded = tokenizer.Tokenizer.load(tok.path)
    assert loaded.sha256 == tok.sha256 and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(["Lily saw a cat."]) == tok.encode(["Lily saw a cat."])
    clone = pickle.loads(pickle.dumps(loaded))  # worker processes receive tokenizers
    assert clone.encode(["a fox"]) == tok.encode(["a fox"]) and clone.path == loaded.path
    assert tok.decode([[tok.eos_id, tok.pad_id]]) == [""]


def test_unigram_and_custom_ids(corpus):
    uni = tokenizer.train_tokenizer(corpus[:500], vocab_size=500, model_type="unigram",
                                    pad_id=0, unk_id=3)
    assert uni.pad_id == 0 and uni.unk_id == 3
    assert uni.decode(uni.encode(corpus[:50])) == corpus[:50]
    with pytest.raises(ValueError, match="model_type"):
        tokenizer.train_tokenizer(corpus, vocab_size=500, model_type="wordpiece")
    with pytest.raises(ValueError, match="too small for byte fallback"):
        tokenizer.train_tokenizer(corpus, vocab_size=100)


def test_cli_trains_from_txt_and_jsonl(tmp_path, corpus, capsys):
    stories.write_story_files(tmp_path / "txt", corpus[:1000], num_files=2)
    stories.write_story_files(tmp_path / "txt", corpus[1000:], num_files=1, jsonl=True)
    out = tmp_path / "out" / "tok.model"
    rc = tokenizer.main(["--input", str(tmp_path / "txt" / "*"), "--vocab_size", "700",
                         "--output", str(out)])
    assert rc == 0 and out.is_file()
    assert "700 pieces from 3 file(s)" in capsys.readouterr().out
    loaded = tokenizer.Tokenizer.load(out)
    assert loaded.vocab_size == 700
    assert loaded.decode(loaded.encode(corpus[-5:])) == corpus[-5:]


@pytest.mark.parametrize("case, message", [
    ("nomatch", "no files match the input pattern"),
    ("empty", "empty file"),
    ("latin1", r"not UTF-8: .*bad\.txt \(byte 2"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, capsys, case, message):
    (tmp_path / "good.txt").write_text("Lily saw a cat. " * 50)
    if case == "empty":
        (tmp_path / "bad.txt").write_bytes(b"")
    elif case == "latin1":
        (tmp_path / "bad.txt").write_bytes("Olá, Bär".encode("latin-1"))
    pattern = str(tmp_path / ("*.none" if case == "nomatch" else "*.txt"))
    rc = tokenizer.main(["--input", pattern, "--vocab_size", "300",
                         "--output", str(tmp_path / "tok.model")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "tok.model").exists()


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer model at"):
        tokenizer.Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        tokenizer.Tokenizer.load(tmp_path / "junk.model")


def test_vocab_mismatch_is_a_clear_error():
    tokenizer.check_vocab_size(8192, 8192)
    tokenizer.check_vocab_size(50304, 50257, allow_padding=True)
    with pytest.raises(DataError, match=r"model.vocab_size=64 but tok.model has 8192 .*"
                                        r"--config.model.vocab_size=8192"):
        tokenizer.check_vocab_size(64, 8192, source="tok.model")
    with pytest.raises(DataError, match="vocabulary mismatch"):
        tokenizer.check_vocab_size(50304, 50257)
    with pytest.raises(DataError, match="vocabulary mismatch"):  # smaller: never allowed
        tokenizer.check_vocab_size(100, 200, allow_padding=True)


def test_documents_of_txt_and_jsonl_files(tmp_path):
    docs = ["first story\nwith two lines", "second", "  third, with spaces  "]
    (txt,) = stories.write_story_files(tmp_path, docs)
    (jsonl,) = stories.write_story_files(tmp_path, docs, jsonl=True)
    assert text.read_documents(txt) == docs == text.read_documents(jsonl)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match="line 2 of .*bad.jsonl has no string field 'text'"):
        text.read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "blank.txt").write_text("\n  \n<|endoftext|>\n\n")
    with pytest.raises(DataError, match="empty file: .*blank.txt"):
        text.read_documents(tmp_path / "blank.txt")


def test_chunks_cut_between_documents(tmp_path):
    docs = stories.make_stories(300, seed=4)
    (txt,) = stories.write_story_files(tmp_path, docs)
    (jsonl,) = stories.write_story_files(tmp_path, docs, jsonl=True)
    for path in (txt, jsonl):
        bounds = text.chunk_boundaries(path, 2000)
        assert len(bounds) > 10 and bounds[0][0] == 0 and bounds[-1][1] == path.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        got = [d for start, end in bounds for d in text.read_chunk(path, start, end)]
        assert got == docs
