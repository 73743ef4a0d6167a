"""Parity with the official PyTorch Library ``StackAssoMem`` on the shipped fixture.

The fixture (tests/fixtures/README.md) holds the official parameters, logits, loss, layer-0
intermediates, gradients and the parameters after one official AdamW step, all in fp32.
"""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.convert import from_official_library, model_from_official_kwargs, to_official_library
from mmjax.ops import EXP_PARAM_SCALE, leaky_average
from mmjax.train import make_optimizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def fixture():
    arrays = np.load(FIXTURES / "official_library_small.npz")
    meta = json.loads((FIXTURES / "official_library_small.json").read_text())
    return {k: arrays[k] for k in arrays.files}, meta


@pytest.fixture(scope="module")
def official(fixture):
    arrays, meta = fixture
    state_dict = {k.removeprefix("param/"): v for k, v in arrays.items() if k.startswith("param/")}
    return state_dict, meta["config"]


def _loss(model, params, input_ids, targets):
    logits = model.apply({"params": params}, input_ids)
    valid = targets >= 0
    per_token = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(valid, targets, 0)
    )
    return jnp.sum(per_token * valid) / jnp.sum(valid)


def _heads_first_to_last(a):
    """Fixture layout ``(B, nh, T, hs)`` -> mmjax ``(B, T, H, K)``."""
    return np.transpose(a, (0, 2, 1, 3))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_logits_and_loss_match_official(fixture, official, impl):
    arrays, _ = fixture
    model, params = from_official_library(official[0], impl=impl, **official[1])
    logits = model.apply({"params": params}, jnp.asarray(arrays["input_ids"]))
    np.testing.assert_allclose(logits, arrays["logits"], atol=1e-4, rtol=0)
    loss = _loss(model, params, arrays["input_ids"], arrays["targets"])
    np.testing.assert_allclose(loss, arrays["loss"], atol=1e-5, rtol=0)


def test_layer0_intermediates_match_official(fixture, official):
    arrays, _ = fixture
    model, params = from_official_library(official[0], impl="reference", **official[1])
    _, state = model.apply(
        {"params": params}, jnp.asarray(arrays["input_ids"]),
        capture_intermediates=True, mutable=["intermediates"],
    )
    inter = state["intermediates"]["block_0"]
    p0 = params["block_0"]
    close = lambda got, want: np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    ln1_out = inter["norm_1"]["__call__"][0]
    close(ln1_out, arrays["layer0/ln1_out"])
    close(inter["norm_2"]["__call__"][0], arrays["layer0/ln2_out"])
    close(inter["__call__"][0], arrays["layer0/block0_out"])
    # keys before and after the leaky average (op composition of mmjax.layers.memory)
    k_raw = jnp.einsum("btd,dhk->bthk", ln1_out, p0["mixer"]["key"])
    close(k_raw, _heads_first_to_last(arrays["layer0/cm_k_raw"]))
    decay = jnp.exp(-EXP_PARAM_SCALE * jnp.abs(p0["mixer"]["leaky_key_beta"]))
    close(leaky_average(k_raw, decay), _heads_first_to_last(arrays["layer0/cm_k_leaky"]))
    ctx, per = inter["mixer"], inter["ffn"]
    close(ctx["keys"][0], _heads_first_to_last(arrays["layer0/cm_k"]))
    close(ctx["values"][0], _heads_first_to_last(arrays["layer0/cm_v"]))
    v_scale = np.exp(EXP_PARAM_SCALE * np.asarray(p0["mixer"]["value_beta"]))
    close(ctx["values"][0] / v_scale[:, None],
          _heads_first_to_last(arrays["layer0/cm_v_unscaled"]))
    b, t = arrays["input_ids"].shape
    close(ctx["retrieved"][0].reshape(b, t, -1), arrays["layer0/cm_out_pre_cproj"])
    np.testing.assert_array_equal(ctx["retrieved"][0][:, 0], 0.0)  # empty memory at t = 0
    close(ctx["__call__"][0], arrays["layer0/cm_out"])
    close(per["keys"][0], _heads_first_to_last(arrays["layer0/pm_k"]))
    pm_scale = np.exp(EXP_PARAM_SCALE * np.asarray(p0["ffn"]["value_beta"]))
    close(per["retrieved"][0] / pm_scale[:, None],
          _heads_first_to_last(arrays["layer0/pm_pmem_out"]))
    close(per["retrieved"][0].reshape(b, t, -1), arrays["layer0/pm_out_pre_cproj"])
    close(per["__call__"][0], arrays["layer0/pm_out"])


@pytest.fixture(scope="module")
def loss_and_grads(fixture, official):
    arrays, _ = fixture
    model, params = from_official_library(official[0], impl="xla", **official[1])
    loss, grads = jax.value_and_grad(_loss, argnums=1)(
        model, params, arrays["input_ids"], arrays["targets"]
    )
    return params, loss, grads


