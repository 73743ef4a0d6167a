"""Why the trained 1-head net stays above 0.1 after the lcm: a diagnostic on saved nets.

Evaluates the nets of a seed study (``benchmarks/moons_seeds.py``) and the identity solution
with the ``skip`` most recent pairs hidden from every query (``MoonsMemory(skip=...)``), at a
few context lengths past the lcm. Prints the 25-step rollout error for each.

    python benchmarks/moons_recent_pairs.py --workdir /tmp/moons_seeds --seed 100
"""

from __future__ import annotations

import argparse
import pathlib

import jax.numpy as jnp
import numpy as np

from mmjax.moons import VALIDATION_PERIODS, MoonsMemory, identity_params, sample_batch
from mmjax.moons.evaluate import rollout_errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--num_sequences", type=int, default=128)
    args = parser.parse_args()
    x, _ = sample_batch(np.random.default_rng(0), VALIDATION_PERIODS, args.num_sequences, 800)
    contexts = np.array([300, 500, 700])
    print(f"25-step rollout error at contexts {contexts.tolist()} (lcm = 266.7 steps)")
    for heads in (1, 3):
        saved = np.load(pathlib.Path(args.workdir) / f"heads{heads}_seed{args.seed}" / "params.npz")
        trained = {k: jnp.asarray(saved[k]) for k in saved.files}
        for name, params in (("trained", trained), ("identity", identity_params())):
            for skip in (0, 3, 10):
                model = MoonsMemory(num_heads=heads, skip=skip)
                errors = np.asarray(rollout_errors(model, params, x, contexts, 25))
                shown = " ".join(f"{e:.3f}" for e in errors)
                print(f"heads={heads} {name:8s} skip={skip:2d}: {shown}")


if __name__ == "__main__":
    main()
