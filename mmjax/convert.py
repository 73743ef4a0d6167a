"""Official PyTorch Memory Mosaics weights <-> mmjax parameters.

:func:`from_official_library` maps a ``state_dict`` of the official Library ``StackAssoMem``
(facebookresearch/MemoryMosaics, ``Library/memory_mosaics/models/memory_mosaics.py``,
non-EFT) onto :class:`mmjax.models.memory_mosaic.MemoryMosaic`, whose parameters carry the
names every mmjax model uses (``embedding/wte``, ``block_i/{norm_1, mixer, norm_2, ffn}``,
``final_norm``); :func:`to_official_library` is the inverse (mmjax parameters or gradients,
boxed as ``model.init`` returns them or plain, -> official names).

Layouts: a torch ``Linear``/``Conv1d`` weight is ``[out, in(, 1)]`` with head ``h`` the
contiguous output slice ``[h*K, (h+1)*K)``; mmjax keeps ``[in, heads, head_dim]`` for input
projections and ``[heads, head_dim, out]`` for ``c_proj`` (mmjax ``out/kernel``). Persistent
slots ``M_k{i}`` ``[1, H, S, K]`` stack into ``memory_keys [banks, S, H, K]``. The tied
``emb.weight`` / ``head.weight`` become one ``embedding/wte`` matrix. The full table of
names and the behavioural differences are in ``docs/official_code.md``.

Behaviour: identical in evaluation (tested to 1e-4 on logits and gradients against the
official code, tests/test_convert.py). The official ``hd_dropout`` is mmjax's
``dropout_rate`` and ``ic_dropout`` its ``pmem_attention_dropout``
(:func:`model_from_official_kwargs`): in training it acts on the persistent memory's
probabilities only; mmjax's contextual memory never applies it (as the official EFT
variant), see :mod:`mmjax.layers.memory`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.models import build_model
from mmjax.models.memory_mosaic import MemoryMosaic

# Defaults of the official StackAssoMem constructor.
OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    n_head=12, n_embd=768, n_layer=12, v_shift=1, block_size=512,
    k_fe_type="linearconv", v_fe_type="lowrlinearconv", k_kernel_size=1, v_kernel_size=2,
    ic_dropout=0.05, hd_dropout=0.05, bias=False, pmem_count=1, pmem_size=2688,
    pre_ln=True, weight_tying=True, skip_tokens=0, attn_only=False,
)

# Official StackAssoMem kwargs -> mmjax model-config keys, where only the name differs
# (``bias``, ``hd_dropout`` -> ``dropout_rate`` and ``ic_dropout`` -> ``pmem_attention_dropout``
# also change type: :func:`model_from_official_kwargs`).
OFFICIAL_NAMES: dict[str, str] = dict(
    vocab_size="vocab_size", n_layer="num_layers", n_head="num_heads", n_embd="embed_dim",
    pmem_size="pmem_size", pmem_count="pmem_count")

# Official kwargs whose value mmjax must match exactly (other values: NotImplementedError).
SUPPORTED_ONLY: dict[str, Any] = dict(
    v_shift=1, k_fe_type="linearconv", v_fe_type="lowrlinearconv", k_kernel_size=1,
    v_kernel_size=2, pre_ln=True, weight_tying=True, skip_tokens=0, attn_only=False,
)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One official tensor: its name, shape, mmjax path, and the two layout maps."""

    name: str
    shape: tuple[int, ...]
    path: tuple[str, ...]
    to_mmjax: Callable[[np.ndarray], np.ndarray]
    to_official: Callable[[np.ndarray], np.ndarray]


