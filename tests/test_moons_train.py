"""The three-moons task on the trainer: config, loss, trajectory, checkpoints and resume, the
experiment's files and its command line."""

import importlib
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.config import load
from mmjax.models import build_model
from mmjax.models.moons import MoonsMemory
from mmjax.moons import data
from mmjax.moons.experiment import run_experiment
from mmjax.moons.train import clipped_loss, moons_task, train
from mmjax.train.loop import Trainer
from mmjax.train.optimizer import scale_by_adam_uncorrected

# the module (the package's attribute ``train`` is its function)
moons_train = importlib.import_module("mmjax.moons.train")
REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "moons_trajectory.json"


def get_config(arg: str | None = None):
    """``configs/moons.py[:arg]``, loaded as every command loads a config."""
    return load("configs/moons.py" + (f":{arg}" if arg else ""))


def tiny_config(heads=3, steps=2):
    """``configs/moons.py:tiny``: sequences of 60, batch 8, the error at contexts 1..29."""
    return get_config(f"tiny,heads={heads},steps={steps},seed=0")


def test_config_keys_and_presets():
    config = get_config()
    assert config.task == "moons" and config.model.name == "moons_memory"
    model = build_model(config.model)  # the models' registry, as for the language models
    assert isinstance(model, MoonsMemory) and model.num_heads == 3
    config = get_config("heads=1,steps=7,seed=5")
    assert (config.model.num_heads, config.train.num_steps, config.train.seed) == (1, 7, 5)
    assert (config.data.batch_size, config.data.context_length) == (64, 800)
    assert config.optimizer.bias_correction is False and config.train.clip == 0.5
    # the language models' keys, not the dialect the experiment spoke before the trainer
    assert "seed" not in config and "length" not in config.data
    assert not {"steps", "batch_size"} & set(config.train)
    # the schedule decays over the run, also when the step count is overridden
    assert config.optimizer.total_steps == 7
    config.train.num_steps = 30
    assert config.optimizer.total_steps == 30
    tiny = get_config("tiny")
    assert (tiny.data.context_length, tiny.data.batch_size, tiny.train.num_steps) == (60, 8, 20)
    assert get_config("tiny,steps=3").optimizer.total_steps == 3


def test_config_errors():
    with pytest.raises(ValueError, match="heads must be 1 or 3"):
        get_config("heads=2")
    with pytest.raises(ValueError, match=r"heads=INT"):
        get_config("layers=2")
    with pytest.raises(ValueError, match="must be an integer"):
        get_config("steps=many")
    config = get_config()
    config.model.depth = 2
    with pytest.raises(ValueError, match=r"no config key\(s\) \['depth'\]"):
        build_model(config.model)
    # python -m mmjax.train (the language-model task) refuses the config in one line
    with pytest.raises(ValueError, match="config.task='moons', but the trainer was given the "
                                         "'lm' task: .*python -m mmjax.moons"):
        Trainer(get_config())
    config = get_config()
    config.task = "poems"
    with pytest.raises(ValueError, match="config.task='poems', but .* the 'moons' task"):
        moons_train.train(config)


def test_clipped_loss_value_and_gradient():
    pred = jnp.array([0.1, 0.9, -2.0])
    target = jnp.zeros(3)
    assert float(clipped_loss(pred, target, 0.5)) == pytest.approx((0.01 + 0.25 + 0.25) / 3)
    grad = jax.grad(clipped_loss)(pred, target, 0.5)
    np.testing.assert_allclose(np.asarray(grad), [2 * 0.1 / 3, 0.0, 0.0], atol=1e-7)


