"""``python -m mmjax.eval NAME [flags]``: the papers' in-context evaluations.

* ``icll``: in-context language learning (the v1 paper's figure 9). Trains a 2-layer v1
  Memory Mosaic and a 2-layer GPT2 (``configs/icll.py``, a checkout's) on N
  random-automaton languages for each ``--languages`` and ``--seeds``, scores both and the
  in-context 2-/3-gram predictors on held-out languages, prints the table next to the
  paper's accuracies, and writes ``icll.json``::

      python -m mmjax.eval icll --languages 100,1000,2500 --seeds 0,1,2 --output /tmp/icll

* ``per_position``: the loss at each position of several checkpoints on one plot (the v1
  paper's figure 8), on a token store (``--data``) or their own validation data::

      python -m mmjax.eval per_position --workdir /tmp/mm --workdir /tmp/gpt2 --output /tmp/pp

* ``extrapolate``: one checkpoint at 1, 2, 4 and 8 times its training context::

      python -m mmjax.eval extrapolate --workdir /tmp/mm --factors 1,2,4,8 --output /tmp/ex

* ``attention``: the last position's retrieval weights over earlier positions, per layer and
  head, at 1 and 3 times the training context (the v1 paper's figures 14-16)::

      python -m mmjax.eval attention --workdir /tmp/mm --factors 1,3 --output /tmp/att

* ``retrieval``: facts scattered through filler and queried at the end (RULER-style needle
  and multi-key tasks), exact-match accuracy by context length; ``--qa FILE.jsonl`` runs
  question answering on your own ``{context, question, answers}`` lines instead::

      python -m mmjax.eval retrieval --workdir /tmp/mm --contexts 256,1024 --facts 1,4

  A v2 Memory Mosaic reads its long-term memory from each query's best pages with
  ``--memory paged --top_pages K`` (``--page U``), up to contexts of 1M tokens on a CPU;
  ``--diagnose`` says where each needle is lost: the exact weight of its pair, and the rank
  of its page by the bound that chooses the pages (:func:`mmjax.eval.needles.page_diagnosis`).

* ``icl_classify``: k-shot classification from a JSONL of ``{text, label}`` (``--data``; or
  ``--synthetic N`` examples of a built-in topic dataset), with the semantic and with
  anonymized labels, accuracy against the number of shots::

      python -m mmjax.eval icl_classify --workdir /tmp/run --data reviews.jsonl --shots 0,2,8

* ``multidoc``: the v2 paper's new-knowledge storage. Trains MM v2, LLaMA, short/long LLaMA,
  MM v2 without long-term memory and MM v1 (equal parameters) at context 512 on generated
  documents of facts, and measures exact match on questions at 512 to 4096 tokens
  (:mod:`mmjax.eval.multidoc`); mean and std over ``--seeds``, table, JSON and PNG::

      python -m mmjax.eval multidoc --seeds 0,1,2 --output /tmp/multidoc

* ``icl_anonymized``: the v2 paper's in-context learning. Pretrains the same five models on
  few-shot episodes of generated classes and measures the accuracy on held-out classes at
  1 to 64 shots, with semantic and with anonymised labels (:mod:`mmjax.eval.icl_anonymized`)::

      python -m mmjax.eval icl_anonymized --seeds 0,1,2 --output /tmp/icl

* ``finetune_speed``: the v2 paper's fine-tuning efficiency. Pretrains MM v2, LLaMA and MM
  v2 without long-term memory as ``icl_anonymized`` does, fine-tunes each on the held-out
  classes and measures zero-shot accuracy on them after 0 to 800 mini-batches
  (:mod:`mmjax.eval.finetune_speed`)::

      python -m mmjax.eval finetune_speed --seeds 0,1,2 --output /tmp/finetune

* ``merge``: one study's separate runs (a seed each, on several machines, or a run stopped
  part-way: a study writes its JSON after every model) joined into one table, JSON and PNG::

      python -m mmjax.eval merge /tmp/md0 /tmp/md1 /tmp/md2 --output /tmp/multidoc

The ``retrieval`` evaluation lives in :mod:`mmjax.eval.needles`, ``attention`` in
:mod:`mmjax.eval.attention_maps`. Exit status (:mod:`mmjax.cli`): 0, 2 for bad flags, 1 with
one line on stderr for other bad input (a workdir without a checkpoint, a context a model
cannot take, a missing store).
"""

from __future__ import annotations

import argparse
import sys

from mmjax import cli


