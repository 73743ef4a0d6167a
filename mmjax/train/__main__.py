"""``python -m mmjax.train [--config FILE.py[:preset]] [--config.key=value ...] [--workdir DIR]``.

Without ``--config`` it trains the embedded default (:mod:`mmjax.train.defaults`).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mmjax.train import defaults
from mmjax.train.loop import train_and_evaluate

config_flags.DEFINE_config_file(
    "config", defaults.__file__, "Config file (Python, get_config(arg)); preset after ':'.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics (and checkpoints).")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (multi-host TPU pods).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.distributed:
        import jax

        jax.distributed.initialize()
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
