"""Loss by position: several checkpoints on one plot (``per_position``, the v1 paper's figure
8), and one checkpoint at multiples of its training context (``extrapolate``).

A curve is the mean next-token loss at each position over ``batches`` batches of a data
source: the validation split of a token store (``--data STORE``: any store made by
``python -m mmjax.data.prepare``, in or out of the training distribution), or by default the
validation batches of the first checkpoint's own training data. v2 models run with their
inference long-term skip. A context longer than a model with learned positions (GPT2) can
take is refused before anything is compiled.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import numpy as np

from mmjax.data import make_batches
from mmjax.generate.decoder import model_has_position_table
from mmjax.generate.workdir import Trained, load_workdir
from mmjax.train.step import eval_step


def check_context(trained: Trained, context: int, name: str) -> None:
    """Raise a one-line error when ``context`` is more than the model can take."""
    model = trained.model
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    if model_has_position_table(model) and context > model.context_length:
        raise ValueError(f"{name}: context {context} exceeds the {model.context_length} "
                         "learned positions of this GPT2 (it cannot extrapolate)")


def loss_by_position(trained: Trained, data: dict, context: int, batches: int,
                     batch_size: int = 8) -> np.ndarray:
    """Mean loss at each of ``context`` positions over ``batches`` validation batches."""
    data = dict(data, context_length=context, batch_size=batch_size)
    source = make_batches(data, vocab_size=trained.model.vocab_size, split="val")
    ignore = tuple(getattr(getattr(source, "corpus", None), "ignore_targets", ()))
    step = jax.jit(functools.partial(eval_step, model=trained.model, loss_chunk=128,
                                     ignore_targets=ignore))
    sums, counts = np.zeros(context), np.zeros(context)
    for _ in range(batches):
        out = step(trained.params, np.asarray(next(source)))
        per_position = np.asarray(out["loss_per_position"], np.float64)
        ok = np.isfinite(per_position)
        sums[ok] += per_position[ok]
        counts[ok] += 1
    if hasattr(source, "close"):
        source.close()
    with np.errstate(invalid="ignore"):
        return sums / counts


def read_jsonl(path: str | pathlib.Path, fields: tuple, flag: str) -> list[dict]:
    """The objects of a JSONL file, each with ``fields``; one-line errors name the flag, the
    file and the line (blank lines are skipped)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise ValueError(f"{flag} {path}:{number}: not a JSON object") from None
        if not isinstance(item, dict):
            raise ValueError(f"{flag} {path}:{number}: not a JSON object")
        missing = [k for k in fields if k not in item]
        if missing:
            raise ValueError(f"{flag} {path}:{number}: missing field(s) {missing}")
        items.append((number, item))
    return items


def scaled_contexts(workdir, factors, store: str | None):
    """``(trained, data config, training context)`` of a workdir, with every ``factor x``
    the training context checked against what the model can take."""
    trained = load_workdir(workdir)
    data = data_config(trained, store)
    base = int(trained.config["data"]["context_length"])
    for f in factors:
        check_context(trained, base * f, str(workdir))
    return trained, data, base


def data_config(trained: Trained, store: str | None) -> dict:
    if store is not None:
        if not pathlib.Path(store).is_dir():
            raise FileNotFoundError(f"--data {store}: no such token store directory")
        return {"corpus": "tokens", "path": str(store)}
    return dict(trained.config["data"])


def per_position(workdirs, *, store: str | None = None, context: int | None = None,
                 batches: int = 8, output: str, labels=None) -> dict:
    """One curve per workdir (its latest checkpoint); writes ``per_position.{json,png}``."""
    if not workdirs:
        raise ValueError("give at least one --workdir")
    loaded = [load_workdir(w) for w in workdirs]
    data = data_config(loaded[0], store)
    context = context or int(loaded[0].config["data"]["context_length"])
    for w, trained in zip(workdirs, loaded, strict=True):
        check_context(trained, context, str(w))
    labels = labels or [f"{t.config['model']['name']} ({pathlib.Path(w).name})"
                        for w, t in zip(workdirs, loaded, strict=True)]
    curves = {label: loss_by_position(t, data, context, batches)
              for label, t in zip(labels, loaded, strict=True)}
    return _write(curves, output, "per_position", f"loss by position, context {context}")


def extrapolate(workdir, *, factors=(1, 2, 4, 8), store: str | None = None,
                batches: int = 8, output: str) -> dict:
    """The loss by position of one checkpoint at ``factor x`` its training context."""
    trained, data, base = scaled_contexts(workdir, factors, store)
    curves = {f"context {base * f} ({f}x)": loss_by_position(trained, data, base * f, batches)
              for f in factors}
    title = f"{trained.config['model']['name']} trained at context {base}"
    return _write(curves, output, "extrapolate", title)


def _write(curves: dict, output: str, name: str, title: str) -> dict:
    """``name.json`` (the curves) and ``name.png`` (one line each) in ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(output)
    path.mkdir(parents=True, exist_ok=True)
    result = {label: [None if not np.isfinite(v) else float(v) for v in curve]
              for label, curve in curves.items()}
    (path / f"{name}.json").write_text(json.dumps({"title": title, "curves": result}))
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in reversed(list(curves.items())):  # the first curve drawn on top
        ax.plot(np.arange(len(curve)), curve, label=label, linewidth=1, alpha=0.85)
    ax.set_xlabel("position")
    ax.set_ylabel("next-token loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path / f"{name}.png", dpi=120)
    plt.close(fig)
    return result