def _listed(text: str, parse, kind: str, valid, requirement: str) -> list:
    """``text`` as comma-separated values of ``parse``, each ``valid`` (argparse types)."""
    try:
        values = [parse(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {kind}, got {text!r}") from None
    if not values or not all(valid(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected {requirement} {kind}, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    return _listed(text, int, "integers", lambda v: v >= 0, "non-negative")


def _rates(text: str) -> list[float]:
    return _listed(text, float, "numbers", lambda v: v > 0, "positive")


def parse_args(argv=None) -> argparse.Namespace:
    from mmjax.config import STUDY_STEPS

    p = cli.ArgumentParser(prog="python -m mmjax.eval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="name", required=True)
    icll = sub.add_parser("icll", help="in-context language learning (v1 figure 9)")
    icll.add_argument("--languages", type=_ints, default=[100, 1000, 2500],
                      help="training languages N (comma-separated)")
    icll.add_argument("--seeds", type=_ints, default=[0])
    icll.add_argument("--steps", type=int, default=600)
    icll.add_argument("--models", default="mm,gpt2")
    icll.add_argument("--width", type=int, default=64)
    icll.add_argument("--context", type=int, default=512)
    icll.add_argument("--eval_languages", type=int, default=256)
    icll.add_argument("--output", default=None, help="directory for icll.json")
    for name, text in (("per_position", "loss by position of several checkpoints"),
                       ("extrapolate", "loss by position at multiples of the context"),
                       ("attention", "retrieval weights of the last position")):
        q = sub.add_parser(name, help=text)
        q.add_argument("--workdir", action="append", required=True,
                       help="a training workdir" + (" (repeat)" if name == "per_position"
                                                    else ""))
        q.add_argument("--data", default=None, help="a token store (default: the run's own)")
        q.add_argument("--batches", type=int, default=8)
        q.add_argument("--output", required=True, help="directory for the PNG and JSON")
        if name == "per_position":
            q.add_argument("--context", type=int, default=None)
        else:
            q.add_argument("--factors", type=_ints,
                           default=[1, 2, 4, 8] if name == "extrapolate" else [1, 3])
    r = sub.add_parser("retrieval", help="long-context retrieval and question answering")
    r.add_argument("--workdir", required=True)
    r.add_argument("--contexts", type=_ints, default=[256, 1024])
    r.add_argument("--facts", type=_ints, default=[1, 4])
    r.add_argument("--tasks", type=int, default=20)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--qa", default=None, help="a JSONL of {context, question, answers}")
    r.add_argument("--memory", choices=("exact", "paged"), default=None,
                   help="the v2 long-term memory (default: the run's own)")
    r.add_argument("--top_pages", type=int, default=None,
                   help="pages each query keeps with --memory paged (default: the run's)")
    r.add_argument("--page", type=int, default=None,
                   help="pairs per page with --memory paged (default: the run's)")
    r.add_argument("--diagnose", action="store_true",
                   help="with --memory paged: where each needle's pair lies in the exact "
                   "weights and the page choice, per task, layer and head (diagnosis.json)")
    r.add_argument("--output", default=None, help="directory for retrieval.json")
    studies = (
        ("multidoc", "v2 study: multi-document QA past the training length",
         None, ("--contexts", [512, 1024, 2048, 4096]), 32),
        ("icl_anonymized", "v2 study: in-context classification of held-out classes as "
         "shots grow, semantic and anonymised labels", None,
         ("--shots", [1, 2, 4, 8, 16, 32, 64]), 64),
        ("finetune_speed", "v2 study: zero-shot accuracy on new classes after 0 to 800 "
         "fine-tuning mini-batches", "v2,llama,v2_no_long_term",
         ("--batches", [0, 1, 2, 8, 32, 800]), 64),
    )
    for name, text, models, (sizes, default_sizes), tasks in studies:
        q = sub.add_parser(name, help=text)
        q.add_argument("--seeds", type=_ints, default=[0, 1, 2])
        q.add_argument("--steps", type=int, default=STUDY_STEPS, help="(pre)training steps")
        q.add_argument("--learning_rates", type=_rates, default=[3e-3],
                       help="peak rates tried for every model (the lowest held-out loss "
                       "is kept)")
        q.add_argument("--models", default=models,
                       help="comma-separated (default: " + (models or "all five") + ")")
        q.add_argument(sizes, type=_ints, default=default_sizes)
        q.add_argument("--tasks", type=int, default=tasks)
        q.add_argument("--output", default=None, help=f"directory for {name}.json and .png")
    m = sub.add_parser("merge", help="join separate runs of one study (e.g. a seed each)")
    m.add_argument("runs", nargs="+", help="a study's JSON, or a run's --output directory")
    m.add_argument("--output", required=True, help="directory for the joined JSON and PNG")
    c = sub.add_parser("icl_classify", help="in-context classification")
    c.add_argument("--workdir", required=True)
    source = c.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a JSONL of {text, label}")
    source.add_argument("--synthetic", type=int, help="use N built-in topic examples")
    c.add_argument("--shots", type=_ints, default=[0, 1, 2, 4, 8])
    c.add_argument("--queries", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--output", default=None, help="directory for icl_classify.json")
    args = p.parse_args(argv)
    if args.name == "merge":
        return args
    if args.name == "icl_classify":
        if args.queries < 1 or (args.synthetic is not None and args.synthetic < 2):
            p.error("--queries must be >= 1 and --synthetic >= 2")
        return args
    if args.name in ("multidoc", "icl_anonymized", "finetune_speed"):
        from mmjax.config import STUDY_MODELS

        args.models = (list(STUDY_MODELS) if args.models is None
                       else [m for m in args.models.split(",") if m])
        for m in args.models:
            if m not in STUDY_MODELS:
                p.error(f"--models: unknown model {m!r}; choose from {STUDY_MODELS}")
        sizes = {"multidoc": "contexts", "icl_anonymized": "shots"}.get(args.name)
        if args.steps < 1 or args.tasks < 1 or (sizes and min(getattr(args, sizes)) < 1):
            p.error(f"--steps, --tasks and --{sizes or 'batches'} must be >= 1")
        return args
    if args.name == "retrieval":
        if args.tasks < 1 or min(args.contexts) < 1 or min(args.facts) < 1:
            p.error("--tasks, --contexts and --facts must be >= 1")
        for name in ("top_pages", "page"):
            value = getattr(args, name)
            if value is not None and (args.memory != "paged" or value < 1):
                p.error(f"--{name} needs --memory paged and a value >= 1, got {value}")
        if args.diagnose and (args.memory != "paged" or args.qa is not None):
            p.error("--diagnose needs --memory paged and the needle tasks (no --qa)")
        return args
    if args.name == "icll":
        args.models = [m for m in args.models.split(",") if m]
        from mmjax.config import PAIR_MODELS

        for m in args.models:
            if m not in PAIR_MODELS:
                p.error(f"--models: unknown model {m!r}; choose from {PAIR_MODELS}")
        for name in ("steps", "width", "context", "eval_languages"):
            if getattr(args, name) < 1:
                p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
        if min(args.languages) < 1:
            p.error(f"--languages must be >= 1, got {args.languages}")
    else:
        if args.batches < 1:
            p.error(f"--batches must be >= 1, got {args.batches}")
        if args.name != "per_position" and (len(args.workdir) != 1 or min(args.factors) < 1):
            p.error(f"{args.name} takes one --workdir and --factors >= 1")
    return args


@cli.command
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.name == "icll":
        from mmjax.eval import icll

        rows = icll.run(languages=args.languages, seeds=args.seeds, steps=args.steps,
                        models=args.models, width=args.width, context=args.context,
                        eval_languages=args.eval_languages, output=args.output)
        print(icll.format_table(rows), flush=True)
        return 0
    if args.name in ("multidoc", "finetune_speed", "icl_anonymized", "merge"):
        return _study(args)
    from mmjax.eval import positions

    if args.name == "retrieval":
        return _retrieval(args)
    if args.name == "icl_classify":
        return _classify(args)
    if args.name == "attention":
        from mmjax.eval.attention_maps import attention_maps

        maps = attention_maps(args.workdir[0], factors=args.factors, store=args.data,
                              batches=args.batches, output=args.output)
        for context, by_memory in maps.items():
            for name, heads in by_memory.items():
                near = [sum(h[-len(h) // 8:]) for h in heads]
                print(f"context {context} {name}: weight on the last eighth per head "
                      + " ".join(f"{x:.2f}" for x in near), flush=True)
        print(f"wrote {args.output}/attention.png and .json", flush=True)
        return 0
    if args.name == "per_position":
        curves = positions.per_position(args.workdir, store=args.data,
                                        context=args.context, batches=args.batches,
                                        output=args.output)
    else:
        curves = positions.extrapolate(args.workdir[0], factors=args.factors,
                                       store=args.data, batches=args.batches,
                                       output=args.output)
    for label, curve in curves.items():
        values = [v for v in curve if v is not None]
        quarter = max(1, len(values) // 4)
        print(f"{label}: loss first quarter {sum(values[:quarter]) / quarter:.4f}, "
              f"last quarter {sum(values[-quarter:]) / quarter:.4f}", flush=True)
    print(f"wrote {args.output}/{args.name}.png and .json", flush=True)
    return 0


def _write_json(output: str | None, name: str, rows) -> None:
    """``rows`` as ``output/name`` (the directory made), when an ``--output`` was given."""
    if output is not None:
        import json
        import pathlib

        out = pathlib.Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(rows))


def _study(args) -> int:
    """Run a v2 study, or merge the runs of one, and print its table."""
    from mmjax.eval import finetune_speed, icl_anonymized, multidoc, studies

    common = dict(seeds=args.seeds, learning_rates=args.learning_rates, models=args.models,
                  num_tasks=args.tasks, output=args.output) if args.name != "merge" else {}
    if args.name == "multidoc":
        rows = multidoc.run(steps=args.steps, contexts=args.contexts, **common)
    elif args.name == "finetune_speed":
        rows = finetune_speed.run(pretrain_steps=args.steps, batches=args.batches, **common)
    elif args.name == "icl_anonymized":
        rows = icl_anonymized.run(steps=args.steps, shots=args.shots, **common)
    else:
        args.name, rows = studies.merge(args.runs, args.output)
        print(f"wrote {args.output}/{args.name}.json and .png", flush=True)
    print(study_table(args.name, rows), flush=True)
    return 0


def study_table(name: str, rows: list[dict]) -> str:
    """The markdown table a study command prints (and ``docs/results.md`` quotes)."""
    from mmjax.eval import multidoc, studies

    label = {"multidoc": "exact match at", "finetune_speed": "batches"}.get(name, "shots")
    return studies.format_table(rows, label, multidoc.PAPER if name == "multidoc" else None)


def _classify(args) -> int:

    from mmjax.eval import classify

    examples = (classify.read_examples(args.data) if args.data is not None
                else classify.synthetic_examples(args.seed, args.synthetic))
    rows = []
    for anonymize in (False, True):
        rows += classify.accuracy_by_shots(args.workdir, examples, shots=args.shots,
                                           queries=args.queries, anonymize=anonymize,
                                           seed=args.seed)
    print("| shots | labels | accuracy |\n|---|---|---|", flush=True)
    for row in rows:
        kind = "anonymized" if row["anonymized"] else "semantic"
        print(f"| {row['shots']} | {kind} | {row['accuracy']:.3f} |", flush=True)
    _write_json(args.output, "icl_classify.json", rows)
    return 0


def _retrieval(args) -> int:

    from mmjax.eval import needles

    memory = {key: value for key, value in (
        ("long_term_memory", args.memory), ("long_term_top_pages", args.top_pages),
        ("long_term_page", args.page)) if value is not None}
    if args.diagnose:
        return _diagnose(args, memory)
    if args.qa is not None:
        rows = [needles.qa_accuracy(args.workdir, args.qa)]
    else:
        rows = needles.needle_accuracy(args.workdir, contexts=args.contexts,
                                       facts=args.facts, num_tasks=args.tasks, seed=args.seed,
                                       memory=memory)
    print("| task | context | memory | accuracy |\n|---|---|---|---|", flush=True)
    for row in rows:
        print(f"| {row['task']} | {row.get('context', '')} | {row.get('memory', '')} | "
              f"{row['accuracy']:.3f} |", flush=True)
    _write_json(args.output, "retrieval.json", rows)
    return 0


def _diagnose(args, memory: dict) -> int:
    """Print, per task and paged memory, the head that weighs the needle's pair most: that
    weight, its page's rank by the bound and whether it was kept; write diagnosis.json."""

    from mmjax.eval import needles

    rows = []
    for n in args.facts:
        for context in args.contexts:
            found = needles.page_diagnosis(args.workdir, context=context, facts=n,
                                           num_tasks=args.tasks, seed=args.seed, memory=memory)
            rows += [dict(r, facts=n, context=context) for r in found]
    print("| facts | context | task | memory | head | needle weight | page rank | kept | "
          "kept weight |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    best = {}
    for r in rows:
        key = (r["facts"], r["context"], r["task"], r["memory"])
        if key not in best or r["needle_weight"] > best[key]["needle_weight"]:
            best[key] = r
    for (n, context, task, memory_name), r in best.items():
        print(f"| {n} | {context} | {task} | {memory_name} | {r['head']} | "
              f"{r['needle_weight']:.3f} | {r['needle_page_rank']} of {r['competing_pages']} | "
              f"{'yes' if r['kept'] else 'no'} | {r['kept_weight']:.3f} |", flush=True)
    _write_json(args.output, "diagnosis.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
