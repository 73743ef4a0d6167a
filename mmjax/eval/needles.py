"""Long-context retrieval: facts scattered through filler, queried at the end (in the style of
RULER), and multi-document question answering on the user's own JSONL.

Synthetic tasks (:func:`needle_tasks`, made by :mod:`mmjax.data.recall`, whose ``recall``
corpus trains models on the same format) need no tokenizer. A fact is ``KEY k_1..k_a VAL
v_1..v_b``, a query ``QUERY k_1..k_a VAL``, and the model must continue with ``v_1..v_b``;
the markers are the three highest ids of the vocabulary, the rest of the tokens are drawn
from the other ids. With ``facts > 1`` the other facts are distractors with different keys
(the multi-key, multi-document flavour). The answer is read greedily with the caches of
:mod:`mmjax.generate`; a task counts when the continuation starts with the value (exact
match). A model that copies (:func:`copy_oracle`) scores 1.

Question answering (:func:`qa_tasks`): a JSONL file of ``{"context", "question", "answers"}``
objects (the v2 paper's multi-document QA needs real documents; bring yours). The prompt is
the context and the question, each on its own line; an answer counts when the normalised
continuation starts with one of the normalised answers.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np

from mmjax.data.recall import markers, needle
from mmjax.eval.positions import check_context, read_jsonl
from mmjax.generate.decoder import Decoder, generate
from mmjax.generate.sampling import Sampling
from mmjax.generate.workdir import load_workdir


@dataclasses.dataclass(frozen=True)
class Task:
    """A prompt (token ids) and the tokens that must follow it."""

    prompt: tuple
    answer: tuple


def needle_tasks(seed: int, *, vocab_size: int, context: int, facts: int = 1,
                 num_tasks: int = 20, key_length: int = 2, value_length: int = 2) -> list[Task]:
    """``num_tasks`` prompts of exactly ``context`` tokens holding ``facts`` facts
    (:func:`mmjax.data.recall.needle`)."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    rng = np.random.default_rng(seed)
    tasks = []
    for _ in range(num_tasks):
        prompt, answer = needle(rng, vocab_size=vocab_size, context=context, facts=facts,
                                key_length=key_length, value_length=value_length)
        tasks.append(Task(tuple(prompt), answer))
    return tasks


def fact_position(prompt, vocab_size: int) -> int | None:
    """The position of the ``VAL`` marker of the fact the prompt's query asks for (its first
    value token follows), or ``None`` when no fact has the queried key."""
    key_mark, val_mark, query_mark = markers(vocab_size)
    prompt = list(prompt)
    q = len(prompt) - 1 - prompt[::-1].index(query_mark)
    key = prompt[q + 1:len(prompt) - 1]
    pattern = [key_mark, *key, val_mark]
    for i in range(q - len(pattern) + 1):
        if prompt[i:i + len(pattern)] == pattern:
            return i + len(pattern) - 1
    return None


def copy_oracle(prompt, vocab_size: int, value_length: int) -> list[int]:
    """What a perfect copy model answers: the value stored under the queried key."""
    at = fact_position(prompt, vocab_size)
    return [] if at is None else list(prompt)[at + 1:at + 1 + value_length]


def exact_match(continuations, tasks) -> float:
    """The fraction of tasks whose continuation starts with the answer."""
    return float(np.mean(answered(continuations, tasks)))


def answered(continuations, tasks) -> list[bool]:
    """Whether each task's continuation starts with its answer."""
    return [list(c[:len(t.answer)]) == list(t.answer)
            for c, t in zip(continuations, tasks, strict=True)]


def continue_greedily(model, params, prompts, max_new_tokens: int,
                      batch_size: int = 4) -> list[list[int]]:
    """Greedy continuations of ``prompts`` with the model's caches, ``batch_size`` at a time."""
    longest = max(len(p) for p in prompts)
    decoder = Decoder(model, params, batch_size=batch_size,
                      cache_length=longest + max_new_tokens)
    out = []
    for i in range(0, len(prompts), batch_size):
        out += generate(decoder, [list(p) for p in prompts[i:i + batch_size]],
                        max_new_tokens=max_new_tokens, sampling=Sampling(temperature=0))
    return out


def needle_accuracy(workdir, *, contexts, facts=(1,), num_tasks: int = 20, seed: int = 0,
                    value_length: int = 2, memory: dict | None = None) -> list[dict]:
    """Exact-match accuracy of a checkpoint on the synthetic tasks at each context length,
    and which tasks were answered (``answered``, in task order: which needles a setting
    loses).

    ``memory``: model settings that change how the long-term memory is read, not what was
    learned (``long_term_memory``, ``long_term_page``, ``long_term_top_pages`` of a v2
    Memory Mosaic: :func:`mmjax.ops.retrieve_paged`).
    """
    trained = load_workdir(workdir, model_overrides=memory)
    vocab = trained.model.vocab_size
    described = describe_memory(trained.model)
    for context in contexts:
        check_context(trained, context + value_length, str(workdir))
    rows = []
    for n in facts:
        for context in contexts:
            tasks = needle_tasks(seed, vocab_size=vocab, context=context, facts=n,
                                 num_tasks=num_tasks, value_length=value_length)
            got = continue_greedily(trained.model, trained.params, [t.prompt for t in tasks],
                                   value_length)
            hits = answered(got, tasks)
            rows.append({"task": "needle" if n == 1 else f"{n} facts", "facts": n,
                         "context": context, "memory": described,
                         "accuracy": float(np.mean(hits)), "answered": hits})
    return rows


