"""``python -m mmjax.moons --config configs/moons.py:heads=3 --workdir DIR``.

Exit statuses and one-line errors as every command (:mod:`mmjax.cli`); stdout holds the
summary JSON only, the trainer's log goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys

import matplotlib

matplotlib.use("Agg")

from absl import flags, logging  # noqa: E402

from mmjax import cli  # noqa: E402
from mmjax.config import define_flag  # noqa: E402


def _define_flags() -> None:
    define_flag("config", None, "configs/moons.py[:preset]; override its keys with "
                "--config.KEY=VALUE.")
    flags.DEFINE_string("workdir", None, "output directory (created if missing)")
    flags.mark_flags_as_required(["config", "workdir"])


def main() -> int:
    from mmjax.moons.experiment import run_experiment

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's log; stdout: the summary
        result = run_experiment(flags.FLAGS.config, flags.FLAGS.workdir)
    if result["preempted"]:  # SIGTERM: the trainer saved the run; the same command resumes
        return cli.EXIT_PREEMPTED
    summary = {k: v for k, v in result["summary"].items() if k != "row_dominance"}
    print(json.dumps(summary, indent=1))
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run_absl(main, _define_flags)
