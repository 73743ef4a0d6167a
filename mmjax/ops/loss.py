"""The language-model loss: next-token cross-entropy, from logits or fused with the LM head.

    nll_bt = logsumexp_n(l_btn) - l_bt[y_bt],   l_btn = scale * <h_bt, W_:n>

Targets ``-1`` are ignored (padding, the last position of a sequence). A target outside
``[-1, vocab)`` never wraps or reads a wrong row: concrete targets raise a ``ValueError``
naming the first bad id; traced ones make the loss NaN (the trainer's non-finite guard then
stops the run and names the step).

:func:`lm_head_loss` never materialises the fp32 logits of the whole batch: it walks the
time axis in chunks of ``chunk`` positions (the batch axis, sharded over devices, stays
whole in every chunk), keeps one log-sum-exp per position, and a ``jax.custom_vjp``
backward recomputes each chunk's logits to form ``d hidden`` and ``d head``. Peak memory
for the logits: ``batch x chunk x vocab`` fp32 instead of ``batch x time x vocab`` (at vocab
128k and context 32k, 17 MB per row and chunk of 32 positions against 17 GB per row); the
price is one more ``hidden @ head`` product in the backward. ``chunk=0`` computes the dense
logits and lets JAX differentiate them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array

IGNORE = -1


def check_targets(targets_BxT, vocab_size: int) -> None:
    """Raises a one-line ``ValueError`` for a concrete target outside ``[-1, vocab_size)``;
    traced targets are checked inside the loss instead (NaN)."""
    if isinstance(targets_BxT, jax.core.Tracer):
        return
    t = np.asarray(targets_BxT)
    bad = (t < IGNORE) | (t >= vocab_size)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"target id {int(t[first])} at position {first} is outside the "
                         f"vocabulary [0, {vocab_size}) (-1 means ignored)")


def _reduce(nll_BxT: Array, targets_BxT: Array):
    """``(loss, loss_per_position_T, tokens)`` from per-position NLLs (NaN at out-of-range
    targets); ignored targets do not count."""
    valid_BxT = targets_BxT != IGNORE
    nll_BxT = jnp.where(valid_BxT, nll_BxT, 0.0)
    tokens = jnp.sum(valid_BxT)
    loss = jnp.sum(nll_BxT) / jnp.maximum(tokens, 1)
    per_position_T = jnp.sum(nll_BxT, 0) / jnp.maximum(jnp.sum(valid_BxT, 0), 1)
    return loss, per_position_T, tokens


def cross_entropy(logits_BxTxN: Array, targets_BxT: Array):
    """Mean next-token cross-entropy of fp32 logits over positions whose target is not -1.

    Returns:
      ``(loss, loss_per_position_T, tokens)``: the scalar mean, the mean over the batch at
      each position (for in-context-learning curves), and the number of counted targets.
    """
    vocab = logits_BxTxN.shape[-1]
    check_targets(targets_BxT, vocab)
    logits = logits_BxTxN.astype(jnp.float32)
    in_vocab = (targets_BxT >= 0) & (targets_BxT < vocab)
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(in_vocab, targets_BxT, 0))
    nll_BxT = jnp.where(in_vocab | (targets_BxT == IGNORE), nll_BxT, jnp.nan)
    return _reduce(nll_BxT, targets_BxT)


def lm_head_loss(hidden_BxTxD: Array, head_DxN: Array, targets_BxT: Array, *,
                 logit_scale: float = 1.0, chunk: int = 0):
    """Cross-entropy of the logits ``logit_scale * hidden @ head``, fused and chunked.

    Args:
      hidden_BxTxD: the final hidden states (after the final norm), any float dtype; the
        product runs in this dtype with fp32 accumulation.
      head_DxN: the output matrix (``wte.T`` when tied, else ``lm_head``).
      targets_BxT: int targets, -1 ignored.
      logit_scale: a Python float multiplying the logits (v1: ``1/sqrt(D)``).
      chunk: positions per chunk (clipped to the time axis); 0: dense logits.
    Returns:
      ``(loss, loss_per_position_T, tokens)`` as :func:`cross_entropy`.
    """
    b, t, _ = hidden_BxTxD.shape
    vocab = head_DxN.shape[-1]
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0, got {chunk}")
    head_DxN = head_DxN.astype(hidden_BxTxD.dtype)
    if chunk == 0:
        logits = jnp.einsum("btd,dn->btn", hidden_BxTxD, head_DxN,
                            preferred_element_type=jnp.float32) * logit_scale
        return cross_entropy(logits, targets_BxT)
    check_targets(targets_BxT, vocab)
    chunk = min(chunk, t)
    pad = (-t) % chunk
    h = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets_BxT, ((0, 0), (0, pad)), constant_values=IGNORE)
    in_vocab = (y >= 0) & (y < vocab)
    nll_BxT = _chunked_nll(h, head_DxN, jnp.where(in_vocab, y, 0), float(logit_scale), chunk)
    nll_BxT = jnp.where(in_vocab | (y == IGNORE), nll_BxT, jnp.nan)[:, :t]
    return _reduce(nll_BxT, targets_BxT)


def _chunks(x_BxTx_, chunk: int) -> Array:
    """``[B, T, ...] -> [T / chunk, B, chunk, ...]`` (scanned over the first axis)."""
    b, t = x_BxTx_.shape[:2]
    x = x_BxTx_.reshape(b, t // chunk, chunk, *x_BxTx_.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def _unchunk(x_KxBxC: Array) -> Array:
    k, b, c = x_KxBxC.shape[:3]
    return jnp.swapaxes(x_KxBxC, 0, 1).reshape(b, k * c, *x_KxBxC.shape[3:])


def _chunk_logits(h_BxCxD, head_DxN, scale):
    return jnp.einsum("bcd,dn->bcn", h_BxCxD, head_DxN,
                      preferred_element_type=jnp.float32) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_nll(h_BxTxD, head_DxN, y_BxT, scale, chunk):
    return _chunked_nll_fwd(h_BxTxD, head_DxN, y_BxT, scale, chunk)[0]


def _chunked_nll_fwd(h_BxTxD, head_DxN, y_BxT, scale, chunk):
    def step(_, xs):
        h_BxCxD, y_BxC = xs
        logits_BxCxN = _chunk_logits(h_BxCxD, head_DxN, scale)
        lse_BxC = jax.nn.logsumexp(logits_BxCxN, axis=-1)
        picked_BxC = jnp.take_along_axis(logits_BxCxN, y_BxC[..., None], axis=-1)[..., 0]
        return None, (lse_BxC - picked_BxC, lse_BxC)

    _, (nll, lse) = jax.lax.scan(step, None, (_chunks(h_BxTxD, chunk), _chunks(y_BxT, chunk)))
    return _unchunk(nll), (h_BxTxD, head_DxN, y_BxT, lse)


def _chunked_nll_bwd(scale, chunk, residuals, g_BxT):
    h_BxTxD, head_DxN, y_BxT, lse_KxBxC = residuals
    vocab = head_DxN.shape[-1]

    def step(dhead_DxN, xs):
        h_BxCxD, y_BxC, lse_BxC, g_BxC = xs
        logits_BxCxN = _chunk_logits(h_BxCxD, head_DxN, scale)
        p_BxCxN = jnp.exp(logits_BxCxN - lse_BxC[..., None])
        onehot = jax.nn.one_hot(y_BxC, vocab, dtype=jnp.float32)
        dlogits_BxCxN = (p_BxCxN - onehot) * (g_BxC * scale)[..., None]
        dlogits_BxCxN = dlogits_BxCxN.astype(h_BxCxD.dtype)
        dh_BxCxD = jnp.einsum("bcn,dn->bcd", dlogits_BxCxN, head_DxN,
                              preferred_element_type=jnp.float32)
        dhead_DxN = dhead_DxN + jnp.einsum("bcd,bcn->dn", h_BxCxD, dlogits_BxCxN,
                                           preferred_element_type=jnp.float32)
        return dhead_DxN, dh_BxCxD

    xs = (_chunks(h_BxTxD, chunk), _chunks(y_BxT, chunk), lse_KxBxC,
          _chunks(g_BxT.astype(jnp.float32), chunk))
    dhead, dh = jax.lax.scan(step, jnp.zeros(head_DxN.shape, jnp.float32), xs)
    dy = np.zeros(y_BxT.shape, jax.dtypes.float0)
    return _unchunk(dh).astype(h_BxTxD.dtype), dhead.astype(head_DxN.dtype), dy


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)
