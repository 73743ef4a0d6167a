"""Parameter count and forward FLOPs per token of any model config, from its parameter shapes.

    python -m mmjax.flops --config configs/mmv2.py[:presets]

The model is built from ``config.model`` and its parameters are shaped with
``jax.eval_shape(model.init, ...)`` (no memory is allocated, so the 10B configs count on a
laptop). Every parameter is put in one group by its path (the names every model shares,
:mod:`mmjax.layers.common`): ``embedding`` (``wte``, ``wpe``), the block's ``mixer`` and
``ffn``, ``norms``, ``head`` (``lm_head``). An unknown name raises. The tables name the mixer
and ffn of a Memory Mosaic ``memories`` and ``persistent memory``, those of a transformer
``attention`` and ``MLP`` (a model class may say so with a ``flops_labels`` attribute).
A config without a language model (``configs/moons.py``) gets a one-line message.

FLOPs convention (the one that reproduces "Memory Mosaics at Scale"'s table): forward FLOPs per
token = 2 x the number of parameters used in matrix products, i.e. every parameter with two or
more axes except the embedding tables (a lookup, no FLOPs), plus the tied head (``wte`` used as
the output matrix) when there is no ``lm_head``. Elementwise work (norms, gates' exponentials,
scans, per-head scalars) and the context-dependent retrieval/attention products
(``4 n_t H K`` per retrieval, layer and token) are not counted: the paper's FLOPs per token
are context-independent (with the retrieval terms at context 4096 the transformer would be
17.7B instead of 16.7B, MM v2 20.0B instead of 18.9B). The CLI prints that term separately
(:func:`retrieval_flops_per_token`, at ``config.data.context_length``).
The last line of the CLI output is exactly ``params=<integer> flops_per_token=<integer>``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import cli
from mmjax.layers.common import LanguageModel
from mmjax.models import build_model, model_class
from mmjax.ops.masks import visible_count

# The labels of the block parts, by role; transformers override them (``flops_labels``).
MEMORY_LABELS = {"mixer": "memories", "ffn": "persistent memory"}


class NoLanguageModel(ValueError):
    """The config has no ``model.name`` of a registered language model."""


def labels_of(model_config: Mapping[str, Any]) -> dict[str, str]:
    """``{"mixer": label, "ffn": label}`` of the model class named in ``model_config``."""
    return dict(getattr(model_class(model_config["name"]), "flops_labels", MEMORY_LABELS))


def groups_of(labels: Mapping[str, str]) -> tuple[str, ...]:
    return ("embedding", labels["mixer"], labels["ffn"], "norms", "head")


@dataclasses.dataclass(frozen=True)
class Count:
    """Per-group parameter and forward-FLOP counts (``params[g]``, ``flops[g]``)."""

    model_name: str
    params: dict[str, int]
    flops: dict[str, int]
    num_layers: int
    memory_parts: dict[str, int] = dataclasses.field(default_factory=dict)
    labels: dict[str, str] = dataclasses.field(default_factory=lambda: dict(MEMORY_LABELS))

    @property
    def groups(self) -> tuple[str, ...]:
        return groups_of(self.labels)

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())


def parameter_shapes(model_config: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{path: shape}`` of the model's parameters, via ``jax.eval_shape`` (no allocation).

    Always of the unrolled layout (``block_i``): scanning the layers changes the parameters'
    layout, not their count or FLOPs.
    """
    model_config = dict(model_config)
    if "scan_layers" in model_config:
        model_config["scan_layers"] = False
    model = build_model(model_config)
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(shapes["params"]))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def group_of(path: tuple[str, ...], labels: Mapping[str, str] = MEMORY_LABELS) -> str:
    """The group of a parameter path (see the module docstring); raises on an unknown name."""
    if path[-1] in ("wte", "wpe"):
        return "embedding"
    if path[-1] == "lm_head":
        return "head"
    if "mixer" in path:
        return labels["mixer"]
    if "ffn" in path:
        return labels["ffn"]
    if any("norm" in part for part in path):
        return "norms"
    raise ValueError(f"cannot classify parameter {'/'.join(path)}: expected a name among "
                     "wte, wpe, lm_head, mixer, ffn, *norm*")


def count(model_config: Mapping[str, Any]) -> Count:
    """Parameters and forward FLOPs per token of ``model_config``, grouped."""
    if "name" not in model_config:
        raise NoLanguageModel("the config has no language model (config.model.name is missing)")
    if not issubclass(model_class(model_config["name"]), LanguageModel):
        raise NoLanguageModel(f"the config has no language model (model "
                              f"{model_config['name']!r} is not one)")
    labels = labels_of(model_config)
    shapes = parameter_shapes(model_config)
    params = dict.fromkeys(groups_of(labels), 0)
    flops = dict.fromkeys(groups_of(labels), 0)
    tied_head = not any(path[-1] == "lm_head" for path in shapes)
    parts: dict[str, int] = {}
    for path, shape in shapes.items():
        group, size = group_of(path, labels), int(np.prod(shape, dtype=np.int64))
        params[group] += size
        if group == labels["mixer"]:  # e.g. short_term, long_term, out (W_o), heads, key
            part = path[path.index("mixer") + 1]
            parts[part] = parts.get(part, 0) + size
        if len(shape) >= 2 and group != "embedding":
            flops[group] += 2 * size
        if tied_head and path[-1] == "wte":
            flops["head"] += 2 * size
    layers = len({path[0] for path in shapes if path[0].startswith("block_")})
    return Count(str(model_config["name"]), params, flops, layers, dict(sorted(parts.items())),
                 labels)


