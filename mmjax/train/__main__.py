"""``python -m mmjax.train [--config FILE.py[:preset]] [--config.key=value ...] [--workdir DIR]``.

Without ``--config`` it trains the embedded default (:mod:`mmjax.train.defaults`).

Exit status: 0 when the run finished; 1 for an error (a bad config, a workdir in use, a
non-finite loss, no readable checkpoint: one line on stderr); 3 (``EXIT_PREEMPTED``) when
SIGTERM stopped it after saving a checkpoint (the same command resumes); 2 for an unknown
``--config.*`` key. ``MMJAX_TRACEBACK=1`` shows the full traceback of an error instead.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmjax.train import defaults
from mmjax.train.loop import EXIT_PREEMPTED, NonFiniteLossError, train_and_evaluate


def _define_flags() -> None:
    # ml_collections applies --config.key=value overrides while defining the flag: an unknown
    # key raises here (AttributeError/KeyError), before absl's own error handling.
    config_flags.DEFINE_config_file(
        "config", defaults.__file__,
        "Config file (Python, get_config(arg)); preset after ':'.", lock_config=True)
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
    try:
        result = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        if os.environ.get("MMJAX_TRACEBACK"):
            raise
        if isinstance(e, NonFiniteLossError):
            sys.exit(1)  # its line is already logged
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if result.get("preempted"):
        sys.exit(EXIT_PREEMPTED)


def run() -> None:
    try:
        _define_flags()
    except (AttributeError, KeyError) as e:
        overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
        print(f"error: unknown config key in {' '.join(overrides) or 'the command line'}: "
              f"{str(e).strip(chr(34))}", file=sys.stderr, flush=True)
        sys.exit(2)
    app.run(main)


if __name__ == "__main__":
    run()
