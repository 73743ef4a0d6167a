"""The three-moons seed study: train 1-head and 3-head nets over several seeds with the official
recipe, evaluate them on the validation periods and print the numbers the experiment is judged
on (CPU; about 15 minutes per seed on 2 shared cores).

    python benchmarks/moons_seeds.py --seeds 5 --workdir /tmp/moons_seeds

Each run goes to ``WORKDIR/heads{H}_seed{S}/`` (skipped when its ``summary.json`` exists, so an
interrupted study resumes); ``WORKDIR/study.json`` and ``WORKDIR/error_vs_context.png`` (mean
and standard deviation over seeds) summarise them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from mmjax.cli import EXIT_PREEMPTED  # noqa: E402
from mmjax.config import load  # noqa: E402
from mmjax.moons.experiment import run_experiment  # noqa: E402
from mmjax.moons.plots import plot_error_curves  # noqa: E402


def run_or_load(heads, seed, args):
    out = pathlib.Path(args.workdir) / f"heads{heads}_seed{seed}"
    if (out / "summary.json").exists():
        return json.loads((out / "curve.json").read_text()), json.loads(
            (out / "summary.json").read_text())
    config = load(f"configs/moons.py:heads={heads},steps={args.steps},seed={seed}")
    config.eval.context_stride = args.context_stride
    result = run_experiment(config, out, progress=not args.quiet)
    if result["preempted"]:  # SIGTERM: the run is saved; the same command resumes the study
        sys.exit(EXIT_PREEMPTED)
    return result["curve"], result["summary"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first_seed", type=int, default=100)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--context_stride", type=int, default=1)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs = {1: [], 3: []}
    for seed in seeds:
        for heads in (1, 3):
            curve, summary = run_or_load(heads, seed, args)
            runs[heads].append((curve, summary))
            print(f"heads={heads} seed={seed}: err[150,250]={summary['error_150_250']:.4f} "
                  f"err[after lcm]={summary['error_after_lcm']:.4f} "
                  f"disentangled={summary['disentangled']} "
                  f"train {summary['train_seconds']:.0f}s eval {summary['eval_seconds']:.0f}s",
                  flush=True)

    study = {"seeds": seeds, "steps": args.steps, "context_stride": args.context_stride}
    print("\nseed  e1[150,250]  e3[150,250]  ratio  e1[after lcm]  e3 drops at periods  "
          "3h disentangled  1h disentangled")
    per_seed = []
    for (c1, s1), (c3, s3) in zip(runs[1], runs[3], strict=True):
        ratio = s3["error_150_250"] / s1["error_150_250"]
        drops = period_drops(c3)
        per_seed.append({"seed": s1["seed"], "e1_150_250": s1["error_150_250"],
                         "e3_150_250": s3["error_150_250"], "ratio": ratio,
                         "e1_after_lcm": s1["error_after_lcm"],
                         "e1_before_lcm": before_lcm(c1),
                         "e3_drops": drops, "disentangled_3": s3["disentangled"],
                         "disentangled_1": s1["disentangled"],
                         "dominance_3": s3["row_dominance"],
                         "train_seconds": [s1["train_seconds"], s3["train_seconds"]]})
        print(f"{s1['seed']:4d}  {s1['error_150_250']:11.4f}  {s3['error_150_250']:11.4f}  "
              f"{ratio:5.3f}  {s1['error_after_lcm']:13.4f}  "
              f"{' '.join(f'{d:.3f}' for d in drops):>19}  {str(s3['disentangled']):>15}  "
              f"{str(s1['disentangled']):>15}")
    study["per_seed"] = per_seed
    for heads in (1, 3):
        train_s = [s["train_seconds"] for _, s in runs[heads]]
        print(f"{heads} head(s): training {np.mean(train_s):.0f} s per net (mean over seeds)")
    n_ok = sum(r["ratio"] <= 1 / 3 for r in per_seed)
    n_dis = sum(r["disentangled_3"] for r in per_seed)
    n_lcm = sum(r["e1_after_lcm"] < 0.1 for r in per_seed)
    print(f"ratio e3/e1 on [150,250] <= 1/3: {n_ok}/{len(per_seed)} seeds; "
          f"1 head below 0.1 after lcm: {n_lcm}/{len(per_seed)}; "
          f"3 heads permutation-like: {n_dis}/{len(per_seed)}")
    curves = {}
    for heads in (1, 3):
        errors = np.stack([c["error"] for c, _ in runs[heads]])
        curve = dict(runs[heads][0][0])
        curve["error"], curve["error_std"] = errors.mean(0).tolist(), errors.std(0).tolist()
        curves[f"{heads} head{'s' if heads > 1 else ''} (mean of {len(seeds)} seeds)"] = curve
    study["mean_curves"] = curves
    plot_error_curves(curves, pathlib.Path(args.workdir) / "error_vs_context.png",
                      title="three moons, validation periods [1, 2, 3]")
    (pathlib.Path(args.workdir) / "study.json").write_text(json.dumps(study))


def before_lcm(curve):
    """Mean error on contexts in [max period + 20, lcm - 5]: before the 1-head memory can work."""
    context, error = np.asarray(curve["context"]), np.asarray(curve["error"])
    lo, hi = max(curve["periods_in_steps"]) + 20, curve["lcm_in_steps"] - 5
    return float(error[(context >= lo) & (context <= hi)].mean())


def period_drops(curve):
    """Error just before minus just after each period (positive = the error drops there):
    means over [p - 15, p - 2] and [p + 5, p + 18]."""
    context, error = np.asarray(curve["context"]), np.asarray(curve["error"])
    out = []
    for p in curve["periods_in_steps"]:
        before = error[(context >= p - 15) & (context <= p - 2)].mean()
        after = error[(context >= p + 5) & (context <= p + 18)].mean()
        out.append(float(before - after))
    return out


if __name__ == "__main__":
    main()
