"""The jitted train step, built once for the trainer and for ``python -m mmjax.aot``.

:func:`jit_train_step` is the trainer's step (``mmjax.train.step.guarded_train_step``: the
train step plus the NaN/inf guard) with its shardings and donation; ``mmjax.aot`` lowers
the same object for a TPU topology, so what aot compiles is what a run executes.
"""

from __future__ import annotations

import functools

import jax
import ml_collections

from mmjax.train import sharding as sharding_lib
from mmjax.train.step import guarded_train_step


def jit_train_step(config: ml_collections.ConfigDict, model, optimizer, mesh, rules,
                   state_shardings, ignore_targets=(), batch_loss=None):
    """``jax.jit`` of the guarded train step: state sharded as ``state_shardings`` (and
    donated), the batch as ``batch_sharding(mesh, rules)``, metrics replicated.

    ``config`` has the defaults filled in; ``ignore_targets``: target ids not trained on
    (``mmjax.data.synthetic.ignored_targets``); ``batch_loss``: a task's loss
    (``mmjax.train.step``), default the language model's. Token ids are checked against
    ``model.vocab_size`` when the config has one.
    """
    train = config.train
    return jax.jit(
        functools.partial(guarded_train_step, model=model, optimizer=optimizer,
                          grad_accum_steps=train.grad_accum_steps,
                          loss_chunk=train.loss_chunk,
                          ignore_targets=tuple(ignore_targets),
                          batch_loss=batch_loss,
                          vocab_size=config.model.get("vocab_size"),
                          skip_nonfinite=bool(train.skip_nonfinite_steps)),
        in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh, rules)),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=0,
    )

