"""Attention maps: how the last position's retrieval weights spread over earlier positions (the
v1 paper's figures 14-16), per layer and head, for contextual memories (v1, each v2 tier) and
transformer heads.

Every retrieval of a model records its queries, keys, bandwidth and mask when called with
``mutable=["intermediates"]`` (:func:`mmjax.layers.common.sow_retrieval`); the weights of the
last query row alone are recomputed with :func:`mmjax.ops.retrieval_weights` (``[1, T]`` per
head: never a ``T x T`` matrix, so 32k contexts are fine) and averaged over the batch. The
maps are taken at the training context and at multiples of it (``factors``).
"""

from __future__ import annotations

import json
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import make_batches
from mmjax.eval.positions import scaled_contexts
from mmjax.generate.workdir import Trained
from mmjax.ops import MaskSpec, retrieval_weights


def _records(intermediates) -> dict[str, dict]:
    """``{"block_0/mixer/short_term": record}`` for every recorded retrieval (scanned layers
    are split into ``layer_i``)."""
    records = {}
    flat = flax.traverse_util.flatten_dict(intermediates)
    for path, sown in flat.items():
        if path[-1] != "retrieval":
            continue
        name = "/".join(str(p) for p in path[:-1])
        for record in sown:
            if "blocks" in path:  # scanned: a leading [layers] axis
                layers = record["keys"].shape[0]
                for i in range(layers):
                    records[name.replace("blocks/layer", f"layer_{i}")] = jax.tree.map(
                        lambda x, i=i: x[i], record)
            else:
                records[name] = record
    return records


def last_row_weights(trained: Trained, tokens_BxT) -> dict[str, np.ndarray]:
    """``{memory name: [heads, T]}``: the batch-mean retrieval weights of the last position."""
    model, params = trained.model, trained.params
    collect = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                               mutable=["intermediates"])[1]["intermediates"])
    maps = {}
    for name, r in _records(collect(params, jnp.asarray(tokens_BxT))).items():
        t = r["keys"].shape[1]
        beta = r["bandwidth"]
        beta_1xH = beta[-1:] if beta.ndim == 2 else beta[None]
        window = int(r["window"])
        mask = MaskSpec(window=None if window < 0 else window, skip=int(r["skip"]))
        w_BxHx1xT = retrieval_weights(r["queries"][:, -1:], r["keys"], beta_1xH, mask,
                                      jnp.int32(int(r["query_offset"]) + t - 1))
        maps[name] = np.asarray(jnp.mean(w_BxHx1xT[:, :, 0], axis=0))
    return maps


def attention_maps(workdir, *, factors=(1, 3), store: str | None = None, batches: int = 1,
                   batch_size: int = 4, output: str) -> dict:
    """Maps at ``factor x`` the training context; writes ``attention.{json,png}``."""
    trained, data, base = scaled_contexts(workdir, factors, store)
    result = {}
    for f in factors:
        context = base * f
        source = make_batches(dict(data, context_length=context, batch_size=batch_size),
                              vocab_size=trained.model.vocab_size, split="val")
        sums = None
        for _ in range(batches):
            maps = last_row_weights(trained, np.asarray(next(source))[:, :context])
            sums = maps if sums is None else {k: sums[k] + v for k, v in maps.items()}
        if hasattr(source, "close"):
            source.close()
        result[str(context)] = {k: (v / batches).tolist() for k, v in sums.items()}
    _write(result, output, f"{trained.config['model']['name']} trained at context {base}")
    return result


def _write(result: dict, output: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(output)
    path.mkdir(parents=True, exist_ok=True)
    (path / "attention.json").write_text(json.dumps({"title": title, "maps": result}))
    contexts = list(result)
    names = list(result[contexts[0]])
    fig, axes = plt.subplots(len(contexts), len(names), squeeze=False,
                             figsize=(3.2 * len(names), 2.6 * len(contexts)))
    for row, context in enumerate(contexts):
        for col, name in enumerate(names):
            ax = axes[row][col]
            for head, weights in enumerate(result[context][name]):
                ax.plot(np.arange(len(weights)), weights, linewidth=0.8, label=f"head {head}")
            ax.set_title(f"{name}\ncontext {context}", fontsize=8)
            ax.set_xlabel("position", fontsize=7)
            ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("weight of the last query", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path / "attention.png", dpi=110)
    plt.close(fig)
