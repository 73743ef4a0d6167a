"""Building blocks shared by every model: the settings every language model shares
(:class:`ModelConfig`, :class:`LanguageModel`), initialisers, norms, embedding and head, the
head output projection, the stack of blocks (unrolled or scanned, remat policies), input
checks, and the long-term skip of one forward pass.

Every model of :mod:`mmjax.models` (v1 and v2 Memory Mosaics, GPT2, LLaMA) is assembled from
these, so the same role has the same module and parameter names everywhere::

    embedding/wte, embedding/lm_head     token embedding, untied output head  ("vocab", "embed")
    block_{i}/norm_1, block_{i}/norm_2   pre-norms of the two residual branches ("embed",)
    block_{i}/mixer                      attention or associative memories
    block_{i}/mixer/.../out              HeadOutput: heads -> width (c_proj, W_o)
    block_{i}/ffn                        MLP, SwiGLU or v1 persistent memory
    final_norm                           the norm before the output head

With ``scan_layers=True`` the blocks are one scanned ``blocks/layer`` whose parameters have a
leading ``[num_layers]`` axis (:func:`run_blocks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.ops import RetrievalSharding, project, select_long_term_skip

Array = jax.Array

NORM_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The settings every language model shares, with one name and meaning in all of them.

    A model's ``config.model`` is flat: :func:`mmjax.models.build_model` puts these keys here
    and passes the others (the model's own) as the model's fields. A bad value raises one
    ``ValueError`` naming the key, when the config is made (before anything is compiled).

    Attributes:
      vocab_size, embed_dim, num_layers, num_heads: ``N``, ``D``, ``L`` and ``H``
        (``num_heads`` divides ``embed_dim``).
      dropout_rate: dropout on the residual branches (after each output projection, and where
        each model documents it); 0 in evaluation.
      dtype: compute dtype (e.g. ``"bfloat16"``); logits are returned in fp32.
      param_dtype: storage dtype of the parameters.
      init_std: std of the ``N(0, std^2)`` init of the embedding and the input projections;
        ``None``: the model's own (0.02; the v1 Memory Mosaic ``1/sqrt(embed_dim)``, as the
        official Library). Output projections scale it down by depth, as each model says.
      scan_layers: one ``nn.scan`` over the blocks (:func:`run_blocks`).
      remat: remat policy of every block (:data:`REMAT_POLICIES`).
      impl: ``impl`` of :func:`mmjax.ops.retrieve` for every attention or memory.
    """

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    dropout_rate: float = 0.0
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    init_std: float | None = None
    scan_layers: bool = False
    remat: str = "none"
    impl: str = "auto"

    def __post_init__(self):
        problems = config_problems(self)
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        """``K = D / H``."""
        return self.embed_dim // self.num_heads

    def std(self, default: float) -> float:
        """``init_std``, or the model's ``default`` when it is ``None``."""
        return default if self.init_std is None else self.init_std


MODEL_CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def config_problems(c: ModelConfig) -> list[str]:
    """One line per bad value of ``c``, naming its ``model.`` key (empty: all good)."""
    problems = []

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for key in ("vocab_size", "embed_dim", "num_layers", "num_heads"):
        value = getattr(c, key)
        if not is_int(value) or value < 1:
            problems.append(f"model.{key}={value!r} must be an integer >= 1")
    if not problems and c.embed_dim % c.num_heads:
        problems.append(f"model.num_heads={c.num_heads} must divide "
                        f"model.embed_dim={c.embed_dim}")
    if not isinstance(c.dropout_rate, int | float) or not 0.0 <= c.dropout_rate < 1.0:
        problems.append(f"model.dropout_rate={c.dropout_rate!r} must be in [0, 1)")
    if c.init_std is not None and (not isinstance(c.init_std, int | float) or c.init_std <= 0):
        problems.append(f"model.init_std={c.init_std!r} must be > 0 (or None)")
    for key in ("dtype", "param_dtype"):
        try:
            ok = jnp.issubdtype(jnp.dtype(getattr(c, key)), jnp.floating)
        except TypeError:
            ok = False
        if not ok:
            problems.append(f"model.{key}={getattr(c, key)!r} must be a floating dtype")
    if not isinstance(c.scan_layers, bool):
        problems.append(f"model.scan_layers={c.scan_layers!r} must be True or False")
    if c.remat not in REMAT_POLICIES:
        problems.append(f"model.remat={c.remat!r} must be one of {sorted(REMAT_POLICIES)}")
    if not isinstance(c.impl, str):
        problems.append(f"model.impl={c.impl!r} must be a string")
    return problems


