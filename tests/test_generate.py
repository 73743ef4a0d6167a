"""Generation: cached calls equal the full forward pass; sampling, beam search, batches."""

import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.generate import Decoder, Sampling, beam_search, filter_logits, generate, sample
from mmjax.kernels import compile_check
from mmjax.layers.cache import DecodeStep
from mmjax.models import build_model

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, num_layers=2, num_heads=2, embed_dim=16)
MODELS = {
    "v1": dict(name="memory_mosaic", pmem_size=8, **SMALL),
    "v1_scanned": dict(name="memory_mosaic", pmem_size=8, scan_layers=True, **SMALL),
    # window 5 and skip 3: the test lengths cross the ring buffer and the long-term edge
    "v2": dict(name="memory_mosaic_v2", mlp_dim=32, short_term_window=5,
               long_term_skip_range=(2, 4), inference_long_term_skip=3, **SMALL),
    # pages of 3, 2 kept: the lengths cross the page edges and the selection drops pages
    "v2_paged": dict(name="memory_mosaic_v2", mlp_dim=32, short_term_window=5,
                     long_term_skip_range=(2, 4), inference_long_term_skip=3,
                     long_term_memory="paged", long_term_page=3, long_term_top_pages=2,
                     **SMALL),
    "v2_short_only": dict(name="memory_mosaic_v2", mlp_dim=32, short_term_window=4,
                          long_term=False, **SMALL),
    "gpt2": dict(name="gpt2", context_length=32, **SMALL),
    "llama": dict(name="llama", mlp_dim=32, **SMALL),
    "llama_short_long": dict(name="llama_short_long", mlp_dim=32, short_term_window=5,
                             long_term_skip_range=(2, 4), inference_long_term_skip=3, **SMALL),
}


def _model(name):
    model = build_model(MODELS[name])
    params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


@functools.cache
def _jitted(model):
    """``(params, tokens, cache=None, step=None) -> (logits, cache)``, jitted."""

    def call(params, tokens, cache, step):
        if step is None:
            return model.apply({"params": params}, tokens), None
        logits, v = model.apply({"params": params, "cache": cache}, tokens, step=step,
                                mutable=["cache"])
        return logits, v["cache"]

    return jax.jit(call)


def _empty_cache(model, params, batch, cache_length):
    step = DecodeStep(jnp.int32(0), jnp.zeros((batch,), jnp.int32), cache_length)
    shapes = jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((batch, 1), jnp.int32),
                                                  step=step, mutable=["cache"])[1]["cache"],
                            params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _cached_logits(model, params, tokens, chunks, cache_length):
    """Logits of every position from aligned prefill calls of sizes ``chunks``, then one
    token per call with per-row positions."""
    b, t = tokens.shape
    cache = _empty_cache(model, params, b, cache_length)
    outs, pos = [], 0
    call = _jitted(model)
    for c in chunks:
        step = DecodeStep(jnp.int32(pos), jnp.full((b,), pos + c, jnp.int32), cache_length)
        logits, cache = call(params, tokens[:, pos:pos + c], cache, step)
        pos += c
        outs.append(logits)
    while pos < t:
        step = DecodeStep(jnp.full((b,), pos, jnp.int32), jnp.full((b,), pos + 1, jnp.int32),
                          cache_length)
        logits, cache = call(params, tokens[:, pos:pos + 1], cache, step)
        pos += 1
        outs.append(logits)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("chunks", [(), (7, 4), (3, 9)])
def test_prefill_and_steps_equal_the_full_forward_at_every_position(name, chunks):
    model, params = _model(name)
    tokens = jax.random.randint(jax.random.key(0), (2, 23), 0, VOCAB)
    full = _jitted(model)(params, tokens, None, None)[0]
    got = _cached_logits(model, params, tokens, chunks, cache_length=26)
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["v1", "v2", "v2_paged", "gpt2", "llama_short_long"])
def test_padding_never_reaches_a_cache(name):
    """Right-padded rows of different lengths: each row's logits equal its own forward pass,
    through a prefill of the padded batch and per-row decoding steps."""
    model, params = _model(name)
    call = _jitted(model)
    lengths = [3, 11, 7]
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (3, 20), 0, VOCAB))
    padded = tokens.copy()
    for row, n in enumerate(lengths):
        padded[row, n:] = 5  # padding: must not matter
    full = call(params, tokens, None, None)[0]  # causal: position t sees tokens <= t only
    cache = _empty_cache(model, params, 3, 24)
    lengths_B = jnp.asarray(lengths, jnp.int32)
    for start in (0, 6):  # two aligned prefill chunks of 6 (rows end in either)
        step = DecodeStep(jnp.int32(start), lengths_B, 24)
        _, cache = call(params, padded[:, start:start + 6], cache, step)
    positions = np.asarray(lengths)
    for _ in range(6):
        step = DecodeStep(jnp.asarray(positions, jnp.int32),
                          jnp.asarray(positions + 1, jnp.int32), 24)
        feed = tokens[np.arange(3), positions][:, None]
        logits, cache = call(params, feed, cache, step)
        np.testing.assert_allclose(logits[:, 0], full[np.arange(3), positions], atol=1e-5,
                                   rtol=0)
        positions = positions + 1