def retrieval_tiers(model_config: Mapping[str, Any]) -> list[tuple[Any, Any, int]]:
    """``(window, skip, query_offset)`` of each retrieval in a block, at inference.

    ``query_offset`` is 1 for attention (diagonal included), 0 for memories.
    """
    name = model_config["name"]
    if name == "memory_mosaic":  # the persistent slots are parameters, counted in the total
        return [(None, 0, 0)]
    if name in ("gpt2", "llama"):
        return [(None, 0, 1)]
    if name == "llama_short_long":
        return [(model_config["short_term_window"], 0, 1),
                (None, model_config["inference_long_term_skip"], 1)]
    if name == "memory_mosaic_v2":
        tiers = [(model_config["short_term_window"], 0, 0)]
        if model_config.get("long_term", True):
            tiers.append((None, model_config["inference_long_term_skip"], 0))
        return tiers
    raise ValueError(f"no retrieval layout known for model {name!r}")


def retrieval_flops_per_token(model_config: Mapping[str, Any], context_length: int) -> int:
    """Score and weighted-sum FLOPs (``4 n_t D`` per retrieval and layer), averaged over a
    sequence of ``context_length`` tokens. Not part of :func:`count` (see the docstring)."""
    positions = np.arange(context_length)
    visible = 0
    paged = model_config.get("long_term_memory", "exact") == "paged"
    for window, skip, offset in retrieval_tiers(model_config):
        count = np.asarray(visible_count(positions + offset, window=window, skip=skip))
        if paged and window is None:
            # a paged long-term tier: its page bounds (two products of K per page seen)
            # and the pairs of the pages it keeps (mmjax.ops.retrieve_paged)
            page, top = model_config["long_term_page"], model_config["long_term_top_pages"]
            pages = -(-count // page)
            count = np.minimum(count, top * page) + pages
        visible += int(np.sum(count))
    per_token = 4 * model_config["embed_dim"] * visible / context_length
    return int(round(per_token * model_config["num_layers"]))


def format_count(c: Count) -> str:
    """A table of the groups (with per-layer figures for the blocks) and the final line."""
    lines = [f"model: {c.model_name} ({c.num_layers} layers)",
             f"{'group':<18} {'params':>15} {'share':>6} {'per layer':>13} "
             f"{'fwd FLOPs/token':>16}"]
    blocks = (c.labels["mixer"], c.labels["ffn"])
    for g in c.groups:
        per_layer = (f"{c.params[g] // c.num_layers:>13,}"
                     if g in blocks and c.num_layers else f"{'':>13}")
        lines.append(f"{g:<18} {c.params[g]:>15,} {c.params[g] / c.total_params:>6.1%} "
                     f"{per_layer} {c.flops[g]:>16,}")
        if g == c.labels["mixer"]:
            for part, size in c.memory_parts.items():
                lines.append(f"  {part:<16} {size:>15,} {size / c.total_params:>6.1%} "
                             f"{size // max(c.num_layers, 1):>13,}")
    lines.append(f"{'total':<18} {c.total_params:>15,} {1:>6.1%} {'':>13} {c.total_flops:>16,}")
    lines.append(f"params={c.total_params} flops_per_token={c.total_flops}")
    return "\n".join(lines)


def format_comparison(c: Count, base: Count) -> str:
    """Per-group differences ``c - base``, as counts and as a share of ``base``'s total."""
    lines = [f"vs {base.model_name}: {'group':<18} {'params diff':>15} {'of base':>8} "
             f"{'FLOPs diff':>16} {'of base':>8}"]
    prefix = " " * (len(base.model_name) + 5)
    # Groups by role: a memory model's "memories" against a transformer's "attention".
    rows = [(f"{g}" if g == gb else f"{g} / {gb}", c.params[g] - base.params[gb],
             c.flops[g] - base.flops[gb]) for g, gb in zip(c.groups, base.groups, strict=True)]
    rows.append(("total", c.total_params - base.total_params, c.total_flops - base.total_flops))
    for g, dp, df in rows:
        lines.append(f"{prefix}{g:<18} {dp:>+15,} {dp / base.total_params:>+8.1%} "
                     f"{df:>+16,} {df / base.total_flops:>+8.1%}")
    return "\n".join(lines)


def main(argv=None) -> None:
    """CLI: ``python -m mmjax.flops --config SPEC [--baseline SPEC]`` (specs as
    :func:`mmjax.config.load` reads them).

    ``--baseline`` adds the per-group difference to a second config before the final line.
    Exit statuses: :mod:`mmjax.cli`.
    """
    from absl import flags

    from mmjax.config import define_flag

    if not os.environ.get("JAX_PLATFORMS"):  # shapes only: never wake an accelerator
        jax.config.update("jax_platforms", "cpu")
    config = define_flag("config", None)
    baseline = define_flag("baseline", None, "optional config FILE.py[:presets] to compare with")
    flags.mark_flag_as_required("config")

    def run():
        try:
            c = count(config.value.get("model", {}))
        except NoLanguageModel as e:
            print(f"{e}: nothing to count.")
            return
        table = format_count(c).splitlines()
        if baseline.value is not None:
            table[-1:-1] = format_comparison(c, count(baseline.value.model)).splitlines()
        context = config.value.get("data", {}).get("context_length")
        if context:
            extra = retrieval_flops_per_token(config.value.model, context)
            table.insert(-1, f"not in the total (paper convention): retrieval/attention products "
                             f"at context {context}: {extra:,} FLOPs/token")
        print("\n".join(table))

    cli.run_absl(run, argv=argv)


if __name__ == "__main__":
    main()
