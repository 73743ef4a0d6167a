"""The config base: one preset parser, one set of defaults, the vocabulary said once."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_loading import load_config

from mmjax.config import (
    DEFAULTS,
    default_config,
    lm_config,
    make_config,
    parse_presets,
    with_defaults,
)
from mmjax.models import build_model
from mmjax.models.memory_mosaic import MemoryMosaic
from mmjax.train import make_optimizer
from mmjax.train.loop import Trainer


@pytest.mark.parametrize("preset", [None, "tiny"])
def test_mm_v1_small_presets_build(preset):
    config = load_config("mm_v1_small.py" + (f":{preset}" if preset else ""))
    model = build_model(config.model)
    assert isinstance(model, MemoryMosaic)
    ids = jax.ShapeDtypeStruct((2, config.data.context_length), jnp.int32)
    shapes = jax.eval_shape(lambda ids: model.init(jax.random.key(0), ids), ids)
    logits = jax.eval_shape(
        lambda p, ids: model.apply(p, ids), shapes, ids)
    assert logits.shape == (2, config.data.context_length, config.model.vocab_size)
    assert "vocab_size" not in config.data
    optimizer = make_optimizer(**config.optimizer)
    jax.eval_shape(optimizer.init, nn.unbox(shapes["params"]))
    if preset is None:
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
        # 12 * 12 * 768^2 (GPT2-small-like block budget) + tied 50304 x 768 embedding
        assert count == pytest.approx(12 * 12 * 768**2 + 50304 * 768, rel=1e-3)


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="preset"):
        load_config("mm_v1_small.py:huge")


def test_parse_presets_flags_and_values():
    assert parse_presets(None, ("tiny",)) == {}
    assert parse_presets("tiny,finetune", ("tiny", "finetune")) == {"tiny": True,
                                                                    "finetune": True}
    assert parse_presets("heads=1,steps=7", values=("heads", "steps")) == {"heads": 1,
                                                                           "steps": 7}
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*\['tiny'\]"):
        parse_presets("huge", ("tiny",))
    with pytest.raises(ValueError, match="unknown preset 'tiny=3'"):
        parse_presets("tiny=3", ("tiny",))
    with pytest.raises(ValueError, match="heads must be an integer"):
        parse_presets("heads=x", values=("heads",))


@pytest.mark.parametrize("spec", ["moons.py:heads=1", "mm_v1_small.py:tiny", "gpt2_small.py:tiny"])
def test_every_config_file_uses_the_one_parser(spec):
    """The same message for an unknown preset, whatever the file (three moons included)."""
    name = spec.partition(":")[0]
    load_config(spec)
    with pytest.raises(ValueError, match="unknown preset 'nonsense'"):
        load_config(f"{name}:nonsense")


def test_one_set_of_defaults():
    """The loop and every LM config read their optional settings from DEFAULTS."""
    assert DEFAULTS["checkpoint"]["max_to_keep"] == 3
    for config in (default_config(), load_config("mm_v1_small.py"),
                   load_config("mmv2.py:tiny")):
        assert config.checkpoint.max_to_keep == DEFAULTS["checkpoint"]["max_to_keep"]
        assert tuple(config.sharding.mesh) == DEFAULTS["sharding"]["mesh"]
    bare = with_defaults(make_config(model={"name": "x"}))
    assert bare.checkpoint.to_dict() == DEFAULTS["checkpoint"]
    assert bare.train.to_dict() == DEFAULTS["train"]


def test_vocab_size_is_said_once():
    with pytest.raises(ValueError, match="said once"):
        lm_config(dict(name="gpt2", vocab_size=8), optimizer={}, train={},
                  data=dict(vocab_size=8))
    config = default_config()
    assert "vocab_size" not in config.data
    trainer = Trainer(config)
    assert trainer.corpus.vocab_size == config.model.vocab_size