def test_ring_buffer_holds_only_the_window():
    model, params = _model("v2")
    cache = _empty_cache(model, params, 2, 40)
    ring = cache["block_0"]["mixer"]["short_term"]
    assert ring["keys"].shape == (2 * 2, 5 + 1, 8) and ring["positions"].shape == (2, 5)
    assert cache["block_0"]["mixer"]["long_term"]["keys"].shape == (2 * 2, 40 + 1, 8)


def test_paged_caches_start_with_one_chunk_grow_as_rows_advance_and_equal_recomputation():
    model, params = _model("v2_paged")
    decoder = Decoder(model, params, batch_size=3, cache_length=100_000, prefill_chunk=4)
    pages = decoder.init_cache()["block_0"]["mixer"]["long_term"]["key_pages"]
    assert pages.shape == (3 * 2, 2 + 1, 3, 8)  # 4 tokens: 2 pages of 3, and the sink
    greedy = Sampling(temperature=0)
    got = generate(decoder, PROMPTS, max_new_tokens=12, sampling=greedy)
    for prompt, continuation in zip(PROMPTS, got, strict=True):
        assert continuation == _recompute_greedy(model, params, prompt, 12)


@pytest.mark.parametrize("name", ["v1", "v2_paged"])
def test_a_prompt_prefilled_in_two_parts_equals_one_prefill(name):
    model, params = _model(name)
    decoder = Decoder(model, params, batch_size=2, cache_length=64, prefill_chunk=4)
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, 21), 0, VOCAB))
    lengths = np.array([21, 21])
    whole, _ = decoder.prefill(decoder.init_cache(), tokens, lengths)
    _, cache = decoder.prefill(decoder.init_cache(), tokens[:, :9], np.array([9, 9]))
    parts, _ = decoder.prefill(cache, tokens[:, 9:], lengths, start=9)
    np.testing.assert_allclose(parts, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,stored,shrink", [("bfloat16", jnp.uint16, 2),
                                                 ("int8", jnp.int8, 4)], ids=["bf16", "int8"])
def test_narrow_pages_shrink_the_cache_and_stay_close(dtype, stored, shrink):
    """bfloat16 pages (kept as their bits on CPU) halve fp32's, int8 pages with a scale per
    page quarter them; both move the logits a little."""
    model, params = _model("v2_paged")
    tokens = jax.random.randint(jax.random.key(5), (2, 13), 0, VOCAB)
    full = _jitted(model)(params, tokens, None, None)[0]  # = fp32 pages decoding (above)
    pages = lambda m: _empty_cache(m, params, 2, 26)["block_0"]["mixer"]["long_term"]
    narrow = build_model(dict(MODELS["v2_paged"], long_term_page_dtype=dtype))
    got = _cached_logits(narrow, params, tokens, (7, 4), cache_length=26)
    assert pages(narrow)["key_pages"].dtype == stored  # bfloat16 bits: see cache.py
    assert pages(narrow)["key_pages"].nbytes * shrink == pages(model)["key_pages"].nbytes
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, full, atol=0.05)
    assert float(jnp.max(jnp.abs(got - full))) > 0  # the pages were rounded
    if dtype == "int8":
        assert pages(narrow)["key_scale"].shape == pages(narrow)["key_pages"].shape[:2]


