"""Test helpers: :func:`load_config` (``mmjax.config.load``, which reads ``NAME.py[:presets]``
from the repository's ``configs/``), :data:`CONFIGS`, and :data:`TINY`, the command-line
overrides that make the embedded default a tiny, fast run."""

from mmjax.config import CONFIGS
from mmjax.config import load as load_config

__all__ = ["CONFIGS", "TINY", "load_config"]

TINY = ["--config.model.vocab_size=16", "--config.model.num_layers=1",
        "--config.model.num_heads=2", "--config.model.embed_dim=16",
        "--config.model.pmem_size=8", "--config.data.context_length=24",
        "--config.data.batch_size=8", "--config.data.corpus_options.num_states=3",
        "--config.data.corpus_options.edges_per_state=2",
        "--config.optimizer.warmup_steps=2", "--config.train.eval_every=0",
        "--config.train.eval_batches=1", "--config.train.log_every=1"]