def test_gradients_match_official(fixture, official, loss_and_grads):
    arrays, _ = fixture
    _, _, grads = loss_and_grads
    ours = to_official_library(grads, **official[1])
    names = {k.removeprefix("grad/") for k in arrays if k.startswith("grad/")}
    assert set(ours) == names
    for name in sorted(names):
        want = arrays[f"grad/{name}"]
        scale = np.max(np.abs(want))
        np.testing.assert_allclose(ours[name], want, atol=1e-4 * scale, rtol=0, err_msg=name)
    global_norm = optax.tree.norm(grads)
    np.testing.assert_allclose(global_norm, arrays["grad_norm_preclip"], rtol=1e-5)


def test_one_adamw_step_matches_official(fixture, official, loss_and_grads):
    arrays, _ = fixture
    params, _, grads = loss_and_grads
    optimizer = make_optimizer(1e-2, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    stepped = to_official_library(optax.apply_updates(params, updates), **official[1])
    for name, value in stepped.items():
        np.testing.assert_allclose(value, arrays[f"step1/{name}"], atol=1e-5, rtol=0,
                                   err_msg=name)


def test_inverse_mapping_round_trips(official):
    state_dict, config = official
    _, params = from_official_library(state_dict, **config)
    back = to_official_library(params, **config)
    assert set(back) == set(state_dict)
    for name, value in state_dict.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_round_trip_with_biases_and_banks_matches_init_tree():
    config = dict(vocab_size=11, n_head=2, n_embd=8, n_layer=2, pmem_size=5, pmem_count=3,
                  bias=True, block_size=16)
    model = model_from_official_kwargs(**config)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
    state_dict = to_official_library(params, **config)
    assert "blocks.1.pmem.pmem.M_v2" in state_dict and "ln_out.bias" in state_dict
    assert state_dict["blocks.0.attn.k_featurizer.conv.bias"].shape == (8,)
    _, again = from_official_library(state_dict, **config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_to_official_accepts_boxed_params_from_init():
    """``model.init`` returns parameters boxed with logical axes; they convert as they are."""
    config = dict(vocab_size=11, n_head=2, n_embd=8, n_layer=1, pmem_size=5, block_size=16)
    model = model_from_official_kwargs(**config)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    boxed = variables["params"]
    assert isinstance(boxed["embedding"]["wte"], nn.Partitioned)
    from_plain = to_official_library(nn.unbox(boxed), **config)
    for given in (boxed, variables):
        converted = to_official_library(given, **config)
        assert set(converted) == set(from_plain)
        for name, value in from_plain.items():
            np.testing.assert_array_equal(converted[name], value, err_msg=name)


# ----------------------------------------------------------------------------- errors


def test_missing_key_is_named(official):
    state_dict, config = official
    broken = {k: v for k, v in state_dict.items() if k != "blocks.1.pmem.kernel_beta"}
    with pytest.raises(ValueError, match=r"missing.*blocks\.1\.pmem\.kernel_beta"):
        from_official_library(broken, **config)


def test_unexpected_key_is_named(official):
    state_dict, config = official
    with pytest.raises(ValueError, match=r"unexpected.*blocks\.9\.extra"):
        from_official_library({**state_dict, "blocks.9.extra": np.zeros(2)}, **config)


def test_wrong_shape_is_named(official):
    state_dict, config = official
    broken = {**state_dict, "blocks.0.attn.c_proj.weight": np.zeros((32, 31), np.float32)}
    pattern = r"blocks\.0\.attn\.c_proj\.weight.*\(32, 32\).*\(32, 31\)"
    with pytest.raises(ValueError, match=pattern):
        from_official_library(broken, **config)


def test_untied_head_is_rejected(official):
    state_dict, config = official
    broken = {**state_dict, "head.weight": state_dict["emb.weight"] + 1.0}
    with pytest.raises(ValueError, match="head.weight"):
        from_official_library(broken, **config)


@pytest.mark.parametrize(
    "kwarg, value",
    [("pre_ln", False), ("attn_only", True), ("weight_tying", False), ("v_shift", 2),
     ("k_kernel_size", 3), ("v_kernel_size", 3), ("k_fe_type", "lowrlinearconv"),
     ("skip_tokens", 4)],
)
def test_unsupported_official_kwarg_is_named(official, kwarg, value):
    state_dict, config = official
    with pytest.raises(NotImplementedError, match=kwarg):
        from_official_library(state_dict, **{**config, kwarg: value})


def test_unknown_official_kwarg_is_named(official):
    state_dict, config = official
    with pytest.raises(ValueError, match="n_heads"):
        from_official_library(state_dict, **{**config, "n_heads": 2})
