"""What the generated corpora share: a batch is a pure function of ``(seed, split, step)``
(a resumed run sees the batches of an uninterrupted one), made of independent rows."""

from __future__ import annotations

import numpy as np

SPLITS = {"train": 0, "eval": 1}


def batch_rng(seed: int, split: str, step: int) -> np.random.Generator:
    """The generator of batch ``step`` of ``split`` (``"train"`` or ``"eval"``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return np.random.default_rng([seed, SPLITS[split], step])


class RowCorpus:
    """``batch`` for a corpus (a dataclass with ``seed``) that makes one row at a time with
    ``row(rng, length)``."""

    def batch(self, step: int, batch_size: int, length: int, *, split: str = "train"):
        """The batch of a given step: ``[batch_size, length]`` tokens, deterministic."""
        if batch_size < 1 or length < 1:
            raise ValueError(f"batch_size and length must be >= 1, got {batch_size}, {length}")
        rng = batch_rng(self.seed, split, step)
        return np.stack([self.row(rng, length) for _ in range(batch_size)])
