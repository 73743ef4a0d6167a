"""Generation with memory caches: prefill, one-token steps, sampling and beam search.

:class:`Decoder` holds a model's parameters and its jitted cached calls
(:mod:`mmjax.layers.cache`):

* ``prefill``: the prompts in one pass per chunk of ``prefill_chunk`` tokens (every row at the
  same position: the blocked or Pallas retrieval with ``query_offset``);
* ``step``: one new token per row, each row at its own position (O(1) feature work and
  O(cache_length) retrieval per token).

Both are compiled once per shape: the caches are preallocated for ``cache_length`` tokens,
positions are traced, and the cache argument is donated, so it is updated in place and memory
does not grow with the steps.

Batches of prompts of different lengths are **right-padded**: every prompt starts at position
0, the padding after a prompt never reaches a cache or a state (:class:`DecodeStep` carries
each row's length), and each row then decodes from its own position. A prompt gives the same
tokens alone or in a batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.generate.sampling import Sampling, sample
from mmjax.layers.cache import DecodeStep, grow_pages, paged_capacity

Array = jax.Array


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _apply_cached(model, cache_length, params, cache, tokens_BxT, position, lengths_B):
    """One cached call; returns the final hidden states' logits at each row's last real token
    of the call ``[B, N]``, whether the row had one ``[B]``, and the new cache."""
    step = DecodeStep(position=position, lengths=lengths_B, cache_length=cache_length)
    (x_BxTxD, head_DxN, scale), variables = model.apply(
        {"params": params, "cache": cache}, tokens_BxT, step=step, return_head=True,
        mutable=["cache"])
    b, t = tokens_BxT.shape
    last_B = step.last_index(b, t)
    x_BxD = jnp.take_along_axis(x_BxTxD, jnp.maximum(last_B, 0)[:, None, None], axis=1)[:, 0]
    logits_BxN = jnp.einsum("bd,dn->bn", x_BxD, head_DxN, preferred_element_type=jnp.float32)
    if scale != 1.0:
        logits_BxN = logits_BxN * scale
    return logits_BxN, last_B >= 0, variables["cache"]


class Decoder:
    """A model ready to generate: its parameters, caches and jitted cached calls.

    Args:
      model: an mmjax language model (any registered model; remat is turned off).
      params: its parameters.
      batch_size: rows decoded together (beam search: prompts x beam width).
      cache_length: tokens a row can hold, prompt and continuation together.
      prefill_chunk: the longest prefill call; longer prompts are prefilled in chunks.
    """

    def __init__(self, model, params, *, batch_size: int, cache_length: int,
                 prefill_chunk: int = 256):
        for name, value in (("batch_size", batch_size), ("cache_length", cache_length),
                            ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if getattr(model, "remat", "none") != "none":
            model = model.clone(config=dataclasses.replace(model.config, remat="none"))
        limit = getattr(model, "context_length", None) if model_has_position_table(model) \
            else None
        if limit is not None and cache_length > limit:
            raise ValueError(
                f"cache_length={cache_length} exceeds the {limit} learned positions of model "
                f"{type(model).__name__} (context_length)")
        self.model, self.params = model, params
        self.batch_size, self.cache_length = batch_size, cache_length
        self.prefill_chunk = prefill_chunk
        self.vocab_size = int(model.vocab_size)
        call = functools.partial(_apply_cached, model, cache_length)
        self._call = jax.jit(call, donate_argnums=(1,))
        self._reorder = jax.jit(
            lambda cache, rows: jax.tree.map(lambda x: _take_rows(x, rows), cache),
            donate_argnums=(0,))

    def init_cache(self):
        """Zeroed caches for ``batch_size`` rows of ``cache_length`` tokens. Paged buffers (a
        paged long-term memory) start with the pages of one prefill chunk and grow as the
        rows advance (:func:`mmjax.layers.cache.grow_pages`)."""
        tokens = jnp.zeros((self.batch_size, 1), jnp.int32)
        shapes = jax.eval_shape(
            functools.partial(_cache_shapes, self.model, self.cache_length), self.params, tokens)
        if paged_capacity(shapes) is not None:
            first = min(self.cache_length, self.prefill_chunk)
            shapes = jax.eval_shape(functools.partial(_cache_shapes, self.model, first),
                                    self.params, tokens)
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def _room(self, cache, tokens: int):
        """``cache`` with paged buffers for ``tokens`` tokens per row, doubling as needed."""
        capacity = paged_capacity(cache)
        if capacity is None or tokens <= capacity:
            return cache
        return grow_pages(cache, min(max(tokens, 2 * capacity), max(tokens, self.cache_length)))

    def prefill(self, cache, tokens_BxP: np.ndarray, lengths_B: np.ndarray, start: int = 0):
        """Run right-padded prompts ``[B, P]`` of ``lengths_B`` real tokens through the cache.

        ``start``: the position of the first token (the cache holds the ``start`` tokens
        before it: a prompt continued, or fed in parts); ``lengths_B``: each row's length
        from position 0 after this call.
        Returns ``(logits [B, N] at each prompt's last token, cache)``.
        """
        tokens_BxP = np.asarray(tokens_BxP, np.int32)
        lengths_B = np.asarray(lengths_B, np.int32)
        p = tokens_BxP.shape[1]
        chunk = min(self.prefill_chunk, _next_power_of_two(p))
        padded = np.zeros((tokens_BxP.shape[0], -(-p // chunk) * chunk), np.int32)
        padded[:, :p] = tokens_BxP
        logits_BxN = None
        cache = self._room(cache, start + padded.shape[1])  # once: growing recompiles
        for offset in range(0, padded.shape[1], chunk):
            out_BxN, has_B, cache = self._call(self.params, cache,
                                               padded[:, offset:offset + chunk],
                                               np.int32(start + offset), lengths_B)
            logits_BxN = out_BxN if logits_BxN is None else jnp.where(has_B[:, None], out_BxN,
                                                                      logits_BxN)
        return logits_BxN, cache

    def step(self, cache, tokens_B, positions_B):
        """One token per row at ``positions_B``; returns ``(logits [B, N], cache)``.

        Tokens and positions are host arrays (numpy work here costs microseconds; each jnp
        operation outside the jitted call about a tenth of a millisecond on CPU)."""
        positions_B = np.asarray(positions_B, np.int32)
        if paged_capacity(cache) is not None:
            cache = self._room(cache, int(positions_B.max()) + 1)
        logits_BxN, _, cache = self._call(self.params, cache,
                                          np.asarray(tokens_B, np.int32)[:, None],
                                          positions_B, positions_B + 1)
        return logits_BxN, cache

    def reorder(self, cache, rows_B):
        """The cache of rows ``rows_B`` (beam search), in place."""
        return self._reorder(cache, jnp.asarray(rows_B, jnp.int32))

    def check_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      rows_per_prompt: int = 1) -> None:
        """Raise a one-line ``ValueError`` for prompts this decoder cannot continue."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        if len(prompts) * rows_per_prompt > self.batch_size:
            raise ValueError(f"{len(prompts)} prompts x {rows_per_prompt} rows exceed the "
                             f"decoder's batch_size={self.batch_size}")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
            ids = np.asarray(prompt)
            if not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"prompt {i} holds non-integer token ids ({ids.dtype})")
            bad = ids[(ids < 0) | (ids >= self.vocab_size)]
            if bad.size:
                raise ValueError(f"prompt {i} has token id {int(bad[0])} outside the model "
                                 f"vocabulary [0, {self.vocab_size})")
            if len(prompt) + max_new_tokens > self.cache_length:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens="
                    f"{max_new_tokens} it needs {len(prompt) + max_new_tokens} cache slots but "
                    f"the cache holds {self.cache_length} (raise cache_length)")


