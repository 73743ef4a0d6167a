"""``python -m mmjax.train [--config FILE.py[:preset]] [--config.key=value ...] [--workdir DIR]``.

Without ``--config`` it trains the embedded default (:func:`mmjax.config.default_config`);
``--config`` reads a spec as :func:`mmjax.config.load` does.

Exit status (:mod:`mmjax.cli`): 0 when the run finished; 1 for an error (a bad config, a
workdir in use, a non-finite loss, no readable checkpoint: one line on stderr; a non-finite
loss names its step on stdout); 3 (``EXIT_PREEMPTED``) when SIGTERM stopped it after saving
a checkpoint (the same command resumes); 2 for a bad command line (an unknown flag or
``--config.*`` key). ``MMJAX_TRACEBACK=1`` shows the full traceback of an error instead.

``--distributed`` joins the processes of a multi-host run with ``jax.distributed.initialize``.
On a TPU pod it needs nothing else (JAX finds the slice's hosts itself). Elsewhere, e.g. several
processes on one machine (``launch/local_pod.py``), three environment variables name the
run: ``MMJAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``MMJAX_NUM_PROCESSES`` and
``MMJAX_PROCESS_ID``; with ``JAX_PLATFORMS=cpu`` the CPU collectives then use gloo.
"""

import os

from absl import flags, logging

from mmjax import cli
from mmjax.config import DEFAULT, define_flag
from mmjax.train.loop import NonFiniteLossError, train_and_evaluate


def _define_flags() -> None:
    # ml_collections applies --config.key=value overrides while defining the flag: an unknown
    # key raises here (AttributeError/KeyError), a usage error for cli.run_absl.
    define_flag("config", DEFAULT)
    flags.DEFINE_string("workdir", None, "Directory for metrics (and checkpoints).")
    flags.DEFINE_bool("distributed", False,
                      "Call jax.distributed.initialize() first (multi-host TPU pods; "
                      "MMJAX_COORDINATOR_ADDRESS, MMJAX_NUM_PROCESSES, MMJAX_PROCESS_ID "
                      "elsewhere).")


DISTRIBUTED_VARIABLES = ("MMJAX_COORDINATOR_ADDRESS", "MMJAX_NUM_PROCESSES", "MMJAX_PROCESS_ID")


def distributed_arguments(environ=os.environ) -> dict:
    """``jax.distributed.initialize`` keyword arguments from the ``MMJAX_*`` variables.

    None of them set: ``{}`` (JAX detects the cluster, as on a TPU pod). All three set: the
    coordinator address, process count and id. Some, or values that are not numbers: a
    ValueError naming them.
    """
    given = {name: environ[name] for name in DISTRIBUTED_VARIABLES if environ.get(name)}
    if not given:
        return {}
    if len(given) < len(DISTRIBUTED_VARIABLES):
        missing = [name for name in DISTRIBUTED_VARIABLES if name not in given]
        raise ValueError(f"{', '.join(sorted(given))} set without {', '.join(missing)}: "
                         f"set all of {', '.join(DISTRIBUTED_VARIABLES)}, or none")
    try:
        count, index = (int(given["MMJAX_NUM_PROCESSES"]), int(given["MMJAX_PROCESS_ID"]))
    except ValueError:
        raise ValueError(f"MMJAX_NUM_PROCESSES={given['MMJAX_NUM_PROCESSES']!r} and "
                         f"MMJAX_PROCESS_ID={given['MMJAX_PROCESS_ID']!r} must be integers"
                         ) from None
    if not 0 <= index < count:
        raise ValueError(f"MMJAX_PROCESS_ID={index} is not in [0, MMJAX_NUM_PROCESSES={count})")
    return dict(coordinator_address=given["MMJAX_COORDINATOR_ADDRESS"], num_processes=count,
                process_id=index)


def initialize_distributed() -> None:
    import jax

    arguments = distributed_arguments()
    if arguments and jax.config.jax_platforms == "cpu":
        # Collectives across CPU processes: gloo (jax 0.10's default; older versions had none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**arguments)


def main() -> int:
    """Train; errors are reported by :func:`mmjax.cli.run` (one line, exit status 1)."""
    if flags.FLAGS.distributed:
        initialize_distributed()
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
        result = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except NonFiniteLossError:
        if os.environ.get(cli.TRACEBACK_VARIABLE):
            raise
        return cli.EXIT_ERROR  # the loop has printed its line (the step, the last checkpoint)
    return cli.EXIT_PREEMPTED if result.get("preempted") else cli.EXIT_OK


def run() -> None:
    """``python -m mmjax.train``: parse the flags, train, exit (statuses of :mod:`mmjax.cli`)."""
    cli.run_absl(main, _define_flags)


if __name__ == "__main__":
    run()
