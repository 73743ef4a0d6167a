"""The trainer on real text: token stores behind make_batches, resume, fine-tuning, bad input.

Everything runs on generated stories (``mmjax.data.stories``), on CPU: ``train_and_evaluate``
resumed mid-run equals an uninterrupted run bit for bit (the grain iterator's state is in
every checkpoint), ``train.init_from`` starts a run from another run's parameters, and every
bad input stops ``Trainer.__init__`` with one line before anything is compiled.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from config_loading import load_config

from mmjax.config import default_config
from mmjax.data import DataError, stories
from mmjax.data.store import write_store
from mmjax.train.loop import Trainer, train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parent.parent
CONTEXT, BATCH = 32, 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    store_dir, tok = stories.make_story_store(root, 600, seed=3)
    return {"path": str(store_dir), "vocab_size": tok.vocab_size, "root": root}


def text_config(store, num_steps=8, **model):
    """``mm_v1_small.py:tiny_text`` shrunk further, on the test store."""
    config = load_config("mm_v1_small.py:tiny_text")
    config.model.update(dict(vocab_size=store["vocab_size"], num_layers=1, embed_dim=32,
                             pmem_size=64) | model)
    config.data.update(dict(path=store["path"], context_length=CONTEXT, batch_size=BATCH,
                            allow_vocab_padding=False))
    config.optimizer.update(dict(warmup_steps=2, total_steps=8))
    config.train.update(dict(num_steps=num_steps, log_every=1, eval_every=0, eval_batches=2))
    config.checkpoint.save_every = 2
    return config


def leaves(tree):
    return jax.tree.leaves(jax.device_get(tree))


def test_resumed_text_run_equals_an_uninterrupted_one(store, tmp_path):
    """Stop at step 3 (between checkpoints: the final one is forced), rerun to 8: the batches
    after the resume are those of the straight run (same losses) and the parameters are
    bit-identical."""
    config = text_config(store, num_steps=8)
    config.train.eval_every = 4  # evaluations must not move the train stream
    straight = train_and_evaluate(config, str(tmp_path / "a"), progress=False)
    config.train.num_steps = 3
    first = train_and_evaluate(config, str(tmp_path / "b"), progress=False)
    saved = tmp_path / "b" / "checkpoints" / "3" / "data_state" / "metadata"
    assert json.loads(saved.read_text())["batches"] == 3  # the position after three steps
    config.train.num_steps = 8
    resumed = train_and_evaluate(config, str(tmp_path / "b"), progress=False)
    assert [h["step"] for h in resumed["history"]] == list(range(4, 9))
    losses = {h["step"]: h["loss"] for h in first["history"] + resumed["history"]}
    assert losses == {h["step"]: h["loss"] for h in straight["history"]}
    for a, b in zip(leaves(straight["state"].params), leaves(resumed["state"].params)):
        np.testing.assert_array_equal(a, b)
    assert straight["eval_loss"] == resumed["eval_loss"]


def test_every_checkpoint_holds_the_loader_position(store, tmp_path):
    """Each step's checkpoint holds the iterator state after that step's batch (without it a
    resumed run would restart the stream at batch 0)."""
    config = text_config(store, num_steps=2)
    config.checkpoint.save_every = 1
    train_and_evaluate(config, str(tmp_path / "a"), progress=False)
    for step in (1, 2):
        path = tmp_path / "a" / "checkpoints" / str(step) / "data_state" / "metadata"
        assert json.loads(path.read_text())["batches"] == step


def test_evaluation_reads_the_validation_split(store):
    trainer = Trainer(text_config(store))
    try:
        val = np.asarray(trainer.val_batches.store.split("val").tokens, np.int32)
        trainer.val_batches.set_state(trainer._val_start)
        first = np.asarray(next(trainer.val_batches))
        # in store order, windows of T + 1 tokens at stride T
        expected = np.stack([val[i * CONTEXT:i * CONTEXT + CONTEXT + 1] for i in range(BATCH)])
        np.testing.assert_array_equal(first, expected)
        state = trainer.init_state()
        a, b = trainer.evaluate(state.params), trainer.evaluate(state.params)
        assert a["eval_loss"] == b["eval_loss"]  # the same batches at every evaluation
    finally:
        trainer.close()


def test_synthetic_checkpoint_without_a_data_item_resumes_by_step(tmp_path):
    """Checkpoints written before the iterator state was saved still resume a synthetic
    run exactly (its batches are a pure function of the step)."""
    config = default_config()
    config.model.update(dict(vocab_size=16, num_layers=1, num_heads=2, embed_dim=16,
                             pmem_size=8))
    config.data.update(dict(context_length=16, batch_size=8))
    config.optimizer.update(dict(warmup_steps=2, total_steps=6))
    config.train.update(dict(num_steps=6, log_every=1, eval_every=0, eval_batches=1))
    config.checkpoint.save_every = 3
    straight = train_and_evaluate(config, str(tmp_path / "a"), progress=False)
    config.train.num_steps = 3
    train_and_evaluate(config, str(tmp_path / "b"), progress=False)
    data_item = tmp_path / "b" / "checkpoints" / "3" / "data_state"
    assert data_item.is_dir()
    for f in data_item.iterdir():
        f.unlink()
    data_item.rmdir()
    config.train.num_steps = 6
    resumed = train_and_evaluate(config, str(tmp_path / "b"), progress=False)
    for a, b in zip(leaves(straight["state"].params), leaves(resumed["state"].params)):
        np.testing.assert_array_equal(a, b)


def test_resume_with_another_worker_count_and_an_older_data_item(store, tmp_path):
    """The loader's position does not depend on data.worker_count (nor on the host count):
    a run saved without workers resumes with one, at its step, nothing set aside; an older
    checkpoint's grain item (per-process files) resumes at its batch count."""
    config = text_config(store, num_steps=6)
    straight = train_and_evaluate(config, str(tmp_path / "a"), progress=False)
    for name, older in (("b", False), ("c", True)):
        config.train.num_steps, config.data.worker_count = 4, 0
        train_and_evaluate(config, str(tmp_path / name), progress=False)
        step_dir = tmp_path / name / "checkpoints" / "4"
        if older:  # what earlier versions wrote: grain's per-process JSON files
            saved = json.loads((step_dir / "data_state" / "metadata").read_text())
            for f in (step_dir / "data_state").iterdir():
                f.unlink()
            (step_dir / "data_state").rmdir()
            (step_dir / "data").mkdir()
            (step_dir / "data" / "process_0-of-1.json").write_text(json.dumps(
                {"pipeline": "0123456789abcdef", "batches": saved["batches"], "grain": {}}))
        config.train.num_steps, config.data.worker_count = 6, 0 if older else 1
        resumed = train_and_evaluate(config, str(tmp_path / name), progress=False)
        assert [h["step"] for h in resumed["history"]] == [5, 6]
        assert not (tmp_path / name / "corrupt_checkpoints").exists()
        for a, b in zip(leaves(straight["state"].params), leaves(resumed["state"].params)):
            np.testing.assert_array_equal(a, b)


