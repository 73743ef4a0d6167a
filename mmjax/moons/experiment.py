"""One three-moons run: train (the trainer, checkpoints in the workdir), evaluate, write the
curve (JSON) and the figures (PNG)."""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from mmjax.models.moons import MATRIX_NAMES
from mmjax.moons.evaluate import error_curve, is_disentangled, mean_error, row_dominance
from mmjax.moons.train import train

# The config sections that decide the trained net: a workdir holds the run of one of them.
RUN_SECTIONS = ("model", "data", "optimizer", "train")


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


def run_experiment(config, workdir, *, progress: bool = True, figures: bool = True) -> dict:
    """Train and evaluate the net of ``config``; write to ``workdir``: the trainer's files
    (``checkpoints/``, Orbax, every ``checkpoint.save_every`` steps and at the end, so a run
    interrupted in training or in the evaluation resumes from them when run again with the
    same config and workdir; ``metrics.jsonl``: the training loss every ``train.log_every``
    steps and at the last, the validation loss), ``run_config.json`` (another config is then
    refused in this workdir), ``curve.json`` (``{"context", "error", "periods_in_steps",
    "lcm_in_steps", ...}``), ``summary.json``, and with ``figures`` ``error_vs_context.png``
    and ``weights.png``.

    Returns ``{"curve", "summary", "params", "losses", "preempted"}`` (``losses``: the steps
    this call trained); after a SIGTERM the trainer has saved and stopped: only
    ``{"preempted": True}``, nothing evaluated.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    keep_run_config(config, workdir / "run_config.json")
    start = time.perf_counter()
    run = train(config, workdir, progress=progress)
    if run["preempted"]:
        return {"preempted": True}
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    curve = error_curve(run["model"], run["params"], config.eval, config.data,
                        progress=progress)
    eval_seconds = time.perf_counter() - start
    summary = summarize(curve, run["params"])
    summary.update(num_heads=config.model.num_heads, seed=config.train.seed,
                   steps=config.train.num_steps, final_loss=last_train_loss(workdir),
                   eval_loss=run["eval_loss"], train_seconds=train_seconds,
                   eval_seconds=eval_seconds)
    (workdir / "curve.json").write_text(json.dumps(curve))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    if figures:
        import matplotlib.pyplot as plt

        from mmjax.moons.plots import plot_error_curves, plot_weights

        heads = f"{config.model.num_heads} head{'s' if config.model.num_heads > 1 else ''}"
        fig = plot_error_curves({heads: curve}, workdir / "error_vs_context.png",
                                title=f"three moons, periods {curve['periods']}, {heads}")
        plt.close(fig)
        fig = plot_weights(run["params"], workdir / "weights.png",
                           title=f"learned moduli, {heads}")
        plt.close(fig)
    return {"curve": curve, "summary": summary, "params": run["params"],
            "losses": run["losses"], "preempted": False}


def keep_run_config(config, path: pathlib.Path) -> None:
    """Write the :data:`RUN_SECTIONS` of ``config`` to ``path``, or, when it exists, refuse a
    config that differs there in one line naming the keys (the evaluation may change)."""
    now = {section: config[section].to_dict() for section in RUN_SECTIONS}
    now = json.loads(json.dumps(now))  # tuples as lists, as read back
    if not path.exists():
        path.write_text(json.dumps(now, indent=1, sort_keys=True))
        return
    saved = json.loads(path.read_text())
    changed = [f"{section}.{key} ({saved.get(section, {}).get(key)!r} -> "
               f"{now[section].get(key)!r})"
               for section in RUN_SECTIONS
               for key in sorted(set(saved.get(section, {})) | set(now[section]))
               if saved.get(section, {}).get(key) != now[section].get(key)]
    if changed:
        raise ValueError(f"{path.parent} holds the run of another config ({', '.join(changed)}); "
                         f"use that config or a new workdir")


def last_train_loss(workdir: pathlib.Path) -> float | None:
    """The training loss of the last step in the trainer's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    losses = [row["loss"] for row in rows if "loss" in row]
    return losses[-1] if losses else None