@pytest.mark.parametrize("one_at_a_time", [True, False])
def test_int8_page_writes_keep_a_scale_per_page_and_exact_bounds(one_at_a_time):
    """Pairs written one by one (a page's scale grows and its older pairs are rounded again)
    or as one block: each page's scale is its largest value / 127, every stored value is
    within half a scale of the pair written, and the bounds are those of the stored keys."""
    from mmjax.layers.cache import _update_bounds, _write_quantized

    b, h, t, d, page = 2, 2, 10, 3, 4
    growing = jnp.arange(1, t + 1, dtype=jnp.float32)[None, :, None, None]
    new = jax.random.normal(jax.random.key(6), (b, t, h, d)) * growing
    pages = jnp.zeros((b * h, 4, page, d), jnp.int8)
    scales = jnp.zeros((b * h, 4))
    bounds = jnp.zeros((b * h, 4, d + 1))
    last = jnp.full((b,), t - 1)
    calls = [(i, i + 1) for i in range(t)] if one_at_a_time else [(0, t)]
    for start, stop in calls:
        pos = jnp.broadcast_to(jnp.arange(start, stop), (b, stop - start))
        pages, scales = _write_quantized(pages, scales, new[:, start:stop], pos // page,
                                         pos % page)
        bounds = _update_bounds(pages, bounds, pos // page, jnp.full((b,), stop - 1), page,
                                jnp.int8, scales)
    truth = np.zeros((b * h, 4 * page, d), np.float32)
    truth[:, :t] = np.asarray(new).transpose(0, 2, 1, 3).reshape(b * h, t, d)
    truth = truth.reshape(b * h, 4, page, d)
    np.testing.assert_allclose(scales, np.abs(truth).max(axis=(2, 3)) / 127, rtol=1e-5)
    stored = np.asarray(pages, np.float32) * np.asarray(scales)[..., None, None]
    half = 0.5 * np.asarray(scales)[..., None, None] * (1 + 1e-4)
    assert np.all(np.abs(stored - truth) <= (2 if one_at_a_time else 1) * half)
    written = (np.arange(4 * page).reshape(4, page) <= np.asarray(last)[0])[None, :, :, None]
    mid, radius = np.split(np.asarray(bounds)[:, :3], [d], axis=-1)
    hi = np.where(written, stored, -np.inf).max(2)[:, :3]
    lo = np.where(written, stored, np.inf).min(2)[:, :3]
    np.testing.assert_allclose(mid, (hi + lo) / 2, rtol=1e-6)
    # the radius about the final midpoint, though the box grew as the pairs came
    distance = np.linalg.norm(stored[:, :3] - mid[:, :, None], axis=-1)
    np.testing.assert_allclose(radius[..., 0], np.where(written[:, :3, :, 0], distance,
                                                        -np.inf).max(2), rtol=1e-5)


@pytest.mark.parametrize("page_dtype", ["auto", "int8"])
def test_paged_buffers_grow_keeping_their_pages(page_dtype):
    from mmjax.layers.cache import PAGE_AXES, grow_pages, paged_capacity

    _, params = _model("v2_paged")
    model = build_model(dict(MODELS["v2_paged"], long_term_page_dtype=page_dtype))
    cache = _empty_cache(model, params, 2, 9)  # 3 pages and the sink
    tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, VOCAB)
    _, cache = _jitted(model)(params, tokens, cache,
                              DecodeStep(jnp.int32(0), jnp.full((2,), 9, jnp.int32), 9))
    assert paged_capacity(cache) == 9
    grown = grow_pages(cache, 20)
    assert paged_capacity(grown) == 21
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        new = dict(jax.tree_util.tree_leaves_with_path(grown))[path]
        if path[-1].key in PAGE_AXES:
            axis = 1
            np.testing.assert_array_equal(jax.lax.slice_in_dim(new, 0, 3, axis=axis),
                                          jax.lax.slice_in_dim(leaf, 0, 3, axis=axis))
            assert not jnp.any(jax.lax.slice_in_dim(new, 3, None, axis=axis))
        else:
            np.testing.assert_array_equal(new, leaf)
    assert grow_pages(cache, 9) is cache


def test_scanned_caches_keep_the_batch_first():
    """[batch, layers, ...], or [batch * heads, layers, ...] for the key/value buffers."""
    model, params = _model("v1_scanned")
    cache = _empty_cache(model, params, 3, 10)
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        folded = path[-1].key in ("keys", "values")
        assert leaf.shape[:2] == ((3 * 2 if folded else 3), 2), path


# ----------------------------------------------------------------------------- Decoder


