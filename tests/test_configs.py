"""Every config file parses, every preset it declares parses, and every LM config builds its
model abstractly (jax.eval_shape: no memory, so the 8B configs are checked too)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.config import CONFIGS, DEFAULT, config_module, default_config, load
from mmjax.models import build_model, registered_models
from mmjax.train.loop import train_and_evaluate

CONFIG_FILES = sorted(path.name for path in CONFIGS.glob("*.py"))


def cases():
    yield pytest.param(DEFAULT, id=DEFAULT)
    for name in CONFIG_FILES:
        for preset in (None, *getattr(config_module(name), "PRESETS", ())):
            yield pytest.param(f"{name}:{preset}" if preset else name,
                               id=f"{name.removesuffix('.py')}:{preset or ''}")


@pytest.mark.parametrize("spec", list(cases()))
def test_config_builds(spec):
    path = spec.partition(":")[0]
    doc = default_config.__doc__ if spec == DEFAULT else config_module(path).__doc__
    assert doc and "python -m" in doc, "docstring must give the command"
    config = load(spec)
    if ("model" not in config or config.get("task", "lm") != "lm"  # the three moons: not an LM
            or config.model.get("name") not in registered_models()):
        return
    model = build_model(config.model)
    length = min(int(config.data.context_length), 64)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    variables = jax.eval_shape(lambda i: model.init(jax.random.key(0), i, deterministic=True),
                               ids)
    logits = jax.eval_shape(lambda v, i: model.apply(v, i, deterministic=True), variables, ids)
    assert logits.shape == (1, length, config.model.vocab_size)
    assert "vocab_size" not in config.data  # said once, in the model


TINY_LM_PRESETS = sorted(
    f"{name}:tiny" for name in CONFIG_FILES
    if "tiny" in getattr(config_module(name), "PRESETS", ()) and "model" in load(f"{name}:tiny")
    and load(f"{name}:tiny").get("task", "lm") == "lm")  # the moons' tiny: tests/test_moons_*


@pytest.mark.parametrize("spec", TINY_LM_PRESETS)
def test_tiny_preset_trains_through_the_loop(spec):
    """Each LM config's tiny preset runs two real steps of ``python -m mmjax.train``."""
    config = load(spec)
    config.train.num_steps = 2
    config.train.eval_batches = 1
    out = train_and_evaluate(config, progress=False)
    assert len(out["history"]) == 2
    assert all(np.isfinite(h["loss"]) for h in out["history"])


def test_config_files_exist():
    assert len(CONFIG_FILES) >= 2


def test_build_model_rejects_unknown_names_and_keys():
    with pytest.raises(ValueError, match="unknown model name"):
        build_model({"name": "gpt5"})
    name = registered_models()[0]
    with pytest.raises(ValueError, match="has no config key"):
        build_model({"name": name, "no_such_key": 1})