def describe_memory(model) -> str:
    """``"exact"``, or ``"paged U x W"`` for a paged long-term memory (``U`` pairs a page,
    ``W`` pages kept)."""
    if getattr(model, "long_term_memory", "exact") != "paged":
        return "exact"
    return f"paged {model.long_term_page} x {model.long_term_top_pages}"


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", text.lower())).strip()


def qa_match(continuation: str, answers) -> bool:
    """Whether the continuation starts with one of the answers (case, punctuation and spaces
    normalised)."""
    text = _normalise(continuation)
    return any(text.startswith(_normalise(a)) for a in answers)


def qa_tasks(path: str | pathlib.Path) -> list[dict]:
    """Read ``{"context", "question", "answers"}`` lines; one-line errors name the line."""
    tasks = []
    for number, item in read_jsonl(path, ("context", "question", "answers"), "--qa"):
        answers = item["answers"]
        if isinstance(answers, str):
            answers = [answers]
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(f"--qa {path}:{number}: answers must be non-empty strings")
        tasks.append({"context": str(item["context"]), "question": str(item["question"]),
                      "answers": list(answers)})
    if not tasks:
        raise ValueError(f"--qa {path}: no question in the file")
    return tasks


def qa_accuracy(workdir, qa_file, *, max_new_tokens: int = 16) -> dict:
    """Exact-match accuracy (normalised prefix) on a JSONL of questions."""
    trained = load_workdir(workdir)
    if trained.tokenizer is None:
        raise FileNotFoundError(f"--workdir {workdir} has no tokenizer: question answering "
                                "needs text")
    tasks = qa_tasks(qa_file)
    tok = trained.tokenizer
    prompts = [[tok.eos_id] + ids for ids in
               tok.encode([f"{t['context']}\n{t['question']}\n" for t in tasks])]
    for prompt in prompts:
        check_context(trained, len(prompt) + max_new_tokens, str(workdir))
    got = continue_greedily(trained.model, trained.params, prompts, max_new_tokens)
    hits = [qa_match(tok.decode([ids])[0], t["answers"])
            for ids, t in zip(got, tasks, strict=True)]
    return {"task": "qa", "questions": len(tasks), "accuracy": float(np.mean(hits))}


