"""Load ``configs/NAME.py[:preset]`` the way ``--config`` does, and :data:`TINY`, the
command-line overrides that make the embedded default a tiny, fast run (test helpers)."""

import importlib.util
import pathlib

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"

TINY = ["--config.model.vocab_size=16", "--config.model.num_layers=1",
        "--config.model.num_heads=2", "--config.model.embed_dim=16",
        "--config.model.pmem_size=8", "--config.data.context_length=24",
        "--config.data.batch_size=8", "--config.data.corpus_options.num_states=3",
        "--config.data.corpus_options.edges_per_state=2",
        "--config.optimizer.warmup_steps=2", "--config.train.eval_every=0",
        "--config.train.eval_batches=1", "--config.train.log_every=1"]


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"config_{path[:-3]}", CONFIGS / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
