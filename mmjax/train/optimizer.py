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
``schedule="linear"`` decays linearly instead (the three-moons recipe), and
``bias_correction=False`` is the Adam of MLX, which the official three-moons code trains with
(see :func:`scale_by_adam_uncorrected`). :func:`make_optimizer` is the one optimiser factory
of mmjax: the language models and the three-moons net both call it with their config's
``optimizer`` section.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


class AdamState(NamedTuple):
    mu: Any
    nu: Any


def scale_by_adam_uncorrected(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Adam's scaling without bias correction (as MLX's ``optim.Adam``):
    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, update ``m / (sqrt(v) + eps)``.

    Compared with bias-corrected Adam the step is ``(1 - b1^t) / sqrt(1 - b2^t)`` times
    larger: 3.2 at step 1, 6.6 at step 12, still 1.6 at step 500 (with ``b2 = 0.999``).
    """

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamState(mu=zeros, nu=zeros)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, AdamState(mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


SCHEDULES = ("cosine", "linear")


def learning_rate_schedule(
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr: float | None = None,
    schedule: str = "cosine",
) -> optax.Schedule:
    """Constant, or linear warm-up from 0, then (if ``total_steps``) a cosine (or, with
    ``schedule="linear"``, a straight line) to ``min_lr`` at ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
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
    end = 0.0 if min_lr is None else min_lr
    if schedule == "linear":
        decay = optax.linear_schedule(learning_rate, end, total_steps - warmup_steps)
        if warmup_steps == 0:
            return decay
        return optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])
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
    schedule: str = "cosine",
    bias_correction: bool = True,
    moment_dtype: str | None = None,
) -> optax.GradientTransformation:
    """Clip by global norm (``grad_clip``; None or 0 disables), then masked AdamW.

    ``weight_decay`` is decoupled (torch/optax AdamW: ``p -= lr * wd * p``) and applies
    where :func:`decay_mask` is True. With ``bias_correction`` (the default) this is
    ``optax.adamw``; without, Adam's moments are used as they are
    (:func:`scale_by_adam_uncorrected`). ``schedule``: see :func:`learning_rate_schedule`.
    ``moment_dtype`` (e.g. ``"bfloat16"``) stores Adam's first moment in that dtype (optax's
    ``mu_dtype``; None: the parameters' dtype); the second moment stays in the parameters'
    dtype, where its small squared-gradient values do not underflow.
    """
    if moment_dtype is not None and not bias_correction:
        raise ValueError("moment_dtype needs bias_correction=True (optax.adamw)")
    if grad_clip is not None and grad_clip < 0:
        raise ValueError(f"grad_clip must be None or >= 0, got {grad_clip}")
    lr = learning_rate_schedule(learning_rate, warmup_steps=warmup_steps,
                                total_steps=total_steps, min_lr=min_lr, schedule=schedule)
    if bias_correction:
        adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                            mask=decay_mask, mu_dtype=moment_dtype)
    else:
        adamw = optax.chain(scale_by_adam_uncorrected(b1=b1, b2=b2, eps=eps),
                            optax.add_decayed_weights(weight_decay, mask=decay_mask),
                            optax.scale_by_learning_rate(lr))
    if not grad_clip:
        return adamw
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
