"""Full networks, built from a config by name.

Every language model here is a Flax linen module called as
``model.apply({"params": params}, input_ids, deterministic=True) -> logits [B, T, N]``;
training passes ``deterministic=False`` and the rng streams it needs (``"dropout"``, ...).
``build_model(config.model)`` instantiates the class registered under ``config.model.name``
with the other keys of that config as its fields. One registered model is not a language
model: ``"moons_memory"`` (:mod:`mmjax.models.moons`, the three-moons toy), called on
observations ``[B, T, 2 M]``; the trainer trains it through its own task (``config.task``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from mmjax.layers.common import MODEL_CONFIG_KEYS, LanguageModel, ModelConfig

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a model buildable as ``build_model({"name": name, ...})``."""

    def wrap(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_models() -> tuple[str, ...]:
    _import_all()
    return tuple(sorted(_REGISTRY))


def model_class(name: str) -> type:
    """The class registered under ``name``; raises a ``ValueError`` listing the known names."""
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_model(model_config: Mapping[str, Any]):
    """Instantiate the model named ``model_config["name"]`` from the other keys.

    A language model (:class:`mmjax.layers.common.LanguageModel`) gets the shared keys
    (:data:`mmjax.layers.common.MODEL_CONFIG_KEYS`) as its ``config``, those it leaves out
    from its ``config_defaults``, and the other keys as its own fields; any other model gets
    every key as a field. Keys of configs saved before the shared model config are translated
    first (:func:`upgrade_model_config`), so old workdirs still build. Raises a ``ValueError``
    naming the unknown model, the config keys the model does not have (with the ones it
    does), a missing size, or a bad value.
    """
    _import_all()
    cls = model_class(model_config.get("name"))
    fields = upgrade_model_config(model_config)
    name = fields.pop("name")
    own = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}
    language_model = issubclass(cls, LanguageModel)
    known = (own - {"config"}) | set(MODEL_CONFIG_KEYS) if language_model else own
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"model {name!r} has no config key(s) {unknown}; "
                         f"valid keys: {sorted(known)}")
    if not language_model:
        return cls(**fields)
    shared = cls.config_defaults | {k: fields.pop(k) for k in MODEL_CONFIG_KEYS if k in fields}
    missing = [f.name for f in dataclasses.fields(ModelConfig)
               if f.default is dataclasses.MISSING and f.name not in shared]
    if missing:
        raise ValueError(f"model {name!r} needs config key(s) {missing}")
    return cls(config=ModelConfig(**shared), **fields)


# Model-config keys renamed when the language models took one shared config, by model:
# {old key: new key}. Workdirs saved before then hold the old keys.
RENAMED_KEYS: dict[str, dict[str, str]] = {
    "memory_mosaic": {"hd_dropout": "dropout_rate", "ic_dropout": "pmem_attention_dropout"}}
# Keys dropped then (read by nothing), by model.
DROPPED_KEYS: dict[str, tuple[str, ...]] = {"memory_mosaic": ("context_length",)}


def upgrade_model_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """``model_config`` with the keys of configs saved before the shared model config in
    their current form: v1's ``hd_dropout`` -> ``dropout_rate``, ``ic_dropout`` ->
    ``pmem_attention_dropout``, its unread ``context_length`` dropped; GPT2's ``mlp_ratio``
    -> ``mlp_dim = mlp_ratio * embed_dim``. The one place old keys are read
    (:func:`build_model`); a config giving an old key and its new one raises."""
    fields = dict(model_config)
    name = fields.get("name")
    renamed = dict(RENAMED_KEYS.get(name, {}))
    if name == "gpt2":
        renamed["mlp_ratio"] = "mlp_dim"
    for old, new in renamed.items():
        if old in fields and new in fields:
            raise ValueError(f"model {name!r}: {old!r} is the old name of {new!r}; give one")
    for key in DROPPED_KEYS.get(name, ()):
        fields.pop(key, None)
    if name == "gpt2" and "mlp_ratio" in fields:
        embed_dim = fields.get("embed_dim", model_class(name).config_defaults["embed_dim"])
        fields["mlp_ratio"] = fields["mlp_ratio"] * embed_dim
    return {renamed.get(key, key): value for key, value in fields.items()}


def _import_all() -> None:
    """Import the model modules so that their ``@register`` decorators run."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
