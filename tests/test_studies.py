"""The v2 studies (mmjax.eval.studies, mmjax.eval.multidoc): equal model sizes, the
reporting over seeds, and the multidoc command end to end on a few steps."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from mmjax.config import STUDY_MODELS, study_config
from mmjax.eval import finetune_speed, icl_anonymized, multidoc, studies
from mmjax.eval.__main__ import main, parse_args
from mmjax.models import build_model


def _params(config) -> int:
    model = build_model(config.model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def test_the_study_models_have_equal_parameters_within_one_percent():
    counts = {name: _params(study_config(name)) for name in STUDY_MODELS}
    assert max(counts.values()) <= 1.01 * min(counts.values()), counts
    names = {study_config(name).model.name for name in STUDY_MODELS}
    assert names == {"memory_mosaic_v2", "llama", "llama_short_long", "memory_mosaic"}
    assert not study_config("v2_no_long_term").model.long_term


def test_a_study_trains_600_steps_unless_told():
    from mmjax.config import STUDY_STEPS
    from mmjax.eval.__main__ import parse_args

    assert STUDY_STEPS == 600 and study_config().train.num_steps == 600
    assert parse_args(["icl_anonymized"]).steps == 600
    assert parse_args(["multidoc", "--steps", "50"]).steps == 50


def test_the_study_config_names_its_corpus():
    assert study_config("llama", corpus="episodes").data.corpus == "episodes"
    assert study_config().data.corpus == "multidoc" and study_config().model.vocab_size == 128
    with pytest.raises(ValueError, match="corpus must be one of"):
        study_config(corpus="recall")


def test_unequal_models_are_refused():
    small = studies.TrainedModel("a", None, {}, 100, 0.0, 0.0)
    large = studies.TrainedModel("b", None, {}, 103, 0.0, 0.0)
    studies.check_equal_size([small, studies.TrainedModel("c", None, {}, 101, 0.0, 0.0)])
    with pytest.raises(ValueError, match="differ by more than 2%"):
        studies.check_equal_size([small, large])


def test_summary_and_table_give_mean_and_std_over_seeds():
    rows = [{"model": "v2", "seed": s, "x": 512, "value": v} for s, v in ((0, 0.5), (1, 1.0))]
    rows.append({"model": "llama", "seed": 0, "x": 1024, "value": 0.25})
    assert studies.summary(rows) == {"v2": {512: (0.75, 0.25, 2)},
                                     "llama": {1024: (0.25, 0.0, 1)}}
    table = studies.format_table(rows, "context", {"transformer": {512: 0.4, 1024: None}})
    assert "| v2 | 0.750 ± 0.250 | - | 2 |" in table
    assert "| llama | - | 0.250 ± 0.000 | 1 |" in table
    assert "| paper: transformer | 0.400 | - | |" in table


def test_multidoc_questions_are_the_same_for_every_model_and_seeded():
    assert multidoc.tasks(0, 64, 3) == multidoc.tasks(0, 64, 3)
    assert multidoc.tasks(0, 64, 3) != multidoc.tasks(1, 64, 3)
    assert all(len(prompt) == 64 for prompt, _ in multidoc.tasks(0, 64, 3))


def test_multidoc_run_measures_every_model_at_every_context(monkeypatch, tmp_path):
    """The study's wiring on untrained models (training itself: the command test below)."""
    def untrained(name, config):
        model = build_model(config.model)
        params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        assert config.train.num_steps == 3 and config.train.seed == 5
        return studies.TrainedModel(name, model, params, _params(config), 0.0, 0.0)

    monkeypatch.setattr(studies, "train", untrained)
    rows = multidoc.run(seeds=(5,), steps=3, models=("llama",), contexts=(32, 48),
                        num_tasks=2, output=str(tmp_path), log=lambda _: None)
    assert [(r["model"], r["x"]) for r in rows] == [("llama", 32), ("llama", 48)]
    assert all(r["seed"] == 5 and 0.0 <= r["value"] <= 1.0 for r in rows)
    assert (tmp_path / "multidoc.png").exists() and (tmp_path / "multidoc.json").exists()