class LanguageModel(nn.Module):
    """Base of every language model: the shared settings in ``config``, the model's own as
    fields of the subclass (built from a flat ``config.model`` by
    :func:`mmjax.models.build_model`).

    ``config_defaults``: the shared settings a subclass assumes when a config leaves them out
    (its reference sizes). The shared settings also read as attributes, ``model.vocab_size``
    being ``model.config.vocab_size``.
    """

    config: ModelConfig
    config_defaults: ClassVar[dict[str, Any]] = {}


for _key in MODEL_CONFIG_KEYS:
    setattr(LanguageModel, _key, property(lambda self, key=_key: getattr(self.config, key),
                                          doc=f"``config.{_key}``"))


def normal_init(std: float, names: tuple):
    """``N(0, std^2)`` initializer annotated with logical axis ``names``."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def zeros_init(names: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros, names)


def per_head_dim(embed_dim: int, num_heads: int) -> int:
    """``embed_dim // num_heads``, raising when it does not divide."""
    if num_heads < 1 or embed_dim % num_heads:
        raise ValueError(
            f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})"
        )
    return embed_dim // num_heads


def layer_norm(name: str, *, use_bias: bool, dtype: Any, param_dtype: Any = jnp.float32,
               eps: float = NORM_EPSILON) -> nn.Module:
    """LayerNorm over the width (the v1 Memory Mosaic and GPT2): scale 1, bias 0, the
    two-pass variance of torch."""
    return nn.LayerNorm(
        epsilon=eps, use_bias=use_bias, use_fast_variance=False, dtype=dtype,
        param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=zeros_init(("embed",)),
    )


def rms_norm(name: str, *, dtype: Any, param_dtype: Any = jnp.float32,
             eps: float = NORM_EPSILON) -> nn.Module:
    """RMSNorm over the width (MM v2 and LLaMA): scale 1."""
    return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)))


class TokenEmbedding(nn.Module):
    """Token embedding ``wte [N, D]`` and the output head (tied to ``wte`` or ``lm_head``)."""

    vocab_size: int
    embed_dim: int
    tie_embeddings: bool
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.wte = self.param("wte", normal_init(self.init_std, ("vocab", "embed")),
                              (self.vocab_size, self.embed_dim), self.param_dtype)
        if not self.tie_embeddings:
            self.lm_head = self.param("lm_head", normal_init(self.init_std, ("embed", "vocab")),
                                      (self.embed_dim, self.vocab_size), self.param_dtype)

    def __call__(self, input_ids_BxT: Array) -> Array:
        chex.assert_rank(input_ids_BxT, 2)
        return jnp.take(self.wte, input_ids_BxT, axis=0).astype(self.dtype)

    def head(self) -> Array:
        """The output matrix ``[D, N]`` in the compute dtype (``wte.T`` when tied)."""
        w_DxN = self.wte.T if self.tie_embeddings else self.lm_head
        return jnp.asarray(w_DxN, self.dtype)

    def logits(self, x_BxTxD: Array) -> Array:
        """fp32 logits ``[B, T, N]``."""
        chex.assert_rank(x_BxTxD, 3)
        return jnp.einsum("btd,dn->btn", x_BxTxD.astype(self.dtype), self.head(),
                          preferred_element_type=jnp.float32)

    def output(self, x_BxTxD: Array, *, logit_scale: float = 1.0, return_head: bool = False):
        """A model's result from its final hidden states ``[B, T, D]``: fp32 logits
        ``logit_scale * x @ head`` ``[B, T, N]``, or with ``return_head`` what the fused loss
        (:func:`mmjax.ops.lm_head_loss`) takes instead: ``(x [B, T, D] in the compute dtype,
        head [D, N], logit_scale)``."""
        chex.assert_rank(x_BxTxD, 3)
        if return_head:
            return x_BxTxD.astype(self.dtype), self.head(), logit_scale
        logits_BxTxN = self.logits(x_BxTxD)
        return logits_BxTxN * logit_scale if logit_scale != 1.0 else logits_BxTxN


