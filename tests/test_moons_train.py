import importlib.util
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.moons import data
from mmjax.moons.experiment import run_experiment
from mmjax.moons.train import clipped_loss, make_model, make_train_step
from mmjax.train.optimizer import make_optimizer, scale_by_adam_uncorrected

REPO = pathlib.Path(__file__).resolve().parent.parent


def _load_config_module():
    spec = importlib.util.spec_from_file_location("moons_config", REPO / "configs" / "moons.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


get_config = _load_config_module().get_config


def tiny_config(heads=3, steps=2):
    config = get_config(f"heads={heads},steps={steps},seed=0")
    config.data.length = 60
    config.train.batch_size = 4
    config.eval.num_sequences = 4
    config.eval.max_context = 30
    config.eval.context_stride = 7
    return config


def test_config_presets_and_errors():
    assert get_config().model.num_heads == 3
    config = get_config("heads=1,steps=7,seed=5")
    assert (config.model.num_heads, config.train.steps, config.seed) == (1, 7, 5)
    assert config.optimizer.bias_correction is False and config.train.clip == 0.5
    with pytest.raises(ValueError, match="heads must be 1 or 3"):
        get_config("heads=2")
    with pytest.raises(ValueError, match=r"heads=INT"):
        get_config("layers=2")
    with pytest.raises(ValueError, match="must be an integer"):
        get_config("steps=many")
    config.model.depth = 2
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]"):
        make_model(config.model)


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


def test_one_training_step_decreases_the_loss():
    config = tiny_config()
    model = make_model(config.model)
    x, y = data.sample_batch(np.random.default_rng(0), data.TRAIN_PERIODS, 8, 60)
    params = nn.meta.unbox(model.init(jax.random.key(0), x)["params"])
    for bias_correction in (False, True):
        config.optimizer.bias_correction = bias_correction
        optimizer = make_optimizer(**config.optimizer, total_steps=config.train.steps)
        step = make_train_step(model, optimizer, config.train.clip)
        new_params, _, loss_before = step(params, optimizer.init(params), x, y)
        _, _, loss_after = step(new_params, optimizer.init(params), x, y)
        assert float(loss_after) < float(loss_before)


def test_run_experiment_writes_curve_summary_and_figures(tmp_path):
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
    for name in ("error_vs_context.png", "weights.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert set(np.load(tmp_path / "params.npz").files) == {"W_k", "W_v", "W_z"}


@pytest.mark.slow
def test_command_line(tmp_path):
    cmd = [sys.executable, "-m", "mmjax.moons", "--config", "configs/moons.py:heads=3,steps=2",
           "--config.data.length=60", "--config.train.batch_size=4",
           "--config.eval.num_sequences=4", "--config.eval.max_context=20",
           "--config.eval.context_stride=10", f"--workdir={tmp_path}"]
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["num_heads"] == 3
    assert "train 3 head(s)" in proc.stderr  # the progress bar
    assert json.loads((tmp_path / "curve.json").read_text())["context"] == [1, 11]


def test_plots_and_their_errors(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from mmjax.moons.model import identity_params
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


def test_interrupted_training_resumes_to_the_same_net(tmp_path):
    """Stopped after step 3 (state saved at step 2), run again: the same parameters and
    losses as an uninterrupted run, bit for bit."""
    from mmjax.moons.train import train

    config = tiny_config(heads=1, steps=6)
    _, straight, straight_losses = train(config, progress=False)
    path = tmp_path / "train_state.npz"

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False, log=interrupt, state_path=path, save_every=2)
    assert int(np.load(path)["step"]) == 2
    _, resumed, losses = train(config, progress=False, state_path=path, save_every=2)
    assert losses == straight_losses
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])
    assert int(np.load(path)["step"]) == 6


def test_training_state_of_another_config_or_corrupt_is_refused(tmp_path):
    from mmjax.moons.train import train

    path = tmp_path / "train_state.npz"
    train(tiny_config(heads=1, steps=2), progress=False, state_path=path)
    with pytest.raises(ValueError, match="saved by a run with another config"):
        train(tiny_config(heads=1, steps=3), progress=False, state_path=path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read the training state"):
        train(tiny_config(heads=1, steps=2), progress=False, state_path=path)


def test_experiment_saves_the_net_before_evaluating_and_prints_losses(tmp_path, monkeypatch,
                                                                       capsys):
    from mmjax.moons import experiment

    config = tiny_config(heads=1, steps=4)
    monkeypatch.setattr(experiment, "LOG_EVERY", 2)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "error_curve", interrupted)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(config, tmp_path, progress=False, figures=False)
    assert set(np.load(tmp_path / "params.npz").files) == {"W_k", "W_v", "W_z"}
    err = capsys.readouterr().err
    assert "step 2: loss " in err and "step 4: loss " in err
    monkeypatch.undo()
    result = run_experiment(config, tmp_path, progress=False, figures=False)  # no retraining
    assert len(result["losses"]) == 4 and "step 2: loss" not in capsys.readouterr().err