def test_a_changed_batch_size_is_one_line_and_moves_nothing(store, tmp_path):
    config = text_config(store, num_steps=2)
    train_and_evaluate(config, str(tmp_path), progress=False)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    config.train.num_steps, config.data.batch_size = 4, 2 * BATCH
    with pytest.raises(ValueError, match=rf"checkpoint step 2 in .*data.batch_size "
                                         rf"\({BATCH} -> {2 * BATCH}\) changed"):
        train_and_evaluate(config, str(tmp_path), progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == saved
    assert not (tmp_path / "corrupt_checkpoints").exists()


# ---------------------------------------------------------------------------- bad input


@pytest.fixture
def no_compile(monkeypatch):
    """Fail the test if Trainer gets as far as building (compiling) its steps."""
    def build(self):
        pytest.fail("Trainer compiled before the data error")

    monkeypatch.setattr(Trainer, "_build_steps", build)


def one_line_error(config, match, error=DataError):
    with pytest.raises(error, match=match) as info:
        Trainer(config)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_data_path_names_the_key(store, no_compile):
    config = text_config(store)
    config.data.path = ""
    one_line_error(config, r"data\.path")


def test_store_without_manifest(store, tmp_path, no_compile):
    config = text_config(store)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.tokens").write_bytes(b"\0\0")
    config.data.path = str(tmp_path / "half")
    one_line_error(config, "no manifest.json")


@pytest.mark.parametrize("delta", [+8, -8])
def test_tokenizer_vocab_differs_from_the_model(store, delta, no_compile):
    config = text_config(store, vocab_size=store["vocab_size"] + delta)
    message = one_line_error(config, "vocabulary mismatch")
    assert f"model.vocab_size={store['vocab_size'] + delta}" in message
    assert f"--config.model.vocab_size={store['vocab_size']}" in message  # the fix


def test_padding_accepts_a_larger_model_vocab_only(store, no_compile):
    config = text_config(store, vocab_size=store["vocab_size"] - 8)
    config.data.allow_vocab_padding = True
    one_line_error(config, "vocabulary mismatch")
    config.model.vocab_size = store["vocab_size"] + 8
    with pytest.raises(pytest.fail.Exception, match="compiled"):
        Trainer(config)  # accepted: got as far as compiling


def test_token_ids_outside_the_model_vocabulary(store, tmp_path, no_compile):
    """A store whose ids exceed the vocabulary its manifest declares (e.g. written by another
    tool) is stopped at start-up, before compilation, naming the id."""
    rng = np.random.default_rng(0)
    docs = {"train": [rng.integers(0, 600, size=100) for _ in range(10)],
            "val": [rng.integers(0, 600, size=100) for _ in range(2)]}
    write_store(tmp_path / "bad", docs, vocab_size=600, eot_id=0)
    manifest = json.loads((tmp_path / "bad" / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 512
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(manifest))
    config = text_config(store, vocab_size=512)
    config.data.path = str(tmp_path / "bad")
    one_line_error(config, r"token id 5\d\d outside the model vocabulary \[0, 512\)")


# ---------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def pretrained(store, tmp_path_factory):
    """A text run of 4 steps (checkpoints at 2 and 4); the parameters at step 2 and 4."""
    workdir = tmp_path_factory.mktemp("pretrained")
    config = text_config(store, num_steps=2)
    at2 = leaves(train_and_evaluate(config, str(workdir), progress=False)["state"].params)
    config.train.num_steps = 4
    at4 = leaves(train_and_evaluate(config, str(workdir), progress=False)["state"].params)
    return {"workdir": workdir, "at2": at2, "at4": at4}


def test_init_from_a_workdir_takes_its_latest_parameters(store, pretrained, tmp_path):
    config = text_config(store, num_steps=0)
    config.train.init_from = str(pretrained["workdir"])
    out = train_and_evaluate(config, str(tmp_path / "ft"), progress=False)
    assert int(out["state"].step) == 0
    for a, b in zip(pretrained["at4"], leaves(out["state"].params)):
        np.testing.assert_array_equal(a, b)
    # a fresh optimiser: Adam's moments are zero
    assert all(not np.any(x) for x in leaves(out["state"].opt_state)
               if np.asarray(x).ndim > 0)


def test_init_from_a_step_directory_at_a_longer_context(store, pretrained, tmp_path):
    """The v2 paper's fine-tuning, in small: another run's parameters, twice the context."""
    config = text_config(store, num_steps=2)
    config.data.context_length = 2 * CONTEXT
    config.train.init_from = str(pretrained["workdir"] / "checkpoints" / "2")
    config0 = config.copy_and_resolve_references()
    config0.train.num_steps = 0
    start = train_and_evaluate(config0, None, progress=False)
    for a, b in zip(pretrained["at2"], leaves(start["state"].params)):
        np.testing.assert_array_equal(a, b)
    out = train_and_evaluate(config, str(tmp_path / "ft"), progress=False)
    assert [h["step"] for h in out["history"]] == [1, 2]
    assert out["eval_loss_per_position"].shape == (2 * CONTEXT,)
    # the new workdir has a checkpoint now: a rerun resumes it and ignores init_from
    config.train.update(num_steps=3, init_from=str(tmp_path / "nowhere"))
    again = train_and_evaluate(config, str(tmp_path / "ft"), progress=False)
    assert [h["step"] for h in again["history"]] == [3]


def test_init_from_a_model_of_another_shape_names_the_parameter(store, pretrained, tmp_path):
    config = text_config(store, num_steps=1, embed_dim=48)
    config.train.init_from = str(pretrained["workdir"])
    with pytest.raises(ValueError, match=r"parameter params/\S+ has shape \(32, [\d, ]+\) "
                                         r"in the checkpoint but \(48, [\d, ]+\) in this "
                                         r"model"):
        train_and_evaluate(config, str(tmp_path / "ft"), progress=False)


def test_init_from_nowhere(store, tmp_path):
    config = text_config(store, num_steps=1)
    config.train.init_from = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train.init_from"):
        train_and_evaluate(config, str(tmp_path / "ft"), progress=False)


# ---------------------------------------------------------------------------- the CLI


def run_cli(*args, cwd):
    env = dict(os.environ)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_tokenizer_prepare_train(tmp_path):
    """The README's three commands, end to end, for a few steps."""
    stories.write_story_files(tmp_path / "text", stories.make_stories(800, seed=9),
                              num_files=2)
    pattern = str(tmp_path / "text" / "*.txt")
    tok = run_cli("-m", "mmjax.data.tokenizer", "--input", pattern, "--vocab_size", "4096",
                  "--output", str(tmp_path / "tok.model"), cwd=REPO)
    assert tok.returncode == 0, tok.stderr
    prep = run_cli("-m", "mmjax.data.prepare", "--input", pattern, "--tokenizer",
                   str(tmp_path / "tok.model"), "--output", str(tmp_path / "store"),
                   "--workers", "1", "--no_progress", cwd=REPO)
    assert prep.returncode == 0, prep.stderr
    train = run_cli("-m", "mmjax.train", "--config", "configs/mm_v1_small.py:tiny_text",
                    f"--config.data.path={tmp_path / 'store'}", "--config.train.num_steps=4",
                    "--config.train.log_every=2", "--config.data.batch_size=8",
                    "--config.train.eval_batches=1", "--config.checkpoint.save_every=2",
                    "--workdir", str(tmp_path / "run"), cwd=REPO)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "final (step 4)" in train.stdout + train.stderr
    assert (tmp_path / "run" / "checkpoints" / "4" / "data_state").is_dir()
    # the same command without the store: one line naming the key, before compiling
    missing = run_cli("-m", "mmjax.train", "--config", "configs/mm_v1_small.py:tiny_text",
                      cwd=REPO)
    assert missing.returncode != 0
    assert "data.path" in missing.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------- configs


def test_text_configs_read_a_store():
    for spec in ("mm_v1_small.py", "gpt2_small.py", "mmv2.py", "mmv2.py:large",
                 "mm_v1_small.py:tiny_text", "gpt2_small.py:tiny_text",
                 "mmv2.py:tiny_text"):
        config = load_config(spec)
        assert config.data.corpus == "tokens" and config.data.path == "", spec
        assert config.train.init_from == "", spec
    v1 = load_config("mm_v1_small.py")
    assert (v1.data.context_length, v1.data.batch_size, v1.train.num_steps) == (512, 512, 80_000)
    assert load_config("mm_v1_small.py:tiny").data.corpus == "pfa"  # the embedded default


def test_v2_token_budgets_and_finetune_presets():
    small, large = load_config("mmv2.py"), load_config("mmv2.py:large")
    tokens = 1024 * 4096
    assert small.train.num_steps * tokens >= 200e9 > (small.train.num_steps - 1) * tokens
    assert large.train.num_steps * tokens >= 1e12 > (large.train.num_steps - 1) * tokens
    assert small.optimizer.total_steps == small.train.num_steps
    assert load_config("mmv2.py:finetune").data.context_length == 32768
    tiny = load_config("mmv2.py:tiny_text")
    assert load_config("mmv2.py:tiny_text,finetune").data.context_length == (
        2 * tiny.data.context_length)


def test_v2_finetune_preset_starts_from_a_pretrained_run(store, tmp_path):
    """``mmv2.py:tiny_text`` pre-trained, then ``:tiny_text,finetune`` (twice the
    context) from its parameters: the v2 paper's 4k -> 32k recipe in small."""
    def v2(spec, steps):
        config = load_config(spec)
        config.data.update(dict(path=store["path"], batch_size=BATCH))
        config.model.num_layers = 1
        config.train.update(dict(num_steps=steps, log_every=1, eval_every=0, eval_batches=1))
        config.checkpoint.save_every = steps
        return config

    pre = train_and_evaluate(v2("mmv2.py:tiny_text", 2), str(tmp_path / "pre"),
                             progress=False)
    config = v2("mmv2.py:tiny_text,finetune", 1)
    assert config.data.context_length == 2 * pre["eval_loss_per_position"].shape[0]
    config.train.init_from = str(tmp_path / "pre")
    config.train.num_steps = 0
    start = train_and_evaluate(config, None, progress=False)
    assert int(start["state"].step) == 0
    for a, b in zip(leaves(pre["state"].params), leaves(start["state"].params)):
        np.testing.assert_array_equal(a, b)
