"""v2 layers against slow references written directly from the formulas."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.layers.memory_v2 import MemoryConfig, MemoryTier, ThreeTierMemory
from mmjax.ops import (
    MaskSpec,
    adaptive_bandwidth,
    bandwidth_parameters,
    gated_keys,
    inverse_bandwidth_parameters,
    validate_skip_schedule,
)

CAP = 10.0


def _tier(**kwargs):
    """A tier of 2 heads of width 4."""
    return MemoryTier(config=MemoryConfig(num_heads=2, head_dim=4, **kwargs))


def _softplus(x):
    return np.log1p(np.exp(x))


def _unit(x):
    n = np.linalg.norm(x)
    return x / n if n > 0 else x


def _reference_keys(xk, gate_logit, decay_logit, cap):
    """kbar_t = g_t k~_t + lam_t kbar_{t-1}, by a Python loop, then normalised."""
    b, t, h, _ = xk.shape
    g = np.exp(cap * np.tanh(gate_logit / cap))
    lam = np.exp(-np.abs(decay_logit))
    out = np.zeros(xk.shape)
    for bi in range(b):
        for hi in range(h):
            kbar = np.zeros(xk.shape[-1])
            for ti in range(t):
                kbar = g[bi, ti, hi] * xk[bi, ti, hi] + lam[bi, ti, hi] * kbar
                out[bi, ti, hi] = _unit(kbar)
    return out


def _reference_tier(x, p, window, skip, cap=CAP):
    """One memory tier computed from the module docstring's formulas with loops."""
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    xk = np.einsum("btd,dhk->bthk", x, p["key"])
    u = np.einsum("btd,dhk->bthk", x, p["value"])
    keys = _reference_keys(xk, x @ p["gate"], x @ p["decay"], cap)
    b, t, h, k = xk.shape
    beta0, beta1 = _softplus(p["beta0"]), _softplus(p["beta1"]) + 1e-6
    alpha = 1e-4 + (1 - 2e-4) / (1 + np.exp(-p["alpha"]))
    out = np.zeros((b, t, h, k))
    for bi in range(b):
        for hi in range(h):
            c = p["value_mix"][hi]
            vals = []
            for ti in range(t):
                ahead = u[bi, ti + 1, hi] if ti + 1 < t else np.zeros(k)
                vals.append(_unit((1 - c) * ahead + c * u[bi, ti, hi])
                            * np.exp(10 * p["value_beta"][hi]))
            for ti in range(t):
                visible = [i for i in range(t) if i <= ti - 1 - skip
                           and (window is None or i >= ti - window)]
                if not visible:
                    continue
                beta = beta1[hi] * len(visible) ** alpha[hi] + beta0[hi]
                s = np.array([beta * keys[bi, ti, hi] @ keys[bi, i, hi] for i in visible])
                w = np.exp(s - s.max())
                w /= w.sum()
                out[bi, ti, hi] = sum(wi * vals[i] for wi, i in zip(w, visible, strict=True))
    return out


def _tier_params(mod, x, seed):
    p = flax.core.meta.unbox(mod.init(jax.random.key(seed), x, mask=MaskSpec())["params"])
    # move the bandwidth away from its init so that each parameter matters
    rng = np.random.default_rng(seed)
    for name in ("beta0", "beta1", "alpha"):
        p[name] = p[name] + jnp.asarray(rng.normal(size=p[name].shape), jnp.float32)
    return p


@pytest.mark.parametrize("tier,window,skip", [("short", 3, 0), ("long", None, 2),
                                              ("long", None, 0), ("both", 4, 1)])
def test_tier_matches_formula_reference(tier, window, skip):
    x = jax.random.normal(jax.random.key(0), (2, 10, 8))
    mod = _tier(init_std=0.5, impl="reference")
    mask = MaskSpec(window=window, skip=skip)
    p = _tier_params(mod, x, seed=len(tier) + skip)
    out = mod.apply({"params": p}, x, mask=mask)
    np.testing.assert_allclose(out, _reference_tier(x, p, window, skip), atol=2e-5)
    out_xla = _tier(impl="xla").apply({"params": p}, x, mask=mask)
    np.testing.assert_allclose(out_xla, out, atol=2e-5)


