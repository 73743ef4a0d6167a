"""A trained model back from its workdir: config, parameters and tokenizer."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.data.tokenizer import Tokenizer
from mmjax.models import build_model, model_class
from mmjax.train.checkpoint import TOKENIZER_FILE, find_step_dir, load_params


class _NoMissingMetadataWarning(logging.Filter):
    """Drops Orbax's "Metadata file does not exist" warning: reading a step's ``state`` item
    alone, Orbax looks for ``_CHECKPOINT_METADATA`` in it, but the trainer's checkpoint
    manager writes that file one level up, in the step directory (nothing is missing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


@contextlib.contextmanager
def _quiet_metadata_warning():
    """Within: Orbax's warning about the step's metadata file is dropped (absl's logger)."""
    logger, quiet = logging.getLogger("absl"), _NoMissingMetadataWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@dataclasses.dataclass
class Trained:
    """What :func:`load_workdir` returns."""

    model: object
    params: dict
    tokenizer: Tokenizer | None
    config: dict
    step_dir: pathlib.Path


def load_workdir(workdir: str | pathlib.Path, *, step: int | None = None,
                 tokenizer: str | pathlib.Path | None = None,
                 model_overrides: dict | None = None) -> Trained:
    """The model, parameters and tokenizer of a training workdir.

    Args:
      workdir: a ``python -m mmjax.train --workdir`` directory.
      step: the checkpoint step (default: the latest).
      tokenizer: a sentencepiece model file; default the workdir's ``tokenizer.model`` (the
        training loop copies the token store's tokenizer there), else ``None`` (a model
        trained on a synthetic corpus has no text).
      model_overrides: model-config keys that change how the trained parameters run, not
        which there are (e.g. ``{"long_term_memory": "paged"}``); a key the model does not
        have is a one-line error.
    Raises one-line errors for a missing workdir, checkpoint, saved config or tokenizer.
    """
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"--workdir {workdir}: no such directory")
    target = workdir / "checkpoints" / str(step) if step is not None else workdir
    if step is not None and not (target / "state").is_dir():
        raise FileNotFoundError(f"--workdir {workdir}: no checkpoint of step {step}")
    try:
        step_dir = find_step_dir(target, source="--workdir")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--workdir {workdir}: no checkpoint (expected {workdir}/checkpoints/<step>/state; "
            f"train with python -m mmjax.train --workdir {workdir} first)") from None
    config_file = step_dir / "config" / "metadata"
    try:
        config = json.loads(config_file.read_text())
        model_config = dict(config["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"checkpoint {step_dir} has no readable config ({config_file}: "
                           f"{e})") from None
    if model_overrides:
        fields = {f.name for f in dataclasses.fields(model_class(model_config.get("name")))}
        unknown = sorted(set(model_overrides) - fields)
        if unknown:
            raise ValueError(f"--workdir {workdir}: model {model_config.get('name')!r} has no "
                             f"setting {', '.join(unknown)} (a paged long-term memory needs a "
                             f"v2 Memory Mosaic)")
        model_config.update(model_overrides)
    model = build_model(model_config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            nn.meta.unbox(shapes["params"]))
    with _quiet_metadata_warning():
        params, step_dir = load_params(step_dir, abstract, source="--workdir")
    if tokenizer is not None:
        loaded = Tokenizer.load(tokenizer)
    elif (workdir / TOKENIZER_FILE).is_file():
        loaded = Tokenizer.load(workdir / TOKENIZER_FILE)
    else:
        loaded = None
    if loaded is not None and loaded.vocab_size > model.vocab_size:
        raise ValueError(f"the tokenizer has {loaded.vocab_size} ids but the model's "
                         f"vocabulary is {model.vocab_size}")
    return Trained(model=model, params=params, tokenizer=loaded, config=config,
                   step_dir=step_dir)
