"""``python -m mmjax.moons --config configs/moons.py:heads=3 --workdir DIR``."""

from __future__ import annotations

import contextlib
import json
import sys

import matplotlib

matplotlib.use("Agg")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmjax.moons.experiment import run_experiment  # noqa: E402
from mmjax.train.loop import EXIT_PREEMPTED  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/moons.py[:preset]")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (created if missing)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's log; stdout: the summary
        result = run_experiment(_CONFIG.value, _WORKDIR.value)
    if result["preempted"]:  # SIGTERM: the trainer saved the run; the same command resumes
        sys.exit(EXIT_PREEMPTED)
    summary = {k: v for k, v in result["summary"].items() if k != "row_dominance"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