def _resolve_kwargs(official_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    if "vocab_size" not in official_kwargs:
        raise ValueError("official kwarg 'vocab_size' is required")
    known = set(OFFICIAL_DEFAULTS) | {"vocab_size", "config"}
    unknown = sorted(set(official_kwargs) - known)
    if unknown:
        raise ValueError(
            f"unknown official StackAssoMem kwarg(s) {unknown}; known: {sorted(known)}"
        )
    kw = {**OFFICIAL_DEFAULTS, **{k: v for k, v in official_kwargs.items() if k != "config"}}
    for name, value in SUPPORTED_ONLY.items():
        if kw[name] != value:
            raise NotImplementedError(
                f"official kwarg {name}={kw[name]!r} is not supported by mmjax "
                f"(only {name}={value!r})"
            )
    if kw["n_embd"] % kw["n_head"]:
        raise ValueError(f"n_embd={kw['n_embd']} must be divisible by n_head={kw['n_head']}")
    return kw


def model_from_official_kwargs(
    *, dtype=jnp.float32, param_dtype=jnp.float32, impl="auto", **official_kwargs
) -> MemoryMosaic:
    """The :class:`MemoryMosaic` equivalent to ``StackAssoMem(**official_kwargs)``: the
    official names become mmjax's (:data:`OFFICIAL_NAMES`; ``block_size`` is dropped, the
    network takes any length)."""
    kw = _resolve_kwargs(official_kwargs)
    model_config = {ours: kw[theirs] for theirs, ours in OFFICIAL_NAMES.items()}
    model_config.update(name="memory_mosaic", use_bias=bool(kw["bias"]),
                        dropout_rate=float(kw["hd_dropout"]),
                        pmem_attention_dropout=float(kw["ic_dropout"]), dtype=dtype,
                        param_dtype=param_dtype, impl=impl)
    return build_model(model_config)


def _entries(kw: Mapping[str, Any]) -> list[_Entry]:
    """The official tensors of a supported configuration, in state_dict order."""
    c, h, s, p = kw["n_embd"], kw["n_head"], kw["pmem_size"], kw["pmem_count"]
    k = c // h
    same = (lambda a: a, lambda a: a)
    # Linear [out, in] <-> [in, H, K];  Conv1d [out, in, 1] <-> [in, H, K].
    in_proj = (lambda a: a.T.reshape(c, h, k), lambda a: a.reshape(c, c).T)
    conv = (lambda a: a[:, :, 0].T.reshape(c, h, k), lambda a: a.reshape(c, c).T[:, :, None])
    # c_proj [out, in] <-> [H, K, out];  bias of an input projection [out] <-> [H, K].
    out_proj = (lambda a: a.T.reshape(h, k, c), lambda a: a.reshape(c, c).T)
    head_bias = (lambda a: a.reshape(h, k), lambda a: a.reshape(c))

    out = [_Entry("emb.weight", (kw["vocab_size"], c), ("embedding", "wte"), *same)]

    def add(name, shape, path, maps):
        out.append(_Entry(name, shape, path, *maps))

    def layer_norm(prefix, path):
        add(f"{prefix}.weight", (c,), (*path, "scale"), same)
        if kw["bias"]:
            add(f"{prefix}.bias", (c,), (*path, "bias"), same)

    def key_part(prefix, path):
        add(f"{prefix}.leaky_key_beta", (h,), (*path, "leaky_key_beta"), same)
        add(f"{prefix}.kernel_beta", (h,), (*path, "kernel_beta"), same)
        add(f"{prefix}.value_beta", (h,), (*path, "value_beta"), same)
        add(f"{prefix}.k_featurizer.conv.weight", (c, c, 1), (*path, "key"), conv)
        if kw["bias"]:
            add(f"{prefix}.k_featurizer.conv.bias", (c,), (*path, "key_bias"), head_bias)

    def c_proj(prefix, path):
        add(f"{prefix}.c_proj.weight", (c, c), (*path, "out", "kernel"), out_proj)
        if kw["bias"]:
            add(f"{prefix}.c_proj.bias", (c,), (*path, "out", "bias"), same)

    for i in range(kw["n_layer"]):
        blk, path = f"blocks.{i}", (f"block_{i}",)
        ctx, per = (*path, "mixer"), (*path, "ffn")
        layer_norm(f"{blk}.ln1", (*path, "norm_1"))
        key_part(f"{blk}.attn", ctx)
        add(f"{blk}.attn.v_featurizer.coef", (h,), (*ctx, "value_mix"), same)
        add(f"{blk}.attn.v_featurizer.linear.weight", (c, c), (*ctx, "value"), in_proj)
        if kw["bias"]:
            add(f"{blk}.attn.v_featurizer.linear.bias", (c,), (*ctx, "value_bias"), head_bias)
        c_proj(f"{blk}.attn", ctx)
        layer_norm(f"{blk}.ln2", (*path, "norm_2"))
        key_part(f"{blk}.pmem", per)
        for j in range(p):
            # [1, H, S, K] <-> bank j of [P, S, H, K]
            for mine, theirs in (("memory_keys", "M_k"), ("memory_values", "M_v")):
                add(f"{blk}.pmem.pmem.{theirs}{j}", (1, h, s, k), (*per, mine, j),
                    (lambda a: a[0].transpose(1, 0, 2), lambda a: a.transpose(1, 0, 2)[None]))
        c_proj(f"{blk}.pmem", per)
    layer_norm("ln_out", ("final_norm",))
    return out


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _set(tree: dict, path: tuple, value) -> None:
    *parents, leaf = path
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _get(tree: Mapping, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def from_official_library(
    state_dict: Mapping[str, Any],
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    impl: str = "auto",
    **official_kwargs,
) -> tuple[MemoryMosaic, dict]:
    """``StackAssoMem`` state_dict (+ its constructor kwargs) -> ``(model, params)``.

    Args:
      state_dict: official name -> tensor (torch tensors or arrays). ``head.weight`` may be
        absent; when present it must equal ``emb.weight`` (the official model ties them).
      dtype, param_dtype, impl: fields of the returned model.
      **official_kwargs: the official constructor's kwargs (``vocab_size``, ``n_head``,
        ``n_embd``, ``n_layer``, ``pmem_size``, ``pmem_count``, ``bias``, ...; defaults as
        in the official code).
    Returns:
      The model and its ``params`` (plain nested dict of arrays in ``param_dtype``).
    Raises:
      ValueError: missing, unexpected or wrongly shaped tensors; unknown kwargs.
      NotImplementedError: official options mmjax does not implement (post-LN, attention
        only, untied head, other feature extractors or value shifts, ``skip_tokens``).
    """
    model = model_from_official_kwargs(
        dtype=dtype, param_dtype=param_dtype, impl=impl, **official_kwargs
    )
    kw = _resolve_kwargs(official_kwargs)
    entries = _entries(kw)
    arrays = {name: _to_numpy(value) for name, value in state_dict.items()}
    tied = arrays.pop("head.weight", None)
    expected = {e.name for e in entries}
    missing = sorted(expected - set(arrays))
    if missing:
        raise ValueError(f"state_dict is missing key(s) {missing}")
    unexpected = sorted(set(arrays) - expected)
    if unexpected:
        raise ValueError(f"state_dict has unexpected key(s) {unexpected}")
    for e in entries:
        if arrays[e.name].shape != e.shape:
            raise ValueError(
                f"state_dict[{e.name!r}] must have shape {e.shape}, got {arrays[e.name].shape}"
            )
    if tied is not None and (
        tied.shape != arrays["emb.weight"].shape or not np.array_equal(tied, arrays["emb.weight"])
    ):
        raise ValueError(
            "state_dict['head.weight'] must equal state_dict['emb.weight'] (weight_tying=True)"
        )
    params: dict = {}
    banks: dict[tuple, dict[int, np.ndarray]] = {}
    for e in entries:
        value = e.to_mmjax(arrays[e.name].astype(np.float32))
        if isinstance(e.path[-1], int):  # one bank of the persistent slots
            banks.setdefault(e.path[:-1], {})[e.path[-1]] = value
        else:
            _set(params, e.path, value)
    for path, by_bank in banks.items():
        _set(params, path, np.stack([by_bank[j] for j in sorted(by_bank)]))
    params = _map_leaves(params, lambda a: jnp.asarray(a, dtype=param_dtype))
    return model, params


def to_official_library(params: Mapping, **official_kwargs) -> dict[str, np.ndarray]:
    """mmjax ``params`` (or gradients shaped like them) -> official state_dict names.

    ``params`` may be what ``model.init`` returns (the variables, or their ``"params"``,
    boxed with logical-axis metadata) or plain arrays. Both ``emb.weight`` and
    ``head.weight`` are emitted (the same array), as torch lists a tied tensor under both
    names.
    """
    kw = _resolve_kwargs(official_kwargs)
    if "params" in params and "embedding" not in params:  # the whole ``model.init`` output
        params = params["params"]
    params = nn.meta.unbox(params)
    out: dict[str, np.ndarray] = {}
    for e in _entries(kw):
        if isinstance(e.path[-1], int):
            value = np.asarray(_get(params, e.path[:-1]))[e.path[-1]]
        else:
            value = np.asarray(_get(params, e.path))
        out[e.name] = e.to_official(value)
    out["head.weight"] = out["emb.weight"]
    return out


def _map_leaves(tree, fn):
    if isinstance(tree, Mapping):
        return {k: _map_leaves(v, fn) for k, v in tree.items()}
    return fn(tree)