@pytest.fixture(scope="module")
def v2():
    return _model("v2")


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [5], [7, 8, 9, 10, 11, 12]]


def _recompute_greedy(model, params, prompt, n):
    """Greedy decoding by a full forward pass per token (causal: a fixed-length buffer)."""
    seq = np.zeros((1, len(prompt) + n), np.int32)
    seq[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        seq[0, t] = int(jnp.argmax(_jitted(model)(params, seq, None, None)[0][0, t - 1]))
    return seq[0, len(prompt):].tolist()


def test_greedy_generation_equals_recomputation_and_batches_equal_single_prompts(v2):
    model, params = v2
    greedy = Sampling(temperature=0)
    batched = generate(Decoder(model, params, batch_size=4, cache_length=40, prefill_chunk=4),
                       PROMPTS, max_new_tokens=10, sampling=greedy)
    single = Decoder(model, params, batch_size=1, cache_length=40, prefill_chunk=8)
    for prompt, got in zip(PROMPTS, batched, strict=True):
        assert generate(single, [prompt], max_new_tokens=10, sampling=greedy) == [got]
        assert got == _recompute_greedy(model, params, prompt, 10)


def test_sampled_batches_equal_single_prompts_and_seeds_repeat(v2):
    model, params = v2
    decoder = Decoder(model, params, batch_size=3, cache_length=40)
    sampling = Sampling(temperature=1.2, top_k=10, top_p=0.9)
    a = generate(decoder, PROMPTS, max_new_tokens=8, sampling=sampling, seed=7)
    assert a == generate(decoder, PROMPTS, max_new_tokens=8, sampling=sampling, seed=7)
    assert a != generate(decoder, PROMPTS, max_new_tokens=8, sampling=sampling, seed=8)
    first = generate(Decoder(model, params, batch_size=1, cache_length=40), PROMPTS[:1],
                     max_new_tokens=8, sampling=sampling, seed=7)
    assert first == a[:1]


def test_generation_stops_at_the_end_of_text_id_and_streams(v2):
    model, params = v2
    decoder = Decoder(model, params, batch_size=3, cache_length=40)
    free = generate(decoder, PROMPTS, max_new_tokens=10, sampling=Sampling(temperature=0))
    eos = free[0][3]
    seen = []
    out = generate(decoder, PROMPTS, max_new_tokens=10, sampling=Sampling(temperature=0),
                   eos_id=eos, on_token=lambda row, token: seen.append((row, token)))
    assert out[0] == free[0][:free[0].index(eos) + 1]
    for row in range(3):
        assert [t for r, t in seen if r == row] == out[row]


def test_beam_width_1_is_greedy_and_width_2_scores_at_least_as_well(v2):
    model, params = v2
    decoder = Decoder(model, params, batch_size=6, cache_length=40)
    greedy = generate(decoder, PROMPTS, max_new_tokens=6, sampling=Sampling(temperature=0))
    beams1 = beam_search(decoder, PROMPTS, beam_width=1, max_new_tokens=6)
    assert [list(h.tokens) for h in beams1] == greedy
    beams2 = beam_search(decoder, PROMPTS, beam_width=2, max_new_tokens=6, length_penalty=0.0)

    def logprob(prompt, tokens):
        logits = _jitted(model)(params, jnp.array([list(prompt) + list(tokens)]), None, None)[0]
        logp = jax.nn.log_softmax(logits[0], axis=-1)
        return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))

    for prompt, h1, h2 in zip(PROMPTS, beams1, beams2, strict=True):
        np.testing.assert_allclose(h2.score, logprob(prompt, h2.tokens), rtol=1e-4)
        assert h2.score >= logprob(prompt, h1.tokens) - 1e-4


def test_beam_search_finishes_hypotheses_at_the_end_of_text_id(v2):
    model, params = v2
    decoder = Decoder(model, params, batch_size=2, cache_length=40)
    greedy = beam_search(decoder, PROMPTS[:1], beam_width=1, max_new_tokens=6)[0]
    eos = greedy.tokens[2]
    found = beam_search(decoder, PROMPTS[:1], beam_width=2, max_new_tokens=6, eos_id=eos)[0]
    assert eos not in found.tokens[:-1]