def projection(module: nn.Module, x: Array, *, out_shape: tuple, names: tuple,
               init_std: float, use_bias: bool, dtype, param_dtype, contract: int = 1,
               kernel: str = "kernel", bias: str = "bias") -> Array:
    """``x @ W (+ b)`` (:func:`mmjax.ops.project`) over the last ``contract`` axes of ``x``,
    with ``W = module.<kernel>`` ``[*in, *out_shape]`` (init ``N(0, init_std^2)``, logical
    axes ``names``) and ``b = module.<bias>`` ``[*out_shape]`` (zeros). Every weight matmul
    of the models is one of these: :class:`Linear`, :func:`head_projection`,
    :class:`HeadOutput`."""
    in_shape = tuple(x.shape[x.ndim - contract:])
    w = module.param(kernel, normal_init(init_std, names), in_shape + tuple(out_shape),
                     param_dtype)
    y = project(x.astype(dtype), jnp.asarray(w, dtype), contract)
    if use_bias:
        b = module.param(bias, zeros_init(names[contract:]), tuple(out_shape), param_dtype)
        y = y + jnp.asarray(b, dtype)
    return y


class Linear(nn.Module):
    """``x @ kernel (+ bias)`` over the last axis: ``[..., D] -> [..., F]``. Parameters
    ``kernel [D, F]`` and, with ``use_bias``, ``bias [F]``, with logical axis ``names``
    (``(in, out)``)."""

    features: int
    names: tuple
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        return projection(self, x_BxTxD, out_shape=(self.features,), names=self.names,
                          init_std=self.init_std, use_bias=self.use_bias, dtype=self.dtype,
                          param_dtype=self.param_dtype)


def head_projection(module: nn.Module, name: str, x_BxTxD: Array, *, num_heads: int,
                    head_dim: int, init_std: float, use_bias: bool, dtype, param_dtype) -> Array:
    """``x W (+ b)`` with ``W = name [D, H, K]`` and ``b = name_bias [H, K]``: ``[B, T, H, K]``."""
    return projection(module, x_BxTxD, out_shape=(num_heads, head_dim),
                      names=("embed", "heads", "head_dim"), init_std=init_std,
                      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel=name,
                      bias=f"{name}_bias")


class HeadOutput(nn.Module):
    """Output projection fusing head outputs: ``[B,T,H,V] -> [B,T,D]`` (``c_proj`` / ``W_o``).

    Used by attention, by the v1 memory units and by the v2 memories (whose short- and
    long-term heads are concatenated along the head axis before it). Parameters ``kernel``
    ``[H, V, D]`` (``("heads", "head_dim", "embed")``) and, with ``use_bias``, ``bias [D]``.
    """

    features: int
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y_BxTxHxV: Array) -> Array:
        chex.assert_rank(y_BxTxHxV, 4)
        return projection(self, y_BxTxHxV, out_shape=(self.features,),
                          names=("heads", "head_dim", "embed"), init_std=self.init_std,
                          use_bias=self.use_bias, dtype=self.dtype,
                          param_dtype=self.param_dtype, contract=2)


# Remat policies by config name: what a block keeps from its forward pass for the backward.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(remat: str) -> None:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: choose one of {sorted(REMAT_POLICIES)}")


class _ScanStep(nn.Module):
    """One layer as a scan step: ``(x, long_term_skip, step) -> (x, None)``."""

    block: Any  # a block class (possibly rematerialised)
    block_kwargs: Any  # its fields, as a tuple of (name, value)
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxTxD: Array, long_term_skip, step):
        block = self.block(**dict(self.block_kwargs), name="layer")
        return block(x_BxTxD, self.deterministic, long_term_skip, step), None


