"""Choosing the next token from logits: greedy, temperature, top-k, top-p (pure functions).

``logits_BxN`` are fp32 ``[batch, vocab]``. A filtered-out token gets ``-inf`` and so
probability exactly 0: top-k and top-p never sample outside their support.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn.

    Attributes:
      temperature: ``0`` is greedy (argmax); otherwise logits are divided by it (> 0).
      top_k: keep the ``k`` most likely tokens (``0``: all).
      top_p: keep the smallest set of most likely tokens whose probability reaches ``p``
        (nucleus sampling; ``1.0``: all). Applied after top-k and the temperature.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits_BxN: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
    """``logits`` with every token outside the top-k / top-p support set to ``-inf``.

    Top-k keeps exactly ``k`` tokens (ties broken by index); top-p keeps the most likely
    tokens up to and including the first whose cumulative probability reaches ``top_p``
    (at least one token).
    """
    logits_BxN = logits_BxN.astype(jnp.float32)
    n = logits_BxN.shape[-1]
    if 0 < top_k < n:
        _, keep_BxK = jax.lax.top_k(logits_BxN, top_k)
        rows_Bx1 = jnp.arange(logits_BxN.shape[0])[:, None]
        allowed = jnp.zeros(logits_BxN.shape, bool).at[rows_Bx1, keep_BxK].set(True)
        logits_BxN = jnp.where(allowed, logits_BxN, -jnp.inf)
    if top_p < 1.0:
        order_BxN = jnp.argsort(-logits_BxN, axis=-1, stable=True)
        sorted_BxN = jnp.take_along_axis(logits_BxN, order_BxN, axis=-1)
        probs_BxN = jax.nn.softmax(sorted_BxN, axis=-1)
        before_BxN = jnp.cumsum(probs_BxN, axis=-1) - probs_BxN  # mass of the better tokens
        keep_sorted = before_BxN < top_p
        keep_sorted = keep_sorted.at[:, 0].set(True)
        rows_Bx1 = jnp.arange(logits_BxN.shape[0])[:, None]
        allowed = jnp.zeros(logits_BxN.shape, bool).at[rows_Bx1, order_BxN].set(keep_sorted)
        logits_BxN = jnp.where(allowed, logits_BxN, -jnp.inf)
    return logits_BxN


def sample(keys_B: Array, logits_BxN: Array, sampling: Sampling) -> Array:
    """One token per row: int32 ``[batch]``; ``keys_B`` holds one PRNG key per row (so a
    row's draw does not depend on the other rows of the batch)."""
    if sampling.greedy:
        return jnp.argmax(logits_BxN, axis=-1).astype(jnp.int32)
    scaled_BxN = logits_BxN.astype(jnp.float32) / sampling.temperature
    filtered_BxN = filter_logits(scaled_BxN, top_k=sampling.top_k, top_p=sampling.top_p)
    draw = jax.vmap(lambda key, row: jax.random.categorical(key, row))
    return draw(keys_B, filtered_BxN).astype(jnp.int32)