def test_adam_without_bias_correction():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.3, -0.01])}
    tx = scale_by_adam_uncorrected()
    updates, state = tx.update(grads, tx.init(params))
    # m = 0.1 g, v = 0.001 g^2: the first update is (0.1 / sqrt(0.001)) sign(g)
    np.testing.assert_allclose(np.asarray(updates["w"]), [3.1623, -3.1623], rtol=1e-3)
    corrected, _ = optax.scale_by_adam().update(grads, optax.scale_by_adam().init(params))
    np.testing.assert_allclose(np.asarray(corrected["w"]), [1.0, -1.0], rtol=1e-3)
    updates, _ = tx.update(grads, state)
    m, v = 0.19 * 0.3, (1 - 0.999**2) * 0.09
    np.testing.assert_allclose(float(updates["w"][0]), m / np.sqrt(v), rtol=1e-4)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_a_trainer_step_decreases_the_loss(bias_correction):
    config = tiny_config()
    config.optimizer.bias_correction = bias_correction
    trainer = Trainer(config, moons_task(config))
    try:
        state, batch = trainer.init_state(), trainer.next_batch()
        assert batch.shape == (8, 61, 6) and batch.dtype == jnp.float32
        state, before = trainer.train_step(state, batch)
        state, after = trainer.train_step(state, batch)  # the state is donated
        assert float(after["loss"]) < float(before["loss"])
        assert "bad_token_ids" not in before  # observations, not token ids
        evaluation = trainer.evaluate(state.params)
        assert evaluation["eval_loss_per_position"].shape == (60,)
    finally:
        trainer.close()


def test_gradient_accumulation_splits_a_batch_of_observations():
    """Two micro-batches of ``[4, 61, 6]`` observations make the step of the whole batch."""
    steps = {}
    for accum in (1, 2):
        config = tiny_config()
        config.train.grad_accum_steps = accum
        trainer = Trainer(config, moons_task(config))
        try:
            steps[accum] = trainer.train_step(trainer.init_state(), trainer.next_batch())
        finally:
            trainer.close()
    (whole, whole_metrics), (split, split_metrics) = steps[1], steps[2]
    np.testing.assert_allclose(split_metrics["loss"], whole_metrics["loss"], rtol=1e-6)
    for name in whole.params:
        np.testing.assert_allclose(split.params[name], whole.params[name], rtol=1e-5,
                                   atol=1e-7, err_msg=name)


@pytest.mark.parametrize("heads", [1, 3])
def test_trajectory_equals_the_loop_before_the_trainer(heads):
    """The losses of every step and the final parameters, bit for bit, of the training loop
    the experiment had before it ran on the trainer (recorded in the fixture): same init,
    batches, optimiser and seeds."""
    fixture = json.loads(FIXTURE.read_text())
    config = get_config(f"heads={heads},steps={fixture['steps']},seed={fixture['seed']}")
    config.data.update(context_length=fixture["length"], batch_size=fixture["batch_size"])
    run = train(config, progress=False)
    want = fixture["runs"][f"heads{heads}"]
    assert run["losses"] == want["losses"]
    for name, value in run["params"].items():
        np.testing.assert_array_equal(value, np.asarray(want["params"][name], np.float32),
                                      err_msg=name)


