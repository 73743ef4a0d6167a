"""The grain loader over a token store: coverage, process shares, resume, sharding, errors."""

import json
import unittest.mock as mock

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.data import PFACorpus, pipeline, prepare, stories, tokenizer
from mmjax.data.store import TokenStore, write_store
from mmjax.data.text import DataError

T, B = 16, 8
EOT = 0


@pytest.fixture(scope="module")
def unique_store(tmp_path_factory):
    """Documents of distinct ids (1..N), so every row tells where it starts in the stream."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=400)
    ids = np.arange(1, lengths.sum() + 1)
    docs = np.split(ids, np.cumsum(lengths)[:-1])
    path = tmp_path_factory.mktemp("unique") / "store"
    write_store(path, {"train": docs[:360], "val": docs[360:]}, vocab_size=1 << 16,
                eot_id=EOT)
    store = TokenStore(path)
    tokens = np.asarray(store.split("train").tokens)
    position = {int(t): i for i, t in enumerate(tokens) if t != EOT}
    return {"path": path, "store": store, "tokens": tokens, "position": position}


def row_start(row, position):
    j = next(j for j, t in enumerate(row) if t != EOT)
    return position[int(row[j])] - j


def config(path, **kw):
    return dict(corpus="tokens", path=str(path), vocab_size=1 << 16, context_length=T,
                batch_size=B, **kw)


def take(it, n):
    return [np.asarray(next(it)) for _ in range(n)]


def test_two_processes_read_disjoint_shares_whose_union_is_the_epoch(unique_store):
    rows = pipeline.Rows(unique_store["store"].split("train"), T, seed=5)
    steps = -(-2 * rows.count // B)  # two epochs and a bit
    starts = {}
    for p in (0, 1):
        it = pipeline.make_batches(config(unique_store["path"]), seed=5, process_index=p,
                                   process_count=2)
        batches = take(it, steps)
        assert batches[0].shape == (B // 2, T + 1) and batches[0].dtype == np.int32
        # process p holds rows p B/2 ... (p + 1) B/2 - 1 of every global batch k, which is
        # rows k B ... k B + B - 1 of the (multi-epoch) row stream
        for k, batch in enumerate(batches):
            for j, row in enumerate(batch):
                starts[k * B + p * (B // 2) + j] = row_start(row, unique_store["position"])
    n = rows.count
    epoch0 = [starts[g] for g in range(n)]
    epoch1 = [starts[g] for g in range(n, 2 * n)]
    share0 = {starts[g] for g in range(n) if g % B < B // 2}
    share1 = {starts[g] for g in range(n) if g % B >= B // 2}
    assert not share0 & share1 and len(share0) + len(share1) == n
    offset = min(epoch0)
    assert sorted(epoch0) == [offset + i * T for i in range(n)]  # the whole epoch, once
    assert 0 <= offset <= rows.slack
    assert epoch0 != sorted(epoch0)  # shuffled
    assert epoch1 != epoch0  # reshuffled (and shifted) each epoch
    # every token of the grid is a target exactly once per epoch
    targets = np.concatenate([np.arange(s + 1, s + T + 1) for s in epoch0])
    assert np.array_equal(np.sort(targets), np.arange(offset + 1, offset + n * T + 1))
    # the global batch does not depend on how many processes share it
    single = take(pipeline.make_batches(config(unique_store["path"]), seed=5,
                                        process_index=0, process_count=1), 2)
    for k in range(2):
        got = [row_start(r, unique_store["position"]) for r in single[k]]
        assert got == [starts[k * B + j] for j in range(B)]


def test_rows_are_the_store_tokens(unique_store):
    it = pipeline.make_batches(config(unique_store["path"]), seed=1)
    tokens = unique_store["tokens"]
    for batch in take(it, 3):
        for row in batch:
            s = row_start(row, unique_store["position"])
            np.testing.assert_array_equal(row, tokens[s:s + T + 1])


def test_validation_batches_are_in_store_order_and_repeatable(unique_store):
    val = unique_store["store"].split("val")
    a = take(pipeline.make_batches(config(unique_store["path"]), split="val"), 2)
    b = take(pipeline.make_batches(config(unique_store["path"]), split="val"), 2)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    np.testing.assert_array_equal(a[0][1], np.asarray(val.tokens[T:2 * T + 1]))


def test_documents_packing_never_mixes_documents(unique_store):
    split = unique_store["store"].split("train")
    doc_starts = set(np.asarray(split.doc_offsets[:-1]).tolist())
    lengths = split.document_lengths()
    rows = pipeline.Rows(split, T, packing="documents")
    assert rows.count == int(((lengths - 1) // T).sum())
    offsets = np.asarray(split.doc_offsets)
    expected = {int(offsets[d]) + j * T for d in range(len(lengths))
                for j in range((lengths[d] - 1) // T)}
    assert len(expected) == rows.count
    it = pipeline.make_batches(config(unique_store["path"], packing="documents"), seed=2)
    starts = []
    for batch in take(it, rows.count // B):  # all inside the first epoch
        for row in batch:
            assert EOT not in row[:-1]  # an end-of-text only as the very last target
            starts.append(row_start(row, unique_store["position"]))
    assert len(set(starts)) == len(starts) and set(starts) <= expected
    assert len(starts) > 0.8 * rows.count
    assert {s for s in starts if s in doc_starts}  # rows begin documents


def test_documents_packing_with_a_context_longer_than_every_document(unique_store):
    longest = int(unique_store["store"].split("train").document_lengths().max())
    with pytest.raises(DataError, match=rf"packing='documents' with context_length=100 is "
                                        rf"longer than every document .*longest: {longest} "
                                        rf"tokens"):
        pipeline.make_batches(dict(config(unique_store["path"], packing="documents"),
                                   context_length=100))
    with pytest.raises(ValueError, match="data.packing must be one of"):
        pipeline.make_batches(config(unique_store["path"], packing="sentences"))


def test_resume_sees_exactly_the_batches_of_an_uninterrupted_run(unique_store):
    cfg = config(unique_store["path"])
    uninterrupted = take(pipeline.make_batches(cfg, seed=3), 12)
    it = pipeline.make_batches(cfg, seed=3)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip
    resumed = pipeline.make_batches(cfg, seed=3)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(take(resumed, 5)), np.stack(uninterrupted[7:]))
    other = pipeline.make_batches(cfg, seed=4)
    with pytest.raises(ValueError, match="saved by another pipeline"):
        other.set_state(state)


def test_resume_with_worker_processes(unique_store):
    cfg = config(unique_store["path"], worker_count=2)
    plain = take(pipeline.make_batches(config(unique_store["path"]), seed=3), 9)
    it = pipeline.make_batches(cfg, seed=3)
    try:
        got = take(it, 4)
        state = it.get_state()
    finally:
        it.close()
    np.testing.assert_array_equal(np.stack(got), np.stack(plain[:4]))  # workers change nothing
    resumed = pipeline.make_batches(cfg, seed=3)
    try:
        resumed.set_state(state)
        np.testing.assert_array_equal(np.stack(take(resumed, 5)), np.stack(plain[4:]))
    finally:
        resumed.close()


def test_orbax_checkpoint_of_the_iterator(unique_store, tmp_path):
    """What the trainer does: the iterator saved beside the state, restored into a fresh one."""
    cfg = config(unique_store["path"])
    it = pipeline.make_batches(cfg, seed=9)
    take(it, 5)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 4)
    fresh = pipeline.make_batches(cfg, seed=9)
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    manager.close()
    np.testing.assert_array_equal(np.stack(take(fresh, 4)), np.stack(expected))


def test_global_batch_is_a_jax_array_on_the_sharding(unique_store):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data", None))
    it = pipeline.make_batches(config(unique_store["path"]), seed=1, sharding=sharding)
    assert it.local_rows.tolist() == list(range(B))  # read from the sharding
    batch = next(it)
    assert isinstance(batch, jax.Array) and batch.sharding == sharding
    assert batch.shape == (B, T + 1) and batch.dtype == np.int32
    plain = next(pipeline.make_batches(config(unique_store["path"]), seed=1))
    np.testing.assert_array_equal(np.asarray(batch), plain)
    with pytest.raises(ValueError, match="must be a multiple of the 3 processes"):
        pipeline.make_batches(config(unique_store["path"]), process_index=0, process_count=3)


@pytest.fixture(scope="module")
def story_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("stories")
    docs = stories.make_stories(400, seed=2)
    stories.write_story_files(root / "in", docs)
    tokenizer.train_tokenizer(docs, root / "tok.model", vocab_size=600)
    prepare.prepare(str(root / "in" / "*"), root / "tok.model", root / "store",
                    progress=False)
    return root / "store"


def test_vocab_mismatch_and_ids_outside_the_vocabulary(story_store, tmp_path):
    cfg = dict(corpus="tokens", path=str(story_store), vocab_size=512, context_length=T,
               batch_size=B)
    with pytest.raises(DataError, match=r"model.vocab_size=512 but the token store .* has "
                                        r"600 token ids"):
        pipeline.make_batches(cfg)
    next(pipeline.make_batches(dict(cfg, vocab_size=640, allow_vocab_padding=True)))
    # a store whose manifest understates its ids: caught at the host boundary, not on device
    lying = tmp_path / "lying"
    lying.mkdir()
    for f in story_store.iterdir():
        (lying / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((lying / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 300
    (lying / "manifest.json").write_text(json.dumps(manifest))
    it = pipeline.make_batches(dict(cfg, path=str(lying), vocab_size=300), seed=0)
    with pytest.raises(DataError, match=r"token id \d+ outside the model vocabulary \[0, 300\) "
                                        r"in batch 0 of the train split"):
        next(it)


def test_bad_store_paths(story_store, tmp_path):
    cfg = dict(corpus="tokens", vocab_size=600, context_length=T, batch_size=B)
    with pytest.raises(DataError, match="needs data.path"):
        pipeline.make_batches(cfg)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.tokens").write_bytes(b"\0" * 64)
    with pytest.raises(DataError, match="has no manifest.json"):
        pipeline.make_batches(dict(cfg, path=str(tmp_path / "half")))
    with pytest.raises(DataError, match=r"holds \d+ tokens, fewer than context_length \+ 1"):
        pipeline.make_batches(dict(cfg, path=str(story_store), context_length=10**7))


def test_synthetic_corpus_behind_the_same_interface():
    cfg = dict(corpus="pfa", corpus_options=dict(num_states=4, edges_per_state=3),
               vocab_size=64, context_length=T, batch_size=B)
    corpus = PFACorpus(vocab_size=64, num_states=4, edges_per_state=3, seed=7)
    it = pipeline.make_batches(cfg, seed=7)
    for step in range(3):
        np.testing.assert_array_equal(next(it), corpus.batch(step, B, T + 1))
    state = it.get_state()
    resumed = pipeline.make_batches(cfg, seed=7)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed), corpus.batch(3, B, T + 1))
    val = pipeline.make_batches(cfg, seed=7, split="val")
    np.testing.assert_array_equal(next(val), corpus.batch(0, B, T + 1, split="eval"))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = pipeline.make_batches(cfg, seed=7, sharding=NamedSharding(
        mesh, PartitionSpec("data")))
    np.testing.assert_array_equal(np.asarray(next(sharded)), corpus.batch(0, B, T + 1))


class FakeDevice:
    def __init__(self, process_index):
        self.process_index = process_index


class FakeSharding:
    """What rows_by_process reads from a sharding: every device's rows and its process."""

    def __init__(self, rows):  # [(process, start, stop)] per device
        self.rows = rows

    def devices_indices_map(self, shape):
        return {FakeDevice(p): (slice(a, b), slice(None)) for p, a, b in self.rows}


