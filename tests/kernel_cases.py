"""Helpers shared by the kernel tests: random cases and the kernel-vs-reference comparison.

A case is compared on its output and on the gradients of ``sum(y * dy)`` w.r.t. queries, keys,
values and bandwidth. Each array is judged relative to its own largest entry; an array that is
exactly zero in the reference (e.g. every row has at most one visible pair, so the bandwidth
gradient vanishes) is judged relative to the case's overall gradient scale, so float noise on
a true zero never fails a case while a real error still does.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import kernels
from mmjax.ops import retrieval, retrieve_reference

TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}
NAMES = ("y", "dq", "dk", "dv", "dbeta")


def inputs(b, tq, tk, h, dk, dv, dtype, seed=0, bandwidth="rows"):
    """Random ``q [b, tq, h, dk]``, ``k [b, tk, h, dk]``, ``v [b, tk, h, dv]``, bandwidth,
    and an fp32 cotangent ``dy [b, tq, h, dv]``."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, tq, h, dk), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, tk, h, dk), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, tk, h, dv), jnp.float32).astype(dtype)
    dy = jax.random.normal(ks[4], (b, tq, h, dv), jnp.float32)
    shape = {"rows": (tq, h), "heads": (h,)}[bandwidth]
    beta = jax.random.uniform(ks[3], shape, minval=0.1, maxval=0.6)
    return q, k, v, beta, dy


def value_and_grads(fn, q, k, v, beta, dy):
    """``(y, dq, dk, dv, dbeta)`` of ``fn(q, k, v, beta)`` under the loss ``sum(y * dy)``."""
    def loss(q, k, v, beta):
        y = fn(q, k, v, beta)
        return jnp.sum(y.astype(jnp.float32) * dy), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, beta)
    return (y, *grads)


def relative_errors(got, want, names=NAMES):
    """``{name: max|got - want| / scale}`` with the scales described in the module docstring."""
    pairs = [(np.asarray(a, np.float32), np.asarray(b, np.float32)) for a, b in zip(got, want,
                                                                                     strict=True)]
    case_scale = max((float(np.max(np.abs(b), initial=0.0)) for _, b in pairs), default=0.0)
    errors = {}
    for name, (a, b) in zip(names, pairs, strict=True):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert np.all(np.isfinite(a)), f"{name} has non-finite entries"
        scale = float(np.max(np.abs(b), initial=0.0)) or case_scale or 1.0
        errors[name] = float(np.max(np.abs(a - b), initial=0.0)) / scale
    return errors


def assert_close(got, want, tol, names=NAMES, context=""):
    errors = relative_errors(got, want, names)
    bad = {name: f"{err:.3g}" for name, err in errors.items() if not err <= tol}
    assert not bad, f"{context} relative errors above {tol}: {bad}"


def check(platform, tq, tk, mask, *, offset=0, dtype=jnp.float32, blocks=None,
          bandwidth="rows", b=1, h=2, dk=16, dv=16, interpret=True, seed=0):
    """The Pallas kernel of ``platform`` against ``retrieve_reference``: value and gradients.

    The bandwidth gradient is compared per row ``[tq, h]``, as the kernel produces it, also
    for a ``[heads]`` bandwidth (``bandwidth="heads"`` draws one value per head): the sum over
    rows that turns it into the gradient of a ``[heads]`` bandwidth is XLA's, and its float
    noise grows with the length.
    """
    q, k, v, beta, dy = inputs(b, tq, tk, h, dk, dv, dtype, seed=seed, bandwidth=bandwidth)
    rows = retrieval._bandwidth_rows(beta, tq, h)

    def kernel(q, k, v, rows):
        return kernels.retrieve_pallas(q, k, v, rows, mask, jnp.int32(offset),
                                       platform=platform, block_sizes=blocks,
                                       interpret=interpret)

    def reference(q, k, v, rows):
        return retrieve_reference(q, k, v, rows, mask, jnp.int32(offset))

    got = value_and_grads(kernel, q, k, v, rows, dy)
    want = value_and_grads(reference, q, k, v, rows, dy)
    context = (f"{platform} tq={tq} tk={tk} offset={offset} {mask} {jnp.dtype(dtype).name} "
               f"{blocks}:")
    assert_close(got, want, TOL[jnp.dtype(dtype)], context=context)
