"""Why a trained 1-head three-moons net stays above 0.1 after the lcm: its training loss.

Compares 1-head nets on the two things that matter: the training objective (clipped squared
error of teacher-forced one-step predictions on the training period triples) and the 25-step
rollout error on the validation triple after the lcm (266.7 steps). The nets:

- the official code's own trained nets (``tests/fixtures/moons_official_mlx.npz``, MLX);
- optionally ours, from a seed study (``--workdir`` of ``benchmarks/moons_seeds.py``);
- the identity solution with keys scaled by 1, 1.5, 2 and 3 (a sharper kernel), and the
  identity with its 3 most recent pairs hidden from every query (``MoonsMemory(skip=3)``).

    python benchmarks/moons_one_head.py [--workdir /tmp/moons_seeds]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax.numpy as jnp
import numpy as np

from mmjax.moons import (
    TRAIN_PERIODS,
    VALIDATION_PERIODS,
    MoonsMemory,
    clipped_loss,
    identity_params,
    params_from_official,
    sample_batch,
)
from mmjax.moons.evaluate import rollout_errors
from mmjax.moons.train import load_trained_params

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "moons_official_mlx"
LCM = 266.7


def candidates(workdir):
    nets = {}
    official = np.load(FIXTURE.with_suffix(".npz"))
    for run in sorted(json.loads(FIXTURE.with_suffix(".json").read_text())["trained"]):
        if not run.startswith("h1_"):
            continue
        p = f"trained_{run}/"
        nets[f"official MLX {run}"] = (0, params_from_official(
            official[p + "k"], official[p + "v"], official[p + "z"]))
    if workdir is not None:
        for run in sorted(pathlib.Path(workdir).glob("heads1_seed*")):
            if (run / "summary.json").exists():  # trained and evaluated: its last checkpoint
                nets[f"mmjax {run.name}"] = (0, load_trained_params(run))
    for scale in (1.0, 1.5, 2.0, 3.0):
        params = dict(identity_params())
        params["W_k"] = scale * params["W_k"]
        nets[f"identity, keys x{scale:g}"] = (0, params)
    nets["identity, 3 recent pairs hidden"] = (3, identity_params())
    return nets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="a seed study's workdir (optional)")
    parser.add_argument("--num_sequences", type=int, default=64)
    args = parser.parse_args()
    x_train, y_train = sample_batch(np.random.default_rng(1), TRAIN_PERIODS,
                                    args.num_sequences, 800)
    x_val, y_val = sample_batch(np.random.default_rng(0), VALIDATION_PERIODS,
                                args.num_sequences, 800)
    contexts = np.array([300, 400, 500, 600, 700])
    print(f"{args.num_sequences} sequences; lcm = {LCM} steps; rollout error = mean over "
          f"contexts {contexts.tolist()}, 25 steps each")
    print(f"{'net':34s} {'train loss':>10s} {'1-step err <lcm':>15s} {'1-step err >lcm':>15s} "
          f"{'rollout err >lcm':>16s}")
    for name, (skip, params) in candidates(args.workdir).items():
        model = MoonsMemory(num_heads=1, skip=skip)
        loss = float(clipped_loss(model.apply({"params": params}, jnp.asarray(x_train)),
                                  y_train, 0.5))
        abs_err = np.abs(np.asarray(model.apply({"params": params}, jnp.asarray(x_val))) - y_val)
        before, after = abs_err[:, 10:260].mean(), abs_err[:, 272:].mean()
        rollout = float(np.asarray(rollout_errors(model, params, x_val, contexts, 25)).mean())
        print(f"{name:34s} {loss:10.5f} {before:15.4f} {after:15.4f} {rollout:16.3f}", flush=True)


if __name__ == "__main__":
    main()
