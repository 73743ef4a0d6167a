"""The one config every language model shares, and old saved configs still building."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from mmjax.layers.common import MODEL_CONFIG_KEYS, LanguageModel, ModelConfig
from mmjax.models import build_model, model_class, registered_models, upgrade_model_config

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
LANGUAGE_MODELS = ("gpt2", "llama", "llama_short_long", "memory_mosaic", "memory_mosaic_v2")
SHARED = ("vocab_size", "embed_dim", "num_layers", "num_heads", "dropout_rate", "dtype",
          "param_dtype", "init_std", "scan_layers", "remat", "impl")
TINY = dict(vocab_size=32, embed_dim=16, num_layers=1, num_heads=2)


def test_the_shared_config_has_the_shared_keys():
    assert set(MODEL_CONFIG_KEYS) == set(SHARED)
    assert {f.name for f in dataclasses.fields(ModelConfig)} == set(SHARED)


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_every_language_model_takes_the_shared_keys_as_its_config(name):
    cls = model_class(name)
    assert issubclass(cls, LanguageModel)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}
    assert fields["config"].type in (ModelConfig, "ModelConfig")
    assert not set(fields) & set(SHARED), "a shared key declared again by the model"
    model = build_model({"name": name, **TINY, "dropout_rate": 0.1})
    assert model.config == ModelConfig(**TINY, dropout_rate=0.1)
    assert model.vocab_size == model.config.vocab_size == 32


def test_every_registered_language_model_is_covered():
    lms = {n for n in registered_models() if issubclass(model_class(n), LanguageModel)}
    assert lms == set(LANGUAGE_MODELS)


@pytest.mark.parametrize("change, key", [
    (dict(num_heads=3), "model.num_heads=3 must divide model.embed_dim=16"),
    (dict(dropout_rate=-0.1), "model.dropout_rate=-0.1"),
    (dict(num_layers=0), "model.num_layers=0"),
    (dict(init_std=0.0), "model.init_std=0.0"),
    (dict(dtype="int8"), "model.dtype='int8'"),
    (dict(remat="sometimes"), "model.remat='sometimes'"),
])
def test_a_bad_shared_value_is_one_error_naming_the_key(change, key):
    with pytest.raises(ValueError, match=f"^invalid model config: {key}"):
        ModelConfig(**(TINY | change))
    for name in LANGUAGE_MODELS:  # at build time: nothing is traced or compiled
        with pytest.raises(ValueError, match=key):
            build_model({"name": name, **TINY, **change})


def test_a_missing_size_is_named():
    with pytest.raises(ValueError, match=r"model 'memory_mosaic' needs config key\(s\) "
                                         r"\['vocab_size'\]"):
        build_model({"name": "memory_mosaic", "num_layers": 1})


def _shape_table(params) -> dict[str, list[int]]:
    """``{"block_0/ffn/key/.value": shape}``: the parameter paths as the fixture writes them."""
    def part(key):
        return f".{key.name}" if isinstance(key, jax.tree_util.GetAttrKey) else str(key.key)
    return {"/".join(part(k) for k in path): list(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


SAVED = json.loads((FIXTURES / "saved_model_configs.json").read_text())


@pytest.mark.parametrize("name", sorted(SAVED))
def test_a_config_saved_before_the_shared_config_builds_the_same_parameters(name):
    saved = SAVED[name]
    model = build_model(saved["config"]["model"])
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert _shape_table(shapes["params"]) == saved["param_shapes"]


def test_old_keys_become_the_shared_ones():
    v1 = upgrade_model_config(dict(name="memory_mosaic", hd_dropout=0.1, ic_dropout=0.2,
                                   context_length=512, **TINY))
    assert v1 == dict(name="memory_mosaic", dropout_rate=0.1, pmem_attention_dropout=0.2,
                      **TINY)
    gpt2 = upgrade_model_config(dict(name="gpt2", mlp_ratio=4, **TINY))
    assert gpt2 == dict(name="gpt2", mlp_dim=64, **TINY)
    assert upgrade_model_config(dict(name="gpt2", mlp_ratio=4))["mlp_dim"] == 4 * 768
    assert build_model(dict(name="memory_mosaic", hd_dropout=0.1, **TINY)).dropout_rate == 0.1


def test_an_old_key_beside_its_new_one_raises():
    with pytest.raises(ValueError, match="'hd_dropout' is the old name of 'dropout_rate'"):
        build_model(dict(name="memory_mosaic", hd_dropout=0.1, dropout_rate=0.1, **TINY))


def test_short_long_attention_is_a_layer():
    from mmjax.layers.attention import ShortLongAttention

    assert ShortLongAttention.__module__ == "mmjax.layers.attention"


# The model-specific keys a tiny model of each language model needs.
OWN = {"gpt2": dict(mlp_dim=32), "llama": dict(mlp_dim=32), "memory_mosaic": dict(pmem_size=8),
       "llama_short_long": dict(mlp_dim=32, short_term_window=4, long_term_skip_range=(4, 8),
                                inference_long_term_skip=4),
       "memory_mosaic_v2": dict(mlp_dim=32, short_term_window=4, long_term_skip_range=(4, 8),
                                inference_long_term_skip=4)}


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_param_dtype_is_every_parameter_s_storage_dtype(name):
    model = build_model({"name": name, **TINY, **OWN[name], "param_dtype": "bfloat16"})
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes["params"])} == {jnp.dtype("bfloat16")}
