"""``project``: every weight matmul of the models (``x @ W`` over the last axes of ``x``),
with a backward pass that picks the order of its weight-gradient matmul.

``jax.grad`` of ``x @ W`` computes the weight gradient as ``(dy^T x)^T``: the matmul's rows
come from the output cotangent ``dy``. On CPU, XLA then stores ``dy`` transposed before the
matmul, and when ``dy`` comes out of an elementwise chain (the GELU backward of an MLP) it
fuses that chain into the transposing loop, which reads its inputs with a stride of a whole
row: 35-70 ms for one ``[2048, 1024]`` MLP gradient of the benchmark GPT2, more
than the matmul itself. :func:`project`'s backward makes the rows of the weight-gradient
matmul come from the smaller of ``x`` and ``dy`` (``x^T dy``, or ``(dy^T x)^T``), so that the
tensor XLA transposes is the cheaper one. Results are the same matmuls' (same sums, same
precision); on TPU and GPU the order does not matter and nothing changes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


def _contract(a: Array, b: Array, a_axes, b_axes) -> Array:
    return jax.lax.dot_general(a, b, ((tuple(a_axes), tuple(b_axes)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x: Array, w: Array, axes: int = 1) -> Array:
    """``x @ w`` over the last ``axes`` axes of ``x`` and the first ``axes`` of ``w``.

    Args:
      x: ``[*lead, *in]`` activations (``in`` = the last ``axes`` axes).
      w: ``[*in, *out]`` weights, in ``x``'s dtype.
      axes: how many axes are contracted.
    Returns:
      ``[*lead, *out]``, e.g. ``x [B, T, D]`` and ``w [D, H, K]`` give ``[B, T, H, K]``.
    """
    return _forward(x, w, axes)


def _forward(x: Array, w: Array, axes: int) -> Array:
    if x.shape[x.ndim - axes:] != w.shape[:axes]:
        raise ValueError(f"project: x {x.shape} and w {w.shape} do not share their "
                         f"{axes} contracted axes")
    return _contract(x, w, range(x.ndim - axes, x.ndim), range(axes))


def _project_fwd(x, w, axes):
    return _forward(x, w, axes), (x, w)


def _project_bwd(axes, residuals, dy):
    x, w = residuals
    lead = x.ndim - axes  # the token axes, summed over for the weight gradient
    n_out = w.ndim - axes
    dy = dy.astype(x.dtype)
    # dx = dy @ w^T over the output axes: [*lead, *in]
    dx = _contract(dy, w, range(lead, dy.ndim), range(axes, w.ndim))
    # dw [*in, *out] = x^T dy over the token axes. The matmul's rows are its lhs' free axes:
    # put the smaller operand there, since XLA CPU transposes that one.
    tokens = range(lead)
    if math.prod(x.shape[lead:]) <= math.prod(dy.shape[lead:]):
        dw = _contract(x, dy, tokens, tokens)
    else:
        dw_t = _contract(dy, x, tokens, tokens)  # [*out, *in]
        dw = jnp.transpose(dw_t, tuple(range(n_out, n_out + axes)) + tuple(range(n_out)))
    return dx, dw.astype(w.dtype)


project.defvjp(_project_fwd, _project_bwd)
