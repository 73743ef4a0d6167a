"""Figures of the three-moons experiment (paper figures 4, 5 and 10), drawn with matplotlib.

Functions return the ``Figure`` and write a PNG when given a path. Scripts should select the
Agg backend before importing pyplot (``mmjax.moons.__main__`` does).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mmjax.models.moons import MATRIX_NAMES, complex_weights


def plot_error_curves(curves: Mapping[str, dict], path=None, *, title: str | None = None):
    """Error against context length, one line per curve, with dotted vertical lines at each
    period and a dashed one at the lcm (taken from the first curve).

    Args:
      curves: ``{label: {"context", "error", "periods_in_steps", "lcm_in_steps"}}``; a curve
        may also hold ``"error_std"`` (drawn as a band).
    """
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("curves must hold at least one curve, got none")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, curve in curves.items():
        context, error = np.asarray(curve["context"]), np.asarray(curve["error"])
        (line,) = ax.plot(context, error, label=label)
        if "error_std" in curve:
            std = np.asarray(curve["error_std"])
            ax.fill_between(context, error - std, error + std, color=line.get_color(),
                            alpha=0.25, linewidth=0)
    first = next(iter(curves.values()))
    for i, period in enumerate(first["periods_in_steps"]):
        ax.axvline(period, color="gray", linestyle=":", label="periods" if i == 0 else None)
    ax.axvline(first["lcm_in_steps"], color="black", linestyle="--", label="lcm")
    ax.set_xlabel("context length (observations in memory)")
    ax.set_ylabel("mean abs. error, 25-step rollout")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_weights(params, path=None, *, title: str | None = None):
    """Moduli of the learned complex matrices ``|W_k|``, ``|W_v|``, ``|W_z|`` (paper fig. 10)."""
    import matplotlib.pyplot as plt

    weights = complex_weights(params)
    fig, axes = plt.subplots(1, len(MATRIX_NAMES), figsize=(9, 3.2), layout="constrained")
    vmax = max(float(np.abs(np.asarray(w)).max()) for w in weights.values())
    for ax, name in zip(axes, MATRIX_NAMES, strict=True):
        modulus = np.abs(np.asarray(weights[name]))
        image = ax.imshow(modulus, cmap="viridis", vmin=0, vmax=vmax)
        for (i, j), value in np.ndenumerate(modulus):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if value < 0.6 * vmax else "black")
        ax.set_title(f"|{name}|")
        ax.set_xticks(range(modulus.shape[1]))
        ax.set_yticks(range(modulus.shape[0]))
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