def test_the_step_donates_the_cache(v2):
    model, params = v2
    decoder = Decoder(model, params, batch_size=2, cache_length=16)
    cache = decoder.init_cache()
    _, cache = decoder.prefill(cache, np.array([[1, 2, 3], [4, 5, 0]]), np.array([3, 2]))
    sizes = [x.nbytes for x in jax.tree.leaves(cache)]
    old = jax.tree.leaves(cache)
    _, cache = decoder.step(cache, np.array([1, 2]), np.array([3, 2]))
    assert all(x.is_deleted() for x in old)
    assert [x.nbytes for x in jax.tree.leaves(cache)] == sizes


@pytest.mark.parametrize("prompts, max_new, message", [
    ([[]], 4, "prompt 0 is empty"),
    ([], 4, "no prompts"),
    ([[1, 2, VOCAB]], 4, f"token id {VOCAB} outside the model vocabulary [0, {VOCAB})"),
    ([[1, -1]], 4, "token id -1 outside"),
    ([list(range(10))], 4, "needs 14 cache slots but the cache holds 12"),
    ([[1]], 0, "max_new_tokens must be an integer >= 1"),
    ([[1]] * 3, 2, "3 prompts x 1 rows exceed the decoder's batch_size=2"),
])
def test_bad_prompts_are_one_line_errors(v2, prompts, max_new, message):
    model, params = v2
    decoder = Decoder(model, params, batch_size=2, cache_length=12)
    with pytest.raises(ValueError) as info:
        generate(decoder, prompts, max_new_tokens=max_new)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_gpt2_cache_cannot_outgrow_its_learned_positions():
    model, params = _model("gpt2")
    with pytest.raises(ValueError, match="exceeds the 32 learned positions"):
        Decoder(model, params, batch_size=1, cache_length=33)


# ----------------------------------------------------------------------------- sampling


def test_top_k_and_top_p_never_sample_outside_their_support():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 2.0
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    keys = jax.random.split(jax.random.key(1), 2000)
    draw = jax.jit(jax.vmap(lambda k: sample(jnp.stack([k] * 4), logits,
                                             Sampling(temperature=1.0, top_k=5))))
    drawn = np.asarray(draw(keys))
    top5 = np.argsort(-probs, axis=-1)[:, :5]
    for row in range(4):
        assert set(drawn[:, row]) <= set(top5[row])
        assert len(set(drawn[:, row])) > 1
    draw = jax.jit(jax.vmap(lambda k: sample(jnp.stack([k] * 4), logits,
                                             Sampling(temperature=1.0, top_p=0.5))))
    drawn = np.asarray(draw(keys))
    for row in range(4):
        order = np.argsort(-probs[row])
        before = np.cumsum(probs[row][order]) - probs[row][order]
        nucleus = set(order[before < 0.5])
        assert set(drawn[:, row]) <= nucleus
        assert set(drawn[:, row]) == nucleus  # every member shows up in 2000 draws


def test_filter_logits_keeps_exactly_k_and_at_least_one():
    logits = jnp.array([[1.0, 1.0, 1.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=2)))
    assert kept.sum(axis=1).tolist() == [2, 2]
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=1e-6)))
    assert kept.sum(axis=1).tolist() == [1, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-2), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
])
def test_bad_sampling_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        Sampling(**kwargs)


# ----------------------------------------------------------------------------- TPU