def test_the_multidoc_command_trains_measures_and_writes(tmp_path, capsys):
    out = tmp_path / "md"
    assert main(["multidoc", "--seeds", "0", "--steps", "2", "--models", "v2,v1",
                 "--contexts", "64,128", "--tasks", "2", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| v2 |" in table and "| v1 |" in table and "paper: memory_mosaic_v2" in table
    saved = json.loads((out / "multidoc.json").read_text())
    assert {(r["model"], r["x"]) for r in saved["rows"]} == {
        (m, c) for m in ("v2", "v1") for c in (64, 128)}
    assert all(0.0 <= r["value"] <= 1.0 and r["params"] > 100_000 for r in saved["rows"])
    assert (out / "multidoc.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["multidoc", "--models", "gpt2"], "unknown model 'gpt2'"),
    (["multidoc", "--steps", "0"], "--steps, --tasks and --contexts must be >= 1"),
    (["icl_anonymized", "--shots", "0"], "--steps, --tasks and --shots must be >= 1"),
    (["icl_anonymized", "--models", "mm"], "unknown model 'mm'"),
    (["finetune_speed", "--learning_rates", "0"], "expected positive numbers"),
])
def test_bad_multidoc_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_icl_tasks_are_held_out_episodes_of_equal_length():
    from mmjax.data.episodes import Classes

    tokens, answers, candidates = icl_anonymized.tasks(0, 4, 5, anonymised=True)
    assert tokens.shape == (5, 4 * 8 + 7) and candidates.shape == (5, 4)
    assert all(a in c for a, c in zip(answers, candidates, strict=True))
    semantic = icl_anonymized.tasks(0, 4, 5, anonymised=False)[2]
    held_out = {Classes().semantic_label(c) for c in Classes().held_out}
    assert set(semantic.ravel()) <= held_out


def test_icl_accuracy_reads_the_best_candidate_logit():
    """A model whose logits favour one token: right exactly where that token is the answer."""
    import numpy as np

    class Favours:
        def apply(self, variables, tokens):
            logits = jnp.zeros(tokens.shape + (128,))
            return logits.at[..., 100].set(1.0)

    candidates = np.array([[100, 101], [101, 100], [102, 103]])
    answers = np.array([100, 101, 102])
    acc = icl_anonymized.accuracy(Favours(), {}, np.zeros((3, 5), np.int32), answers,
                                  candidates, batch_size=2)
    assert acc == pytest.approx(2 / 3)  # right, wrong, and a tie resolved to the first


def test_icl_anonymized_run_measures_both_label_kinds_at_every_shot(monkeypatch, tmp_path):
    def untrained(name, config):
        model = build_model(config.model)
        params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        assert config.data.corpus == "episodes"
        return studies.TrainedModel(name, model, params, _params(config), 0.0, 0.0)

    monkeypatch.setattr(studies, "train", untrained)
    rows = icl_anonymized.run(seeds=(0,), steps=2, models=("llama",), shots=(1, 2),
                              num_tasks=4, output=str(tmp_path), log=lambda _: None)
    assert [(r["model"], r["x"]) for r in rows] == [
        ("llama, semantic", 1), ("llama, semantic", 2), ("llama, anonymised", 1),
        ("llama, anonymised", 2)]
    assert (tmp_path / "icl_anonymized.png").exists()


def _untrained(name, config):
    model = build_model(config.model)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return studies.TrainedModel(name, model, params, _params(config), 0.0, 0.0)


def test_finetuning_runs_on_the_new_domain_at_a_constant_rate():
    config = finetune_speed.finetune_config("llama", steps=8, seed=1)
    assert config.data.corpus_options["domain"] == "new"
    assert config.optimizer.learning_rate == config.optimizer.min_lr
    assert config.optimizer.warmup_steps == 0 and config.train.seed == 1
    assert finetune_speed.FINETUNE_ROWS == 4  # rounded up to the devices of the test run
    assert config.data.batch_size == max(4, jax.device_count())


def test_finetune_speed_run_measures_each_model_after_each_number_of_batches(monkeypatch,
                                                                            tmp_path):
    monkeypatch.setattr(studies, "train", _untrained)
    rows = finetune_speed.run(seeds=(0,), pretrain_steps=2, batches=(0, 2), models=("llama",),
                              num_tasks=8, output=str(tmp_path), log=lambda _: None)
    assert [(r["model"], r["x"]) for r in rows] == [("llama", 0), ("llama", 2)]
    assert all(0.0 <= r["value"] <= 1.0 for r in rows)
    assert (tmp_path / "finetune_speed.png").exists()


def test_finetuning_teaches_the_new_classes():
    """Zero-shot accuracy on the held-out classes rises from chance as fine-tuning goes on."""
    pretrained = _untrained("llama", finetune_speed.finetune_config("llama", steps=1))
    config = finetune_speed.finetune_config("llama", steps=150)
    config.optimizer.update(learning_rate=3e-3, min_lr=3e-3)
    curve = finetune_speed.finetune_curve(pretrained, config, (0, 150), seed=0, num_tasks=128)
    assert curve[0] < 0.4 and curve[150] > curve[0] + 0.15, curve  # from chance (0.25)


def test_every_model_gets_the_same_rates_and_keeps_its_best(monkeypatch):
    seen = []

    def fake(name, config):
        rate = config.optimizer.learning_rate
        seen.append((name, rate))
        best = 1e-3 if name == "llama" else 3e-3
        return studies.TrainedModel(name, None, {}, 100, abs(rate - best), 0.0)

    monkeypatch.setattr(studies, "train", fake)
    got = list(studies.trained_models(("v2", "llama"), corpus="multidoc", steps=2, seed=0,
                                      learning_rates=(1e-3, 3e-3)))
    assert seen == [("v2", 1e-3), ("v2", 3e-3), ("llama", 1e-3), ("llama", 3e-3)]
    assert [(m.name, m.learning_rate) for m in got] == [("v2", 3e-3), ("llama", 1e-3)]
    assert parse_args(["multidoc", "--learning_rates", "1e-3,3e-3"]).learning_rates == [
        1e-3, 3e-3]


def _run(tmp_path, name, seed, rows_by_model):
    rows = [{"model": m, "seed": seed, "x": x, "value": v}
            for m, by_x in rows_by_model.items() for x, v in by_x.items()]
    studies.write(rows, str(tmp_path / f"{name}{seed}"), name, x_label="shots",
                  y_label="accuracy", title="t", x_scale="linear")
    return tmp_path / f"{name}{seed}"


def test_runs_of_one_seed_each_merge_into_one_table(tmp_path, capsys):
    first = _run(tmp_path, "icl_anonymized", 0, {"v2": {1: 0.5, 2: 0.75}})
    second = _run(tmp_path, "icl_anonymized", 1, {"v2": {1: 1.0, 2: 0.75}})
    out = tmp_path / "merged"
    assert main(["merge", str(first), str(second / "icl_anonymized.json"),
                 "--output", str(out)]) == 0
    assert "| v2 | 0.750 ± 0.250 | 0.750 ± 0.000 | 2 |" in capsys.readouterr().out
    saved = json.loads((out / "icl_anonymized.json").read_text())
    assert len(saved["rows"]) == 4 and saved["x_scale"] == "linear"
    assert (out / "icl_anonymized.png").stat().st_size > 0


def test_merge_refuses_overlapping_or_foreign_runs(tmp_path):
    first = _run(tmp_path, "icl_anonymized", 0, {"v2": {1: 0.5}})
    again = _run(tmp_path, "icl_anonymized", 0, {"v2": {1: 0.5}})
    with pytest.raises(ValueError, match="model 'v2' seed 0 at 1 is already in"):
        studies.merge([first, first / "icl_anonymized.json"], str(tmp_path / "m"))
    other = _run(tmp_path, "multidoc", 1, {"v2": {512: 0.5}})
    with pytest.raises(ValueError, match="a multidoc run, not icl_anonymized"):
        studies.merge([again, other], str(tmp_path / "m"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not a study's JSON"):
        studies.merge([tmp_path / "bad.json"], str(tmp_path / "m"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected one study JSON, found 0"):
        studies.merge([tmp_path / "empty"], str(tmp_path / "m"))


def test_a_stopped_study_keeps_the_models_it_measured(monkeypatch, tmp_path):
    def train_or_stop(name, config):
        if name == "v1":
            raise KeyboardInterrupt  # the session ends while the second model trains
        return _untrained(name, config)

    monkeypatch.setattr(studies, "train", train_or_stop)
    with pytest.raises(KeyboardInterrupt):
        multidoc.run(seeds=(0,), steps=2, models=("llama", "v1"), contexts=(32,), num_tasks=2,
                     output=str(tmp_path), log=lambda _: None)
    saved = json.loads((tmp_path / "multidoc.json").read_text())
    assert [(r["model"], r["x"]) for r in saved["rows"]] == [("llama", 32)]
