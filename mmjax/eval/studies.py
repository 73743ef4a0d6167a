"""What the v2 paper's studies share: training the models of a study side by side, and
reporting a measurement over seeds (mean and standard deviation) as a table, JSON and a
plot.

A study (``python -m mmjax.eval multidoc``, ...) trains each model of
:data:`mmjax.config.STUDY_MODELS` (MM v2, LLaMA, short/long LLaMA, MM v2 without long-term
memory, MM v1, equal in parameters) from its :func:`mmjax.config.pair_config` on a
generated corpus, for each seed, and measures each trained model at a series of settings
(``x``: a context length, a number of shots, ...). A row is ``{"model", "seed", "x",
"value"}`` and :func:`describe` of the model.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A model trained by :func:`train`."""

    name: str
    model: object
    params: dict
    num_params: int
    eval_loss: float
    seconds: float
    learning_rate: float | None = None


def train(name: str, config) -> TrainedModel:
    """Train ``config`` in memory (no workdir) and return the model with its weights."""
    from mmjax.models import build_model
    from mmjax.train.loop import train_and_evaluate

    start = time.perf_counter()
    result = train_and_evaluate(config, None, progress=False)
    params = result["state"].params
    return TrainedModel(name=name, model=build_model(config.model), params=params,
                        num_params=int(sum(x.size for x in jax.tree.leaves(params))),
                        eval_loss=float(result["eval_loss"]),
                        seconds=time.perf_counter() - start)


def trained_models(names, *, corpus: str, steps: int, seed: int,
                   learning_rates=(3e-3,)):
    """Train each model of ``names`` on ``corpus`` (:func:`mmjax.config.study_config`) in
    turn, yielding it as soon as it is trained; at the end, refuse models of unequal size.

    ``learning_rates``: the tuning budget, the same for every model: each is trained at
    each peak rate and the one with the lowest held-out loss is kept."""
    from mmjax.config import study_config

    done = []
    for name in names:
        tried = []
        for rate in learning_rates:
            config = study_config(name, corpus=corpus, steps=steps, seed=seed)
            config.optimizer.learning_rate = rate
            config.optimizer.min_lr = min(config.optimizer.min_lr, rate)
            tried.append(dataclasses.replace(train(name, config), learning_rate=rate))
        model = min(tried, key=lambda t: t.eval_loss)
        done.append(model)
        yield model
    check_equal_size(done)


def describe(model: TrainedModel) -> dict:
    """What a study's rows record of the model they measure."""
    return {"params": model.num_params, "train_seconds": model.seconds,
            "learning_rate": model.learning_rate, "eval_loss": model.eval_loss}


def check_equal_size(trained: list[TrainedModel], tolerance: float = 0.02) -> None:
    """Raise when a study's models differ in parameters by more than ``tolerance``."""
    counts = {t.name: t.num_params for t in trained}
    if max(counts.values()) > (1 + tolerance) * min(counts.values()):
        raise ValueError(f"the models' parameters differ by more than {tolerance:.0%}: "
                         f"{counts}")


def summary(rows: list[dict]) -> dict:
    """``{model: {x: (mean, std, seeds)}}`` of the rows' values over seeds."""
    out: dict = {}
    for row in rows:
        out.setdefault(row["model"], {}).setdefault(row["x"], []).append(row["value"])
    return {model: {x: (float(np.mean(v)), float(np.std(v)), len(v))
                    for x, v in sorted(by_x.items())}
            for model, by_x in out.items()}


def format_table(rows: list[dict], x_label: str, paper: dict | None = None) -> str:
    """A markdown table, one line per model: ``mean ± std`` at each ``x`` (over seeds), and
    the paper's figure for that model where ``paper`` (``{model: {x: value}}``) has one."""
    table = summary(rows)
    xs = sorted({x for by_x in table.values() for x in by_x})
    lines = [f"| model | {' | '.join(f'{x_label} {x}' for x in xs)} | seeds |",
             "|---|" + "---|" * (len(xs) + 1)]
    for model, by_x in table.items():
        cells = [f"{by_x[x][0]:.3f} ± {by_x[x][1]:.3f}" if x in by_x else "-" for x in xs]
        seeds = max(n for _, _, n in by_x.values())
        lines.append(f"| {model} | {' | '.join(cells)} | {seeds} |")
    for model, by_x in (paper or {}).items():
        cells = [f"{by_x[x]:.3f}" if by_x.get(x) is not None else "-" for x in xs]
        lines.append(f"| paper: {model} | {' | '.join(cells)} | |")
    return "\n".join(lines)


def write(rows: list[dict], output: str, name: str, *, x_label: str, y_label: str,
          title: str, x_scale: str = "log") -> pathlib.Path:
    """``name.json`` (the rows and their summary) and ``name.png`` (mean ± std per model)
    in ``output``; returns the PNG's path. ``x_scale``: ``"log"`` (base 2), ``"symlog"``
    (when ``x`` starts at 0) or ``"linear"``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(output)
    path.mkdir(parents=True, exist_ok=True)
    table = summary(rows)
    (path / f"{name}.json").write_text(json.dumps(
        {"study": name, "title": title, "x_label": x_label, "y_label": y_label,
         "x_scale": x_scale, "rows": rows,
         "summary": {m: {str(x): v for x, v in by_x.items()} for m, by_x in table.items()}}))
    fig, ax = plt.subplots(figsize=(7, 4))
    for model, by_x in table.items():
        xs = list(by_x)
        ax.errorbar(xs, [by_x[x][0] for x in xs], yerr=[by_x[x][1] for x in xs], marker="o",
                    capsize=3, label=model)
    if x_scale == "log":
        ax.set_xscale("log", base=2)
    elif x_scale == "symlog":
        ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = path / f"{name}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def merge(inputs, output: str) -> tuple[str, list[dict]]:
    """Join the rows of one study's runs (``NAME.json`` files, or directories holding one),
    e.g. seeds run on separate machines, and :func:`write` them to ``output``. Returns the
    study's name and the rows; refuses different studies and a (model, seed, x) measured
    twice."""
    runs, rows, seen = [], [], {}
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if len(found) != 1:
                raise ValueError(f"{path}: expected one study JSON, found {len(found)}")
            path = found[0]
        try:
            saved = json.loads(path.read_text())
            study = {key: saved[key] for key in ("study", "title", "x_label", "y_label",
                                                  "x_scale")}
            measured = list(saved["rows"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a study's JSON ({type(e).__name__}: {e})") from None
        if runs and study["study"] != runs[0]["study"]:
            raise ValueError(f"{path}: a {study['study']} run, not {runs[0]['study']}")
        runs.append(study)
        for row in measured:
            key = (row["model"], row["seed"], row["x"])
            if key in seen:
                raise ValueError(f"{path}: model {key[0]!r} seed {key[1]} at {key[2]} is "
                                 f"already in {seen[key]}")
            seen[key] = path
        rows += measured
    if not runs:
        raise ValueError("nothing to merge: give one or more study JSON files or directories")
    first = runs[0]
    write(rows, output, first["study"], x_label=first["x_label"], y_label=first["y_label"],
          title=first["title"], x_scale=first["x_scale"])
    return first["study"], rows