def test_interrupted_training_resumes_to_the_same_net(tmp_path, monkeypatch):
    """Interrupted in step 4 (Orbax checkpoint at step 2 in the workdir), run again: the same
    losses and parameters as an uninterrupted run, bit for bit."""
    config = tiny_config(heads=1, steps=6)
    config.checkpoint.save_every = 2
    straight = train(config, progress=False)
    calls = []
    real_next = data.MoonsBatches.__next__

    def interrupted(self):
        calls.append(self)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(data.MoonsBatches, "__next__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path, progress=False)
    monkeypatch.undo()
    assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == 2
    resumed = train(config, tmp_path, progress=False)
    assert [h["step"] for h in resumed["history"]] == [3, 4, 5, 6]
    assert resumed["losses"] == straight["losses"][2:]
    for name, value in straight["params"].items():
        np.testing.assert_array_equal(resumed["params"][name], value, err_msg=name)
    assert (tmp_path / "checkpoints" / "6" / "state").is_dir()


def test_checkpoint_of_other_data_settings_is_refused(tmp_path):
    config = tiny_config(heads=1, steps=2)
    train(config, tmp_path, progress=False)
    config.data.batch_size = 16
    config.train.num_steps = 3
    with pytest.raises(ValueError, match="checkpoint step 2 .*other data settings"):
        train(config, tmp_path, progress=False)


def test_run_experiment_writes_curve_summary_figures_and_no_npz(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    result = run_experiment(tiny_config(heads=1), tmp_path, progress=False)
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve["context"] == [1, 8, 15, 22, 29]
    assert len(curve["error"]) == 5 and all(np.isfinite(curve["error"]))
    assert curve["periods_in_steps"] == pytest.approx([44.444, 88.889, 133.333], abs=1e-3)
    assert curve["lcm_in_steps"] == pytest.approx(266.667, abs=1e-3)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_heads"] == 1 and len(result["losses"]) == 2
    assert summary["final_loss"] == result["losses"][-1] and summary["eval_loss"] > 0
    for name in ("error_vs_context.png", "weights.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    # the trained net is in the trainer's Orbax checkpoint; the npz files of the loop before
    # the trainer are gone
    assert (tmp_path / "checkpoints" / "2" / "state").is_dir()
    for name, value in moons_train.load_trained_params(tmp_path).items():
        np.testing.assert_array_equal(value, result["params"][name], err_msg=name)
    assert not list(tmp_path.rglob("*.npz"))
    assert "moons_task" in vars(moons_train)
    assert not {"save_state", "load_state", "make_train_step"} & set(vars(moons_train))


def test_experiment_keeps_the_net_when_evaluation_is_interrupted(tmp_path, monkeypatch,
                                                                  capsys):
    from mmjax.moons import experiment

    config = tiny_config(heads=1, steps=4)
    config.train.log_every = 2

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "error_curve", interrupted)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(config, tmp_path, progress=False, figures=False)
    assert (tmp_path / "checkpoints" / "4" / "state").is_dir()
    out = capsys.readouterr().out
    assert "step 2: loss " in out and "step 4: loss " in out
    monkeypatch.undo()
    result = run_experiment(config, tmp_path, progress=False, figures=False)  # no retraining
    assert result["losses"] == [] and "step 2: loss" not in capsys.readouterr().out
    assert result["summary"]["final_loss"] is not None


def test_workdir_of_another_config_is_refused(tmp_path, monkeypatch):
    from mmjax.moons import experiment

    monkeypatch.setattr(experiment, "train", lambda *a, **k: {"preempted": True})
    assert run_experiment(tiny_config(heads=1), tmp_path) == {"preempted": True}
    with pytest.raises(ValueError, match=r"another config \(model.num_heads \(1 -> 3\)\)"):
        run_experiment(tiny_config(heads=3), tmp_path)
    changed = tiny_config(heads=1)
    changed.eval.context_stride = 1  # the evaluation may change
    assert run_experiment(changed, tmp_path) == {"preempted": True}


def _moons_command(*args, timeout=300):
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    return subprocess.run([sys.executable, "-m", "mmjax.moons", *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_command_line_help():
    """The command imports (trainer included) and lists its flags; its exit status is the
    command-line convention's (``tests/test_cli.py``)."""
    proc = _moons_command("--help", timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--config: configs/moons.py[:preset]" in proc.stdout
    assert "--workdir: output directory" in proc.stdout


@pytest.mark.slow
def test_command_line(tmp_path):
    proc = _moons_command("--config", "configs/moons.py:tiny,heads=3,steps=2",
                          "--config.eval.max_context=20", "--config.eval.context_stride=10",
                          f"--workdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["num_heads"] == 3  # stdout: the summary only
    assert "step 2: loss " in proc.stderr  # the trainer's log
    assert json.loads((tmp_path / "curve.json").read_text())["context"] == [1, 11]
    assert (tmp_path / "checkpoints" / "2").is_dir()


def test_plots_and_their_errors(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from mmjax.models.moons import identity_params
    from mmjax.moons.plots import plot_error_curves, plot_weights

    curve = {"context": [1, 2, 3], "error": [0.5, 0.4, 0.1], "error_std": [0.1, 0.1, 0.0],
             "periods_in_steps": [1.5, 2.5], "lcm_in_steps": 2.8}
    fig = plot_error_curves({"a": curve}, tmp_path / "c.png", title="t")
    assert len(fig.axes[0].lines) == 1 + 2 + 1  # the curve, two periods, the lcm
    fig = plot_weights(identity_params(), tmp_path / "w.png")
    assert [ax.get_title() for ax in fig.axes[:3]] == ["|W_k|", "|W_v|", "|W_z|"]
    assert (tmp_path / "c.png").exists() and (tmp_path / "w.png").exists()
    with pytest.raises(ValueError, match="at least one curve"):
        plot_error_curves({})
