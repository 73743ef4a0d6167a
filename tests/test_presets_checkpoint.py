"""Every config and preset checkpoints into its workdir, so the same command resumes; time
spent evaluating or checkpointing is not counted as training time; URL workdirs are refused."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from config_loading import CONFIGS, load_config

from mmjax.config import config_module
from mmjax.train import loop
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.loop import Reporter, train_and_evaluate

LM_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.py") if p.name != "moons.py")


def _presets(name: str) -> list[str]:
    return [name, *(f"{name}:{p}" for p in config_module(name).PRESETS)]


@pytest.mark.parametrize("spec", [s for name in LM_CONFIGS for s in _presets(name)])
def test_every_preset_checkpoints_with_a_workdir(spec, tmp_path):
    config = loop.with_defaults(load_config(spec))
    assert config.checkpoint.save_every >= 0
    checkpointer = loop._make_checkpointer(config, str(tmp_path))
    try:
        assert isinstance(checkpointer, Checkpointer)
    finally:
        checkpointer.close()


def test_tiny_preset_resumes_and_overrides_save_every(tmp_path):
    """gpt2_small:tiny (not the embedded default) writes checkpoints; the same command with
    more steps resumes from the last one; save_every=0 keeps the final step."""
    config = load_config("gpt2_small.py:tiny")
    config.train.update(num_steps=3, log_every=1, eval_batches=1)
    config.model.update(num_layers=1, embed_dim=32, vocab_size=64)
    config.data.update(context_length=16)
    first = train_and_evaluate(config, str(tmp_path), progress=False)
    assert int(first["state"].step) == 3
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert saved[-1] == 3
    config.train.num_steps = 5
    config.checkpoint.save_every = 0
    resumed = train_and_evaluate(config, str(tmp_path), progress=False)
    assert [h["step"] for h in resumed["history"]] == [4, 5]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [*saved, 5]


@pytest.mark.parametrize("workdir", ["s3://b/x", "gs://bucket"])
def test_url_workdir_is_refused_before_anything_is_built(workdir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "Trainer", None)  # would fail if reached
    with pytest.raises(ValueError, match=rf"--workdir {workdir}: "):
        train_and_evaluate(load_config("gpt2_small.py:tiny"), workdir, progress=False)
    assert list(tmp_path.iterdir()) == []  # no mangled local "gs:" or "s3:" directory


def test_paused_time_counts_neither_in_tokens_per_second_nor_in_the_eta(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])

    class Writer:
        rows: list = []

        def write(self, step, metrics):
            self.rows.append((step, metrics["tokens_per_second"]))

    class Bar:
        unpaused = 0

        def set_postfix(self, **kwargs):
            pass

        def unpause(self):
            Bar.unpaused += 1

    writer = Writer()
    reporter = Reporter(writer, Bar(), log_every=1, tokens_per_step=100)
    metrics = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(0.0)}
    for step in (1, 2):  # step 1 is compilation: its rate is not reported
        reporter.record(step, metrics)
        clock[0] += 1.0
    reporter.check()
    with reporter.paused():  # an evaluation of 100 s
        clock[0] += 100.0
    for step in (3, 4):
        reporter.record(step, metrics)
        clock[0] += 1.0
    reporter.flush()
    rates = dict(writer.rows)
    assert rates[4] == pytest.approx(300 / 3.0)  # 3 steps in 3 s of training, not 103 s
    assert Bar.unpaused == 1