def test_rows_by_process_from_the_sharding():
    by = pipeline.rows_by_process(FakeSharding([(0, 0, 2), (1, 2, 4), (0, 4, 6), (1, 6, 8)]),
                                  8, T + 1)
    assert {p: r.tolist() for p, r in by.items()} == {0: [0, 1, 4, 5], 1: [2, 3, 6, 7]}
    # tensor parallelism: two devices of a process hold the same rows
    by = pipeline.rows_by_process(FakeSharding([(0, 0, 4), (0, 0, 4), (1, 4, 8), (1, 4, 8)]),
                                  8, T + 1)
    assert {p: r.tolist() for p, r in by.items()} == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert pipeline.process_rows(None, 8, T + 1, process_index=1, process_count=4).tolist() \
        == [2, 3]


def test_a_process_reads_its_scattered_rows_of_the_global_batch(unique_store):
    """Rows spread over the batch (a real slice's device order): each process's local rows,
    placed at their row indices, make exactly the one-process global batch."""
    single = take(pipeline.make_batches(config(unique_store["path"]), seed=2), 3)
    layout = {0: [0, 1, 4, 5], 1: [2, 3, 6, 7]}
    assembled = np.zeros_like(np.stack(single))
    for p, rows in layout.items():
        sharding = FakeSharding([(q, r, r + 1) for q, rs in layout.items() for r in rs])
        with mock.patch.object(jax, "process_index", return_value=p):
            it = pipeline.TextBatches(unique_store["store"], split="train", context_length=T,
                                      batch_size=B, vocab_size=1 << 16, seed=2,
                                      sharding=sharding)
        assert it.local_rows.tolist() == rows
        for k in range(3):
            assembled[k, rows] = it.next_local()
    np.testing.assert_array_equal(assembled, np.stack(single))