def _take_rows(x, rows_B):
    """Rows ``rows_B`` of a cache array whose axis 0 is the batch, or the batch folded with
    the heads (``[B * H, ...]``, the key/value buffers of :mod:`mmjax.layers.cache`)."""
    b = rows_B.shape[0]
    if x.shape[0] == b:
        return x[rows_B]
    return x.reshape((b, x.shape[0] // b) + x.shape[1:])[rows_B].reshape(x.shape)


def model_has_position_table(model) -> bool:
    """Whether the model has learned absolute positions (GPT2): it takes no more tokens than
    its ``context_length`` (a cache, an evaluation context)."""
    return type(model).__name__ == "GPT2"


def _cache_shapes(model, cache_length, params, tokens_Bx1):
    b = tokens_Bx1.shape[0]
    step = DecodeStep(position=jnp.int32(0), lengths=jnp.zeros((b,), jnp.int32),
                      cache_length=cache_length)
    _, variables = model.apply({"params": params}, tokens_Bx1, step=step, mutable=["cache"])
    return variables["cache"]


def _pad_batch(prompts, batch_size):
    """Right-padded ``[batch_size, P]`` tokens and lengths; spare rows hold one token 0."""
    p = max(len(x) for x in prompts)
    tokens = np.zeros((batch_size, p), np.int32)
    lengths = np.ones((batch_size,), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = prompt
        lengths[i] = len(prompt)
    return tokens, lengths


@functools.partial(jax.jit, static_argnums=(2,))
def _draw(row_keys_B, logits_BxN, sampling: Sampling, step):
    keys_B = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys_B)
    return sample(keys_B, logits_BxN, sampling)


def generate(decoder: Decoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0, eos_id: int | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
      decoder: a :class:`Decoder` with ``batch_size >= len(prompts)``.
      prompts: lists of token ids (different lengths allowed).
      sampling: greedy (``temperature=0``), temperature, top-k, top-p.
      seed: the draws of prompt ``i`` come from ``fold_in(key(seed), i)``.
      eos_id: a row stops after producing it (it is included in the output).
      on_token: called as ``on_token(prompt_index, token)`` as each token comes (streaming).
    Returns:
      the new tokens of each prompt.
    """
    decoder.check_prompts(prompts, max_new_tokens)
    tokens_BxP, lengths_B = _pad_batch(prompts, decoder.batch_size)
    cache = decoder.init_cache()
    logits_BxN, cache = decoder.prefill(cache, tokens_BxP, lengths_B)
    row_keys_B = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
        jnp.arange(decoder.batch_size))
    positions_B = lengths_B.copy()
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for i in range(max_new_tokens):
        next_B = np.asarray(_draw(row_keys_B, logits_BxN, sampling, i))
        for row in range(len(prompts)):
            if done[row]:
                continue
            token = int(next_B[row])
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
            done[row] = eos_id is not None and token == eos_id
        if done.all() or i == max_new_tokens - 1:
            break
        logits_BxN, cache = decoder.step(cache, next_B, positions_B)
        positions_B = positions_B + 1
    return outputs


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """A finished beam: its new tokens and its score (sum of log-probabilities divided by
    ``len(tokens) ** length_penalty``)."""

    tokens: tuple
    score: float


def beam_search(decoder: Decoder, prompts: Sequence[Sequence[int]], *, beam_width: int,
                max_new_tokens: int, length_penalty: float = 1.0,
                eos_id: int | None = None) -> list[Hypothesis]:
    """The best continuation of each prompt by beam search.

    Each prompt keeps ``beam_width`` beams (the decoder needs ``batch_size >= prompts x
    beam_width``). At each step every beam is extended by every token; the ``beam_width``
    best running beams by total log-probability survive, and a candidate ending in
    ``eos_id`` becomes a finished hypothesis scored by ``logprob / len ** length_penalty``.
    A prompt is done when it holds ``beam_width`` finished hypotheses; after
    ``max_new_tokens`` the running beams are scored the same way. ``beam_width=1`` is greedy
    decoding.

    Returns:
      the best :class:`Hypothesis` of each prompt.
    """
    if not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be an integer >= 1, got {beam_width!r}")
    decoder.check_prompts(prompts, max_new_tokens, rows_per_prompt=beam_width)
    w, n = beam_width, len(prompts)
    rows = [prompt for prompt in prompts for _ in range(w)]
    tokens_BxP, lengths_B = _pad_batch(rows, decoder.batch_size)
    cache = decoder.init_cache()
    logits_BxN, cache = decoder.prefill(cache, tokens_BxP, lengths_B)
    positions_B = lengths_B.copy()
    # Running beams: total log-probability and tokens; only beam 0 is live at first.
    scores = np.full((n, w), -np.inf)
    scores[:, 0] = 0.0
    beams: list[list[tuple]] = [[()] * w for _ in range(n)]
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]
    done = np.zeros(n, bool)
    normalise = lambda logp, length: logp / (max(length, 1) ** length_penalty)
    for i in range(max_new_tokens):
        logp_BxN = np.asarray(jax.nn.log_softmax(logits_BxN[:n * w], axis=-1))
        next_tokens = np.zeros(decoder.batch_size, np.int32)
        source_rows = np.arange(decoder.batch_size)
        for p in range(n):
            if done[p]:
                continue
            total = scores[p][:, None] + logp_BxN[p * w:(p + 1) * w]  # [w, N]
            flat = total.reshape(-1)
            best = np.argsort(-flat, kind="stable")[:2 * w]
            new_scores, new_beams, origins, new_tokens = [], [], [], []
            for index in best:
                beam, token = divmod(int(index), total.shape[1])
                if not np.isfinite(flat[index]):
                    break
                sequence = beams[p][beam] + (token,)
                if eos_id is not None and token == eos_id:
                    finished[p].append(Hypothesis(sequence, normalise(flat[index],
                                                                      len(sequence))))
                else:
                    new_scores.append(flat[index])
                    new_beams.append(sequence)
                    origins.append(beam)
                    new_tokens.append(token)
                if len(new_beams) == w:
                    break
            if len(finished[p]) >= w or not new_beams:
                done[p] = True
                continue
            while len(new_beams) < w:  # fewer candidates than beams: dead beams
                new_scores.append(-np.inf)
                new_beams.append(new_beams[0])
                origins.append(origins[0])
                new_tokens.append(new_tokens[0])
            scores[p] = new_scores
            beams[p] = new_beams
            source_rows[p * w:(p + 1) * w] = [p * w + o for o in origins]
            next_tokens[p * w:(p + 1) * w] = new_tokens
        if done.all() or i == max_new_tokens - 1:
            break
        cache = decoder.reorder(cache, source_rows)
        logits_BxN, cache = decoder.step(cache, next_tokens, positions_B)
        positions_B = positions_B + 1
    results = []
    for p in range(n):
        candidates = list(finished[p])
        if not done[p]:
            candidates += [Hypothesis(beams[p][b], normalise(scores[p][b], len(beams[p][b])))
                           for b in range(w) if np.isfinite(scores[p][b])]
        results.append(max(candidates, key=lambda h: h.score))
    return results