def _abstract_replicated(mesh, model):
    """``(place, i32, params)``: abstract arrays replicated over ``mesh`` (``place(tree)``,
    ``i32(shape)``) and the model's abstract parameters, for compiling without a TPU."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    place = lambda tree: jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), tree)
    i32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=replicated)
    params = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                                  jnp.zeros((1, 1), jnp.int32))["params"])
    return place, i32, params


@pytest.mark.skipif(not compile_check.libtpu_available() and not os.environ.get("CI"),
                    reason='libtpu not installed: pip install -e ".[tpu]"')
def test_prefill_and_steps_compile_for_a_tpu_chip_with_the_kernels():
    """The real TPU compiler (libtpu, no TPU): a prefill chunk retrieves with the Pallas
    kernel, a decoding step compiles and its scratch memory does not scale with the cache."""
    from mmjax import aot
    from mmjax.generate.decoder import _apply_cached, _cache_shapes

    mesh = aot.topology_mesh("v5e:2x2", (4, 1, 1))
    model = build_model(dict(name="memory_mosaic_v2", vocab_size=256, num_layers=1,
                             num_heads=2, embed_dim=256, mlp_dim=512, short_term_window=128))
    place, i32, params = _abstract_replicated(mesh, model)
    temps = {}
    for length in (512, 2048):
        cache = jax.eval_shape(functools.partial(_cache_shapes, model, length), params,
                               jnp.zeros((4, 1), jnp.int32))
        call = jax.jit(functools.partial(_apply_cached, model, length), donate_argnums=(1,))
        with jax.set_mesh(mesh):
            step = call.lower(place(params), place(cache), i32((4, 1)), i32((4,)),
                              i32((4,))).compile()
            if length == 512:
                prefill = call.lower(place(params), place(cache), i32((4, 256)), i32(()),
                                     i32((4,))).compile()
                assert "mmjax_retrieve_fwd_tpu" in prefill.as_text()
        temps[length] = step.memory_analysis().temp_size_in_bytes
    assert temps[2048] < 2 * temps[512] + (1 << 20), temps


@pytest.mark.skipif(not compile_check.libtpu_available() and not os.environ.get("CI"),
                    reason='libtpu not installed: pip install -e ".[tpu]"')
@pytest.mark.parametrize("page_dtype,item_bytes", [("bfloat16", 2), ("int8", 1)])
def test_a_paged_decoding_step_at_a_million_tokens_compiles_for_one_v5e_chip(page_dtype,
                                                                            item_bytes):
    """The real TPU compiler: a v2 of the reference width (2 layers, width 256, 4 heads of
    64) with a paged long-term memory in bfloat16 or int8 pages holds 1M tokens on one v5e chip
    (16 GiB), and the step's scratch memory does not grow with the cache (a page layout
    the chip must not relayout: mmjax.layers.cache.page_rows); its kept pages are read by
    the Pallas kernel of mmjax.kernels.paged_tpu."""
    from mmjax.generate.decoder import _apply_cached, _cache_shapes
    from mmjax.layers.cache import grow_pages

    one_chip = compile_check.topology_devices("v5e:2x2")[:1]
    mesh = jax.sharding.Mesh(np.array(one_chip).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    model = build_model(dict(name="memory_mosaic_v2", vocab_size=8192, num_layers=2,
                             num_heads=4, embed_dim=256, mlp_dim=1024, short_term_window=256,
                             inference_long_term_skip=64, long_term_memory="paged",
                             long_term_page=64, long_term_top_pages=16,
                             long_term_page_dtype=page_dtype))
    place, i32, params = _abstract_replicated(mesh, model)
    figures = {}
    for tokens in (1 << 18, 1 << 20):
        call = jax.jit(functools.partial(_apply_cached, model, tokens), donate_argnums=(1,))
        with jax.set_mesh(mesh):  # the caches a TPU holds: narrow pages
            cache = jax.eval_shape(lambda p, n=tokens: grow_pages(_cache_shapes(
                model, 256, p, jnp.zeros((1, 1), jnp.int32)), n), params)
            compiled = call.lower(place(params), place(cache), i32((1, 1)), i32((1,)),
                                  i32((1,))).compile()
        memory = compiled.memory_analysis()
        figures[tokens] = (memory.argument_size_in_bytes, memory.temp_size_in_bytes)
        # the kept pages are read in place by the Pallas kernel, one call per layer
        assert compiled.as_text().count("tpu_custom_call") >= 2
    with jax.set_mesh(mesh):  # a prefill chunk of 256 tokens at 1M
        prefill = call.lower(place(params), place(cache), i32((1, 256)), i32(()),
                             i32((1,))).compile().memory_analysis().temp_size_in_bytes
    assert prefill < 64 << 20, prefill
    arguments, temps = figures[1 << 20]
    pages = 2 * 2 * 4 * (1 << 20) * 64 * item_bytes  # layers x (keys, values) x heads x tokens x K
    assert pages <= arguments < pages * 1.1 + (64 << 20), figures
    assert arguments + temps < 16 << 30, figures
    assert temps < 16 << 20 and temps < 2 * figures[1 << 18][1] + (4 << 20), figures
    print(f"{page_dtype} pages, 1M tokens on one v5e: arguments {arguments / 2**30:.2f} GiB, "
          f"temporaries {temps / 2**20:.1f} MiB (256k: {figures[1 << 18][1] / 2**20:.1f} MiB); "
          f"a prefill chunk of 256 tokens: {prefill / 2**20:.1f} MiB of temporaries")