def test_resume_on_another_process_count_and_worker_count(unique_store):
    """A state saved by one of 4 processes resumes 2 processes with workers: the same
    global batches as an uninterrupted one-process run."""
    cfg = config(unique_store["path"])
    straight = np.stack(take(pipeline.make_batches(cfg, seed=6), 7))
    it = pipeline.make_batches(cfg, seed=6, process_index=3, process_count=4)
    take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    halves = []
    for p in (0, 1):
        resumed = pipeline.make_batches(dict(cfg, worker_count=1 if p else 0), seed=6,
                                        process_index=p, process_count=2)
        try:
            resumed.set_state(state)
            halves.append(np.stack(take(resumed, 3)))
        finally:
            resumed.close()
    np.testing.assert_array_equal(np.concatenate(halves, axis=1), straight[4:])


def test_a_changed_batch_size_is_named(unique_store):
    it = pipeline.make_batches(config(unique_store["path"]), seed=6)
    take(it, 2)
    other = pipeline.make_batches(dict(config(unique_store["path"]), batch_size=2 * B), seed=6)
    with pytest.raises(ValueError, match=rf"data.batch_size \({B} -> {2 * B}\) changed"):
        other.set_state(it.get_state())


def test_config_dict_sections_are_accepted(unique_store):
    import ml_collections

    cfg = ml_collections.ConfigDict(config(unique_store["path"], packing="windows"))
    a = next(pipeline.make_batches(cfg, seed=1))
    np.testing.assert_array_equal(a, next(pipeline.make_batches(config(unique_store["path"]),
                                                                seed=1)))


def test_vocab_size_from_the_model_config(unique_store):
    cfg = config(unique_store["path"])
    del cfg["vocab_size"]  # said once, in model.vocab_size
    a = next(pipeline.make_batches(cfg, vocab_size=1 << 16, seed=1))
    np.testing.assert_array_equal(a, next(pipeline.make_batches(config(unique_store["path"]),
                                                                seed=1)))
    with pytest.raises(ValueError, match=r"needs vocab_size= \(the model's vocabulary\)"):
        pipeline.make_batches(cfg)
    with pytest.raises(DataError, match="model.vocab_size=1000 but the token store"):
        pipeline.make_batches(cfg, vocab_size=1000)
