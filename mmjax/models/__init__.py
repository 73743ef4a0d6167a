"""Full networks, built from a config by name.

Every language model here is a Flax linen module called as
``model.apply({"params": params}, input_ids, deterministic=True) -> logits [B, T, N]``;
training passes ``deterministic=False`` and the rng streams it needs (``"dropout"``, ...).
``build_model(config.model)`` instantiates the class registered under ``config.model.name``
with the other keys of that config as its fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

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
    """Instantiate the model named ``model_config["name"]`` with the remaining keys.

    Raises a ``ValueError`` naming the unknown model or the config keys the model does not
    have (with the ones it does).
    """
    _import_all()
    fields = dict(model_config)
    cls = model_class(fields.pop("name", None))
    known = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"model {model_config['name']!r} has no config key(s) {unknown}; "
            f"valid keys: {sorted(known)}"
        )
    return cls(**fields)


def _import_all() -> None:
    """Import the model modules so that their ``@register`` decorators run."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
