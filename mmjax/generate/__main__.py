"""``python -m mmjax.generate --workdir DIR --prompt "..."``: continue text with a trained model.

Loads the latest checkpoint of a training workdir, its config and tokenizer
(:func:`mmjax.generate.workdir.load_workdir`), and prints the continuation of each prompt:
one prompt is streamed token by token; ``--prompts FILE`` (one prompt per line) runs as a
batch and prints each continuation after a ``[i]`` line. A model trained on token ids without
a tokenizer (the synthetic default) takes ``--prompt_ids "3 1 4"`` and prints ids.

Sampling: ``--temperature`` (0: greedy), ``--top_k``, ``--top_p``, ``--seed``; ``--beam W``
(W >= 2) runs beam search instead, with ``--length_penalty``. Generation stops at
``--max_new_tokens`` or at the end-of-text id (the tokenizer's eos; ``--eos_id``). Text prompts
start after an end-of-text token, as every training document does (``--no_eot_prefix``).

Exit status (:mod:`mmjax.cli`): 0, 1 with one line on stderr for bad input (empty prompt,
prompt longer than the cache, no checkpoint, no tokenizer for a text prompt, ids outside the
vocabulary), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from mmjax import cli
from mmjax.generate.decoder import Decoder, beam_search, generate
from mmjax.generate.sampling import Sampling
from mmjax.generate.workdir import load_workdir


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m mmjax.generate",
                           description="Continue prompts with a trained mmjax model.")
    p.add_argument("--workdir", required=True, help="a python -m mmjax.train --workdir")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a text prompt")
    source.add_argument("--prompts", help="a file of text prompts, one per line (a batch)")
    source.add_argument("--prompt_ids", help="token ids separated by spaces (no tokenizer)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beam", type=int, default=1, help="beam width (>= 2: beam search)")
    p.add_argument("--length_penalty", type=float, default=1.0,
                   help="beam scores are log p / length ** length_penalty")
    p.add_argument("--eos_id", type=int, default=None,
                   help="stop at this id (default: the tokenizer's end-of-text id)")
    p.add_argument("--no_eot_prefix", action="store_true",
                   help="do not start text prompts with the end-of-text token")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece model (default: DIR/tokenizer.model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--cache_length", type=int, default=None,
                   help="tokens per row in the cache (default: longest prompt + new tokens)")
    p.add_argument("--prefill_chunk", type=int, default=256)
    args = p.parse_args(argv)
    for name in ("max_new_tokens", "beam", "prefill_chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        args.sampling = Sampling(temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p)
    except ValueError as e:
        p.error(str(e))
    return args


def _prompts(args, trained) -> tuple[list[list[int]], bool]:
    """Token ids of the prompts, and whether they are text."""
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split()]
        except ValueError:
            raise ValueError(f"--prompt_ids must be integers separated by spaces, got "
                             f"{args.prompt_ids!r}") from None
        return [ids], False
    if trained.tokenizer is None:
        raise FileNotFoundError(
            f"--workdir {args.workdir} has no tokenizer ({args.workdir}/tokenizer.model): "
            "pass --tokenizer FILE, or --prompt_ids for a model trained on token ids")
    if args.prompt is not None:
        texts = [args.prompt]
    else:
        path = pathlib.Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {path}: no such file")
        texts = [line for line in path.read_text().splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"--prompts {path}: no prompt in the file")
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"prompt {i} is empty")
    prefix = [] if args.no_eot_prefix else [trained.tokenizer.eos_id]
    return [prefix + ids for ids in trained.tokenizer.encode(texts)], True


@cli.command
def main(argv=None) -> int:
    args = parse_args(argv)
    trained = load_workdir(args.workdir, step=args.step, tokenizer=args.tokenizer)
    prompts, is_text = _prompts(args, trained)
    eos = args.eos_id
    if eos is None and trained.tokenizer is not None and trained.tokenizer.eos_id >= 0:
        eos = trained.tokenizer.eos_id
    cache_length = args.cache_length or max(map(len, prompts)) + args.max_new_tokens
    decoder = Decoder(trained.model, trained.params, batch_size=len(prompts) * args.beam,
                      cache_length=cache_length, prefill_chunk=args.prefill_chunk)
    decoder.check_prompts(prompts, args.max_new_tokens, rows_per_prompt=args.beam)
    show = (lambda ids: trained.tokenizer.decode([ids])[0]) if is_text else \
        (lambda ids: " ".join(map(str, ids)))
    if args.beam > 1:
        found = beam_search(decoder, prompts, beam_width=args.beam,
                            max_new_tokens=args.max_new_tokens,
                            length_penalty=args.length_penalty, eos_id=eos)
        _print_all([list(h.tokens) for h in found], show)
    elif len(prompts) == 1:
        _stream(decoder, prompts, args, eos, show)
    else:
        _print_all(generate(decoder, prompts, max_new_tokens=args.max_new_tokens,
                            sampling=args.sampling, seed=args.seed, eos_id=eos), show)
    return 0


def _stream(decoder, prompts, args, eos, show) -> None:
    """Print the continuation of one prompt as its tokens come (text is printed once it
    decodes stably: a partial multi-byte character waits for its last byte)."""
    tokens: list[int] = []
    shown = ""

    def on_token(_, token):
        nonlocal shown
        tokens.append(token)
        text = show(tokens)
        if text.startswith(shown) and "\ufffd" not in text[len(shown):]:
            print(text[len(shown):], end="", flush=True)
            shown = text

    generate(decoder, prompts, max_new_tokens=args.max_new_tokens, sampling=args.sampling,
             seed=args.seed, eos_id=eos, on_token=on_token)
    text = show(tokens)
    print(text[len(shown):] if text.startswith(shown) else "\n" + text, flush=True)


def _print_all(outputs, show) -> None:
    for i, tokens in enumerate(outputs):
        if len(outputs) > 1:
            print(f"[{i}]")
        print(show(tokens), flush=True)


if __name__ == "__main__":
    sys.exit(main())
