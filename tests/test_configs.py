"""Every config file parses, every preset it declares parses, and every LM config builds its
model abstractly (jax.eval_shape: no memory, so the 8B configs are checked too)."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import build_model, registered_models
from mmjax.train import defaults
from mmjax.train.loop import train_and_evaluate

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.py")) + [pathlib.Path(defaults.__file__)]


def load(path):
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases():
    for path in CONFIG_FILES:
        module = load(path)
        for preset in (None, *getattr(module, "PRESETS", ())):
            yield pytest.param(path, preset, id=f"{path.stem}:{preset or ''}")


@pytest.mark.parametrize("path, preset", list(cases()))
def test_config_builds(path, preset):
    module = load(path)
    assert module.__doc__ and "python -m" in module.__doc__, "docstring must give the command"
    config = module.get_config(preset)
    if "model" not in config or config.model.get("name") not in registered_models():
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
    {f"{path.name}:tiny" for path in CONFIG_FILES
     if "tiny" in getattr(load(path), "PRESETS", ()) and "model" in load(path).get_config("tiny")}
)


@pytest.mark.parametrize("spec", TINY_LM_PRESETS)
def test_tiny_preset_trains_through_the_loop(spec):
    """Each LM config's tiny preset runs two real steps of ``python -m mmjax.train``."""
    name, _, preset = spec.partition(":")
    config = load(CONFIG_DIR / name).get_config(preset)
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
