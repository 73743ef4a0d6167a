"""One three-moons run: train, evaluate, write the curve (JSON), the figures (PNG), the weights."""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np

from mmjax.moons.evaluate import error_curve, is_disentangled, mean_error, row_dominance
from mmjax.moons.model import MATRIX_NAMES
from mmjax.moons.train import train


def _mean_or_none(curve, lo, hi):
    context = np.asarray(curve["context"])
    return mean_error(curve, lo, hi) if ((context >= lo) & (context <= hi)).any() else None


def summarize(curve: dict, params) -> dict:
    """The numbers the experiment is judged on (``None`` where the curve has no context in
    the range): mean errors on contexts [150, 250], after the lcm (+5), before the first
    period, and the row dominance of the learned matrices."""
    lcm = curve["lcm_in_steps"]
    dominance = row_dominance(params)
    return {
        "error_150_250": _mean_or_none(curve, 150, 250),
        "error_after_lcm": _mean_or_none(curve, np.ceil(lcm) + 5, max(curve["context"])),
        "error_before_first_period": _mean_or_none(curve, 1, curve["periods_in_steps"][0]),
        "row_dominance": {name: dominance[name].tolist() for name in MATRIX_NAMES},
        "disentangled": is_disentangled(params),
    }


# Training losses are printed every this many steps.
LOG_EVERY = 50


def run_experiment(config, workdir, *, progress: bool = True, figures: bool = True) -> dict:
    """Train and evaluate the net of ``config``; write to ``workdir``:
    ``train_state.npz`` (during training, every :data:`mmjax.moons.train.SAVE_EVERY` steps:
    an interrupted run resumes from it when run again with the same config and workdir),
    ``params.npz`` (as soon as training ends, before the evaluation), ``curve.json``
    (``{"context", "error", "periods_in_steps", "lcm_in_steps", ...}``), ``summary.json``,
    and with ``figures`` ``error_vs_context.png`` and ``weights.png``. The training loss is
    printed every :data:`LOG_EVERY` steps. Returns ``{"curve", "summary", "params",
    "losses"}``."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(step: int, loss: float) -> None:
        if (step + 1) % LOG_EVERY == 0 or step + 1 == config.train.steps:
            _print(f"step {step + 1}: loss {loss:.5f}")

    model, params, losses = train(config, progress=progress, log=log,
                                  state_path=workdir / "train_state.npz")
    np.savez(workdir / "params.npz", **{k: np.asarray(v) for k, v in params.items()})
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    curve = error_curve(model, params, config.eval, config.data, progress=progress)
    eval_seconds = time.perf_counter() - start
    summary = summarize(curve, params)
    summary.update(num_heads=config.model.num_heads, seed=config.seed,
                   steps=config.train.steps, final_loss=losses[-1] if losses else None,
                   train_seconds=train_seconds, eval_seconds=eval_seconds)
    (workdir / "curve.json").write_text(json.dumps(curve))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    if figures:
        import matplotlib.pyplot as plt

        from mmjax.moons.plots import plot_error_curves, plot_weights

        heads = f"{config.model.num_heads} head{'s' if config.model.num_heads > 1 else ''}"
        fig = plot_error_curves({heads: curve}, workdir / "error_vs_context.png",
                                title=f"three moons, periods {curve['periods']}, {heads}")
        plt.close(fig)
        fig = plot_weights(params, workdir / "weights.png", title=f"learned moduli, {heads}")
        plt.close(fig)
    return {"curve": curve, "summary": summary, "params": params, "losses": losses}


def _print(message: str) -> None:
    """A line on stderr, beside (not through) the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)
