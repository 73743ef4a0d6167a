"""AdamW with the official Library's weight-decay rule, global-norm clipping and a schedule.

Weight decay applies to matrices only. The rule is read from each parameter itself, not from
a list of paths: a leaf decays iff it has rank >= 2 and its own name does not contain
``"bias"``. In the mmjax models this gives

* decay: embeddings ``[vocab, embed]``, projection kernels (``[embed, heads, head_dim]``,
  ``[heads, head_dim, embed]``), persistent slots ``[banks, slots, heads, head_dim]``;
* no decay: per-head scalars ``[heads]`` (leaky_key_beta, kernel_beta, value_beta,
  value_mix), LayerNorm scales and biases ``[embed]``, projection biases (``[heads,
  head_dim]`` has rank 2, hence the name test: the leaf's own key, e.g. ``key_bias``).

That is the official ``configure_optimizers`` split (no decay iff ``p.dim() < 2``; its
biases are 1-D).

The schedule is the official ``get_cosine_lr``: ``lr * step / warmup_steps`` during warm-up,
then a cosine from ``lr`` to ``min_lr`` at ``total_steps``, then ``min_lr``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def _leaf_name(path) -> str:
    """The last dictionary key on a pytree path (skips the ``.value`` of metadata boxes)."""
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
    return ""


def decay_mask(params: Any) -> Any:
    """Pytree of bools with the structure of ``params``: True where weight decay applies.

    Works on plain parameters and on parameters still boxed in Flax logical-partitioning
    metadata (the mask then has the same boxes, as ``optax.masked`` requires).
    """

    def decays(path, leaf) -> bool:
        return jnp.ndim(leaf) >= 2 and "bias" not in _leaf_name(path).lower()

    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr: float | None = None,
) -> optax.Schedule:
    """Constant, or linear warm-up from 0, then (if ``total_steps``) cosine to ``min_lr``."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps is None:
        if min_lr is not None:
            raise ValueError("min_lr needs total_steps (the step where the cosine ends)")
        if warmup_steps == 0:
            return optax.constant_schedule(learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps),
             optax.constant_schedule(learning_rate)],
            [warmup_steps],
        )
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps must be > warmup_steps, got total_steps={total_steps}, "
            f"warmup_steps={warmup_steps}"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=0.0 if min_lr is None else min_lr,
    )


def make_optimizer(
    learning_rate: float,
    *,
    weight_decay: float,
    b1: float,
    b2: float,
    eps: float,
    grad_clip: float | None,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr: float | None = None,
) -> optax.GradientTransformation:
    """Clip by global norm (``grad_clip``; None or 0 disables), then masked AdamW.

    ``weight_decay`` is decoupled (torch/optax AdamW: ``p -= lr * wd * p``) and applies
    where :func:`decay_mask` is True.
    """
    if grad_clip is not None and grad_clip < 0:
        raise ValueError(f"grad_clip must be None or >= 0, got {grad_clip}")
    schedule = learning_rate_schedule(
        learning_rate, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr
    )
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decay_mask)
    if not grad_clip:
        return adamw
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