def test_gated_keys_match_loop_and_are_unit():
    xk, gate, decay = jax.random.normal(jax.random.key(1), (3, 2, 7, 3, 4))
    gate, decay = 3 * gate[..., 0], decay[..., 0]
    keys = gated_keys(xk, gate, decay, CAP)
    np.testing.assert_allclose(keys, _reference_keys(*map(np.asarray, (xk, gate, decay)), CAP),
                               atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(keys, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_keys_bounded_for_huge_gate_logits(dtype):
    xk = jax.random.normal(jax.random.key(2), (1, 64, 2, 4)).astype(dtype)
    huge = jnp.full((1, 64, 2), 1e4, dtype)
    keys = gated_keys(xk, huge, jnp.zeros_like(huge), CAP)
    assert jnp.isfinite(keys).all()
    # with lam = 1 and equal capped gates the key is the running sum direction
    want = np.asarray(xk, np.float64)[0].cumsum(0)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(keys[0], want, atol=1e-5)
    grads = jax.jit(jax.grad(lambda z: gated_keys(xk, z, -huge, CAP).sum()))(huge)
    assert jnp.isfinite(grads.astype(jnp.float32)).all()


def test_adaptive_bandwidth_formula_and_constraints():
    raw = jnp.array([[-300.0, -300.0, -300.0], [0.0, 0.0, 0.0], [300.0, 5.0, 300.0]]).T
    beta0, beta1, alpha = bandwidth_parameters(*raw)
    assert (beta0 >= 0).all() and (beta1 > 0).all()
    assert ((alpha > 0) & (alpha < 1)).all()
    n = jnp.array([0, 1, 2, 100, 5000])
    beta = adaptive_bandwidth(n, beta0, beta1, alpha)
    want = np.where(np.asarray(n)[:, None] > 0,
                    np.asarray(beta1) * np.asarray(n, np.float64)[:, None] ** np.asarray(alpha),
                    0.0) + np.asarray(beta0)
    np.testing.assert_allclose(beta, want, rtol=1e-5)
    np.testing.assert_allclose(bandwidth_parameters(*map(jnp.asarray, inverse_bandwidth_parameters(
        0.5, 2.0, 0.3))), (0.5, 2.0, 0.3), rtol=1e-5)
    with pytest.raises(ValueError, match="bandwidth_init"):
        inverse_bandwidth_parameters(1.0, 1.0, 1.5)


def test_gradients_reach_bandwidth_and_gates():
    x = jax.random.normal(jax.random.key(3), (2, 12, 8))
    mod, mask = _tier(impl="xla"), MaskSpec(window=5, skip=1)
    p = flax.core.meta.unbox(mod.init(jax.random.key(4), x, mask=mask)["params"])
    target = jax.random.normal(jax.random.key(5), (2, 12, 2, 4))
    grads = jax.grad(lambda q: jnp.sum((mod.apply({"params": q}, x, mask=mask) - target) ** 2))(p)
    for name in ("beta0", "beta1", "alpha", "gate", "decay", "key", "value", "value_mix"):
        g = np.asarray(grads[name])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name


def test_three_tier_layout_and_fusion():
    x = jax.random.normal(jax.random.key(6), (1, 9, 8))
    for long_term, heads in ((True, 4), (False, 2)):
        mod = ThreeTierMemory(config=MemoryConfig(num_heads=2, head_dim=4, short_term_window=3,
                                                  long_term=long_term, impl="reference"))
        p = flax.core.meta.unbox(mod.init(jax.random.key(7), x, deterministic=True,
                                          long_term_skip=2)["params"])
        assert p["out"]["kernel"].shape == (heads, 4, 8)
        assert ("long_term" in p) == long_term
        tiers = [_tier(impl="reference").apply(
            {"params": p["short_term"]}, x, mask=MaskSpec(window=3))]
        if long_term:
            tiers.append(_tier(impl="reference").apply(
                {"params": p["long_term"]}, x, mask=MaskSpec(skip=2)))
        want = jnp.einsum("bthv,hvd->btd", jnp.concatenate(tiers, 2), p["out"]["kernel"])
        got = mod.apply({"params": p}, x, deterministic=True, long_term_skip=2)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_bf16_tier_close_to_fp32():
    x = jax.random.normal(jax.random.key(8), (2, 16, 8))
    mod, mask = _tier(impl="xla"), MaskSpec(window=6, skip=1)
    p = flax.core.meta.unbox(mod.init(jax.random.key(9), x, mask=mask)["params"])
    out32 = mod.apply({"params": p}, x, mask=mask)
    bf16 = _tier(impl="xla", dtype=jnp.bfloat16)
    out16 = bf16.apply({"params": p}, x.astype(jnp.bfloat16), mask=mask)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=5e-2)


def test_schedule_validation_errors():
    with pytest.raises(ValueError, match="short_term_window"):
        validate_skip_schedule(0, (64, 256), 64)
    with pytest.raises(ValueError, match="long_term_skip_range"):
        validate_skip_schedule(256, (64,), 64)
    with pytest.raises(ValueError, match="inference_long_term_skip"):
        validate_skip_schedule(256, (64, 256), -1)
    with pytest.raises(ValueError, match="gate_cap"):
        _tier(gate_cap=0.0).init(jax.random.key(0), jnp.zeros((1, 3, 8)), mask=MaskSpec())