def run_blocks(block_cls: type, x_BxTxD: Array, *, config: ModelConfig, deterministic: bool,
               long_term_skip=None, step=None, **block_kwargs) -> Array:
    """Apply ``config.num_layers`` residual blocks to ``x_BxTxD``.

    The one way every model builds its blocks: ``block_cls(config=config, **block_kwargs)``,
    the shared settings and the block's own, by keyword. Call inside a model's
    ``nn.compact`` method. Blocks are called as ``block(x, deterministic, long_term_skip,
    step)`` (``deterministic`` static; ``step``: a :class:`mmjax.layers.cache.DecodeStep` for
    a cached call, else ``None``).

    * ``config.scan_layers=False``: ``block_0 .. block_{L-1}`` one after the other (the names
      :mod:`mmjax.convert` and :mod:`mmjax.flops` read).
    * ``config.scan_layers=True``: one ``nn.scan`` over a ``blocks/layer`` whose parameters
      carry a leading ``[num_layers]`` axis (logical name ``"layers"``): the step is traced
      and compiled once, so compile time does not grow with depth. Same function, other
      parameter layout. Cache variables are stacked on axis 1 (``[batch, layers, ...]``), so
      that the batch is axis 0 of every cache array whatever the layout.
    * ``config.remat``: a name of :data:`REMAT_POLICIES`; each block's activations are
      recomputed in the backward pass except what the policy saves.
    """
    num_layers, scan, remat = config.num_layers, config.scan_layers, config.remat
    block_kwargs = dict(block_kwargs, config=config)
    check_remat(remat)
    if remat != "none":
        block_cls = nn.remat(block_cls, static_argnums=(2,), policy=REMAT_POLICIES[remat],
                             prevent_cse=not scan)
    if not scan:
        for i in range(num_layers):
            x_BxTxD = block_cls(**block_kwargs, name=f"block_{i}")(x_BxTxD, deterministic,
                                                                   long_term_skip, step)
        return x_BxTxD
    scanned = nn.scan(_ScanStep, variable_axes={"params": 0, "cache": 1, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=nn.broadcast, length=num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    layers = scanned(block=block_cls, block_kwargs=tuple(sorted(block_kwargs.items())),
                     deterministic=deterministic, name="blocks")
    x_BxTxD, _ = layers(x_BxTxD, long_term_skip, step)
    return x_BxTxD


def retrieval_sharding(*, queries_are_tokens: bool = False) -> RetrievalSharding:
    """How a retrieval splits over the mesh, from the logical-axis rules in effect.

    Batch rows follow the rule of ``"batch"`` and heads that of ``"heads"``. With
    ``queries_are_tokens`` (the persistent memory: every token of the batch queries the same
    slots) the query rows follow ``"batch"`` instead, and keys and values stay whole.
    """
    batch, heads = nn.logical_to_mesh_axes(("batch", "heads"))
    if queries_are_tokens:
        return RetrievalSharding(query_time=batch, heads=heads)
    return RetrievalSharding(batch=batch, heads=heads)


def sow_retrieval(module: nn.Module, queries_BxTxHxK: Array, keys_BxTxHxK: Array, *,
                  bandwidth=None, mask=None, query_offset: int = 0) -> None:
    """Record what a retrieval saw (``mutable=["intermediates"]``, name ``"retrieval"``): its
    queries, keys, bandwidth (``None``, ``[H]`` or ``[T, H]``), mask window and skip (-1: none)
    and query offset, so that an evaluation can recompute the weights of chosen rows
    (:mod:`mmjax.eval.attention_maps`). Without that collection mutable it costs nothing."""
    h = keys_BxTxHxK.shape[2]
    beta = jnp.ones((h,), jnp.float32) if bandwidth is None else bandwidth
    window = -1 if mask is None or mask.window is None else mask.window
    skip = 0 if mask is None else mask.skip
    module.sow("intermediates", "retrieval", {
        "queries": queries_BxTxHxK, "keys": keys_BxTxHxK,
        "bandwidth": jnp.asarray(beta, jnp.float32),
        "window": jnp.asarray(window, jnp.int32), "skip": jnp.asarray(skip, jnp.int32),
        "query_offset": jnp.asarray(query_offset, jnp.int32)})


def check_input_ids(input_ids: Array, max_length: int | None = None) -> None:
    """Raise a ``ValueError`` unless ``input_ids`` is an integer ``[batch, time]`` array."""
    if jnp.ndim(input_ids) != 2:
        raise ValueError(f"input_ids must be [batch, time], got shape {jnp.shape(input_ids)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    if max_length is not None and input_ids.shape[1] > max_length:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} positions but context_length is {max_length} "
            "(learned position embeddings)"
        )


def resolve_long_term_skip(module: nn.Module, explicit, deterministic: bool, skip_range,
                           inference_skip: int):
    """:func:`mmjax.ops.select_long_term_skip` with the module's ``"skip"`` rng, drawn only when
    training without an explicit skip."""
    draws = explicit is None and not deterministic
    return select_long_term_skip(explicit, deterministic=deterministic,
                          rng=module.make_rng("skip") if draws else None,
                          skip_range=tuple(skip_range), inference_skip=inference_skip)
