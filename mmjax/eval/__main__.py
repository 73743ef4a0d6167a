"""``python -m mmjax.eval NAME [flags]``: the papers' in-context evaluations.

``icll``: in-context language learning (the v1 paper's figure 9). Trains a 2-layer v1 Memory
Mosaic and a 2-layer GPT2 (:func:`mmjax.eval.icll.icll_config`) on N random-automaton
languages for each ``--languages`` and ``--seeds``, scores both and the in-context 2-/3-gram
predictors on held-out languages, and prints the table next to the paper's accuracies::

    python -m mmjax.eval icll --languages 100,1000,2500 --seeds 0,1,2 --output /tmp/icll

Exit status 0, 2 for bad flags, 1 with one line on stderr for other bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

EVALUATIONS = ("icll",)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmjax.eval", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=EVALUATIONS)
    p.add_argument("--languages", type=_ints, default=[100, 1000, 2500],
                   help="training languages N (comma-separated)")
    p.add_argument("--seeds", type=_ints, default=[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--models", default="mm,gpt2")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--eval_languages", type=int, default=256)
    p.add_argument("--output", default=None, help="directory for icll.json")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    from mmjax.eval.icll import MODELS

    for m in args.models:
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r}; choose from {MODELS}")
    for name in ("steps", "width", "context", "eval_languages"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.languages) < 1:
        p.error(f"--languages must be >= 1, got {args.languages}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmjax.eval import icll

    try:
        rows = icll.run(languages=args.languages, seeds=args.seeds, steps=args.steps,
                        models=args.models, width=args.width, context=args.context,
                        eval_languages=args.eval_languages, output=args.output)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        if os.environ.get("MMJAX_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print(icll.format_table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