def page_diagnosis(workdir, *, context: int, facts: int = 16, num_tasks: int = 4,
                   seed: int = 0, memory: dict | None = None) -> list[dict]:
    """Where a paged long-term memory loses a needle: for each task, layer and head, at the
    query's last token (whose continuation is the value), the exact retrieval weight of
    the fact's pair (key at the fact's ``VAL``, value its first value token) among every
    pair the query may see, the rank of its page by the bound that chooses pages (0: the
    best; -1: the query's newest page, always kept), whether it is kept, and the exact
    weight the kept pages hold. The tasks are those of :func:`needle_accuracy`.

    A needle with a large exact weight on a page not kept is lost to the page choice; one
    with a small exact weight is lost to the retrieval itself (its bandwidth against the
    filler), paged or not."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    from mmjax.layers.cache import DecodeStep, grow_pages, page_rows, paged_capacity
    from mmjax.ops.paged import page_scores, select_pages

    trained = load_workdir(workdir, model_overrides=memory)
    model, params = trained.model, trained.params
    if getattr(model, "long_term_memory", "exact") != "paged":
        raise ValueError("page_diagnosis needs a paged long-term memory (memory="
                         "{'long_term_memory': 'paged'})")
    check_context(trained, context, str(workdir))
    vocab = model.vocab_size
    tasks = needle_tasks(seed, vocab_size=vocab, context=context, facts=facts,
                         num_tasks=num_tasks)
    needle_B = np.array([fact_position(t.prompt, vocab) for t in tasks])
    prompts = np.array([t.prompt for t in tasks], np.int32)
    b = len(tasks)
    decoder = Decoder(model, params, batch_size=b, cache_length=context + 1)
    _, cache = decoder.prefill(decoder.init_cache(), prompts[:, :-1],
                               np.full(b, context - 1, np.int32))
    if paged_capacity(cache) < context:
        cache = grow_pages(cache, context)

    @jax.jit
    def last_token(params, cache, tokens_Bx1):
        step = DecodeStep(position=jnp.int32(context - 1),
                          lengths=jnp.full((b,), context, jnp.int32), cache_length=context + 1)
        _, variables = model.apply({"params": params, "cache": cache}, tokens_Bx1, step=step,
                                   mutable=["cache", "intermediates"])
        return variables

    variables = last_token(params, cache, prompts[:, -1:])
    page, top = model.long_term_page, model.long_term_top_pages
    rows = []
    for label, info, leaves in _layers(flatten_dict(variables["intermediates"]),
                                       flatten_dict(variables["cache"])):
        q_BxHxK = jnp.asarray(info["queries"][:, 0], jnp.float32)
        h, dk = q_BxHxK.shape[1:]
        beta_BxH = jnp.broadcast_to(info["bandwidth"], (b, 1, h))[:, 0]
        pos_B, count_B = info["positions"][:, 0], info["key_count"]
        first_N = jnp.repeat(jnp.maximum(pos_B - info["window"], 0), h)
        last_N = jnp.repeat(jnp.minimum(pos_B - 1 - info["skip"], count_B - 1), h)
        stored = leaves["key_pages"]
        n, num_pages = stored.shape[:2]
        assert stored.shape[2:] == page_rows(page, dk)
        if stored.dtype == jnp.uint16:  # bfloat16 bits (mmjax.layers.cache)
            stored = jax.lax.bitcast_convert_type(stored, jnp.bfloat16)
        keys_NxPxK = stored.astype(jnp.float32).reshape(n, num_pages, page, dk)
        if "key_scale" in leaves:  # int8 pages
            keys_NxPxK = keys_NxPxK * leaves["key_scale"][..., None, None]
        keys_NxPxK = keys_NxPxK.reshape(n, -1, dk)
        q_NxK = q_BxHxK.reshape(n, dk)
        pair_P = jnp.arange(keys_NxPxK.shape[1])
        seen_NxP = (pair_P >= first_N[:, None]) & (pair_P <= last_N[:, None])
        scores_NxP = jnp.einsum("npk,nk->np", keys_NxPxK, q_NxK) * beta_BxH.reshape(n, 1)
        weights_NxP = jax.nn.softmax(jnp.where(seen_NxP, scores_NxP, -jnp.inf), axis=-1)
        kept_page_NxW, kept_NxW = (x[:, 0] for x in select_pages(
            q_NxK[:, None], leaves["page_bounds"], first_N[:, None], last_N[:, None],
            page_size=page, top=min(top, num_pages)))
        on_kept_NxP = jnp.zeros((n, num_pages), bool).at[
            jnp.arange(n)[:, None], kept_page_NxW].max(kept_NxW)
        kept_mass_N = jnp.sum(jnp.where(jnp.repeat(on_kept_NxP, page, axis=1), weights_NxP, 0),
                              axis=-1)
        bound_NxA = page_scores(q_NxK[:, None], leaves["page_bounds"])[:, 0]
        start_A = jnp.arange(num_pages) * page
        newest_N = last_N // page
        compete_NxA = ((start_A <= last_N[:, None]) & (start_A + page - 1 >= first_N[:, None])
                       & (jnp.arange(num_pages) != newest_N[:, None]))
        needle_N = jnp.repeat(jnp.asarray(needle_B), h)
        needle_page_N = needle_N // page
        needle_bound_N = jnp.take_along_axis(bound_NxA, needle_page_N[:, None], 1)[:, 0]
        rank_N = jnp.sum(compete_NxA & (bound_NxA > needle_bound_N[:, None]), axis=-1)
        rank_N = jnp.where(needle_page_N == newest_N, -1, rank_N)
        kept_needle_N = jnp.take_along_axis(on_kept_NxP, needle_page_N[:, None], 1)[:, 0]
        weight_N = jnp.take_along_axis(weights_NxP, needle_N[:, None], 1)[:, 0]
        for i in range(n):
            rows.append({"task": i // h, "memory": label, "head": i % h,
                         "needle_weight": float(weight_N[i]),
                         "max_weight": float(weights_NxP[i].max()),
                         "needle_page_rank": int(rank_N[i]), "kept": bool(kept_needle_N[i]),
                         "kept_weight": float(kept_mass_N[i]),
                         "competing_pages": int(compete_NxA[i].sum())})
    return rows


def _layers(sown: dict, caches: dict):
    """``(label, what the query sown, its memory's cache leaves)`` per paged memory and
    layer; a scanned model's layers are on axis 0 of what it sowed and axis 1 of its caches
    (:func:`mmjax.layers.common.run_blocks`)."""
    for path, (info,) in sown.items():
        leaves = {name: caches[path[:-1] + (name,)] for name in
                  ("key_pages", "page_bounds", "key_scale") if path[:-1] + (name,) in caches}
        label = "/".join(path[:-1])
        if info["queries"].ndim == 4:  # [B, T, H, K]
            yield label, info, leaves
            continue
        for layer in range(info["queries"].shape[0]):
            yield (f"{label}[{layer}]", {k: v[layer] for k, v in info.items()},
                   {k: v[:, layer] for k, v in leaves.items()})
