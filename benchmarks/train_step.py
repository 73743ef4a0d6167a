"""Train-step speed: mmjax's v1 Memory Mosaic and GPT2 side by side, optionally next to the
official PyTorch code, with model FLOPs utilisation against a measured matmul peak.

    python benchmarks/train_step.py                        # the built-in pair below
    python benchmarks/train_step.py --official ~/MemoryMosaics   # + the official MM and GPT
    python benchmarks/train_step.py --config configs/mm_v1_small.py --batch 16 --context 512
    python benchmarks/train_step.py --pair v2 --context 512       # MM v2 against LLaMA

The built-in pair (the project's reference configuration): 4 layers, 4 heads, width 256,
context 256, vocabulary 8192, batch 8, fp32, no dropout, no biases; the Memory Mosaic has 1024
persistent-memory slots per head, the GPT2 a 4x MLP. ``--pair v2``: a v2 Memory Mosaic and a
LLaMA of the same sizes, SwiGLU ``--mlp`` 704, untied embeddings, short-term window
``--window`` 64 (long-term skip drawn from U[window/4, window]); both unscanned, no remat.
``--config FILE[:preset]`` (repeatable)
measures those configs instead (``--batch``/``--context``/``--dtype`` still apply).

What is timed, per system, in interleaved rounds (``--rounds`` x ``--steps`` steps, after
``--warmup`` steps that include compilation):

* train: the trainer's own jitted step (``mmjax.train.loop.Trainer``: forward, full
  logits, cross-entropy, backward, clipping, AdamW, shardings, donation) on batches made
  beforehand, so data loading is not counted;
* forward: the trainer's eval step (forward + loss, no gradients).

The official systems (``--official DIR``: a checkout of
github.com/facebookresearch/MemoryMosaics; torch from ``pip install -e ".[compare]"``) are
``nanoMosaics/mosaic_model.py`` ``MemoryMosaic`` and ``nanoMosaics/gpt_model.py`` ``GPT`` with
the same sizes, run as their ``train.py`` runs them on CPU: eager, ``loss.backward()``,
``clip_grad_norm_(1.0)``, ``AdamW`` from ``configure_optimizers``, ``torch.set_num_threads``
= the cores; forward under ``torch.no_grad()`` with targets (full logits).

Figures: the median over rounds of tokens/s, step time, and MFU = (3 x forward FLOPs per
token from :mod:`mmjax.flops`, retrieval/attention terms included) x tokens/s / peak. The
peak is measured here, a large matmul (``--gemm-size``) in the benchmark's dtype, for JAX
and for torch, and the larger one is every system's peak; on a TPU or GPU the chip's
published bf16 peak is printed and used instead. With ``--official`` each system also gets
an MFU against its own framework's measured matmul (JAX's for mmjax, torch's for the official
code), and the ratios of those: a raw speed ratio flips with whichever framework's matmul is
faster on the machine, the own-peak MFU ratio compares what each code makes of its framework.
Then the ratios the project tracks (targets in the README). ``--json`` adds one JSON line
at the end.

``--compile-for TOPOLOGY`` (e.g. ``v5p:2x2x1``; needs libtpu, no TPU) times nothing: it
compiles each system's train step for that TPU slice with the real compiler
(:func:`mmjax.aot.report`), Pallas kernels in place, and prints XLA's FLOPs per step and
chip against the model's (the same count as MFU's: matmuls and visible retrieval pairs, x3),
and the temporary memory per chip. XLA cannot see inside a Pallas call: each kernel states
its FLOPs from its shapes and the tiles it computes
(:func:`mmjax.kernels.common.kernel_cost`), and XLA adds them. A ratio above 1 is work the
model count does not have: the loss backward's recomputed logits, the kernels' recomputed
scores and partly masked tiles, hidden recomputation. XLA counts one trip of a loop, so the
layers are unscanned, nothing is rematerialised and the fused loss runs in one chunk.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 peaks (FLOP/s per device as JAX lists devices) from the vendors' data sheets.
# A v4 chip (275 TFLOP/s) is two devices when JAX lists TensorCores.
PUBLISHED_PEAKS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


@dataclasses.dataclass
class Figures:
    name: str
    tokens_per_step: int
    train_flops_per_token: float
    peak: float
    own_peak: float  # the measured matmul peak of the system's own framework (JAX or torch)
    train_s: list[float] = dataclasses.field(default_factory=list)
    forward_s: list[float] = dataclasses.field(default_factory=list)

    def median(self, kind: str) -> float:
        return statistics.median(getattr(self, f"{kind}_s"))

    def tokens_per_s(self, kind: str) -> float:
        return self.tokens_per_step / self.median(kind)

    def mfu(self) -> float:
        return self.train_flops_per_token * self.tokens_per_s("train") / self.peak

    def own_mfu(self) -> float:
        """MFU against the framework's own matmul: what the system makes of what its
        framework can do on this machine, comparable across machines."""
        return self.train_flops_per_token * self.tokens_per_s("train") / self.own_peak


# ----------------------------------------------------------------------------- configs


def builtin_configs(args) -> list:
    """The reference pair as mmjax configs: ``--pair v1`` a v1 Memory Mosaic and an equal-width
    GPT2; ``--pair v2`` a v2 Memory Mosaic and an equal-width LLaMA (SwiGLU ``--mlp``)."""
    from mmjax.config import lm_config

    common = dict(vocab_size=args.vocab, num_layers=args.layers, num_heads=args.heads,
                  embed_dim=args.width, dtype=args.dtype, impl="auto", dropout_rate=0.0,
                  scan_layers=False, remat="none")
    if args.pair == "v1":
        common["use_bias"] = False
        models = [dict(name="memory_mosaic", pmem_size=args.pmem, pmem_count=1,
                       pmem_attention_dropout=0.0, **common),
                  dict(name="gpt2", context_length=args.context, mlp_dim=4 * args.width,
                       **common)]
    else:
        models = [dict(name="memory_mosaic_v2", mlp_dim=args.mlp, tie_embeddings=False,
                       short_term_window=args.window,
                       long_term_skip_range=(args.window // 4, args.window),
                       inference_long_term_skip=args.window // 4, **common),
                  dict(name="llama", mlp_dim=args.mlp, tie_embeddings=False, **common)]
    return [lm_config(m, optimizer=dict(learning_rate=1e-3, weight_decay=0.1, b1=0.9,
                                        b2=0.95, eps=1e-8, grad_clip=1.0),
                      data=dict(corpus="pfa", context_length=args.context,
                                batch_size=args.batch),
                      train=dict(num_steps=1, log_every=1, seed=0)) for m in models]


def load_config(spec: str, args):
    """``FILE[:preset]`` -> its config (:func:`mmjax.config.load`), with the benchmark's batch,
    context and dtype, on the synthetic corpus (the benchmark never reads a token store)."""
    from mmjax.config import load

    config = load(spec)
    config.data.update(corpus="pfa", context_length=args.context, batch_size=args.batch)
    if "path" in config.data:
        del config.data["path"]
    if "context_length" in config.model:
        config.model.context_length = max(config.model.context_length, args.context)
    config.model.dtype = args.dtype
    return config


def train_flops_per_token(model_config, context: int) -> float:
    from mmjax import flops

    forward = flops.count(model_config).total_flops
    forward += flops.retrieval_flops_per_token(model_config, context)
    return 3.0 * forward


def compiled_step_figures(config, topology: str) -> dict:
    """The train step of ``config`` compiled for ``topology`` (the Pallas kernels, unscanned,
    no remat): XLA's FLOPs and temporaries per chip against the model's FLOPs."""
    from mmjax import aot

    config = config.copy_and_resolve_references()
    config.model.update(impl="auto", scan_layers=False, remat="none")
    # one chunk of the fused loss: its scan then runs once, and XLA counts all of it
    config.train.loss_chunk = config.data.context_length
    r = aot.report(config, topology, (-1, 1, 1))
    d = config.data
    chips = int(np.prod(list(r.mesh.values())))
    model = (train_flops_per_token(config.model, d.context_length) * d.batch_size
             * d.context_length / chips)
    return {"xla_flops": r.flops, "model_flops": model, "ratio": r.flops / model,
            "temp_bytes": r.temp_bytes, "total_bytes": r.total_bytes,
            "device_kind": r.device_kind, "chips": chips}


# ----------------------------------------------------------------------------- peaks


def jax_gemm_peak(n: int, dtype: str, repeats: int = 5) -> float:
    """FLOP/s of an ``n x n x n`` matmul on JAX's default device (best of ``repeats``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best = min(_timed(lambda: mm(a, b).block_until_ready()) for _ in range(repeats))
    return 2.0 * n**3 / best


def torch_gemm_peak(n: int, dtype: str, repeats: int = 5) -> float:
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2.0 * n**3 / best


def published_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    matches = [peak for name, peak in PUBLISHED_PEAKS.items() if kind.startswith(name)]
    return max(matches) if matches else None


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- systems


class MmjaxSystem:
    """One mmjax config: the trainer's jitted train and eval steps on pre-made batches."""

    def __init__(self, config, peak: float, own_peak: float):
        from mmjax.train.loop import Trainer
        from mmjax.train.step import eval_step

        self.trainer = trainer = Trainer(config)
        self.state = trainer.init_state()
        self.batches = [trainer.batch(i) for i in range(4)]
        with trainer.mesh_context():
            self._forward = jax.jit(functools.partial(
                eval_step, model=trainer.model, loss_chunk=trainer.config.train.loss_chunk))
        m = config.model
        d = config.data
        self.figures = Figures(f"mmjax {m.name}", d.batch_size * d.context_length,
                               train_flops_per_token(m, d.context_length), peak, own_peak)
        self.steps_done = 0

    def train(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            tokens = self.batches[self.steps_done % len(self.batches)]
            self.state, metrics = self.trainer.train_step(self.state, tokens)
            self.steps_done += 1
        jax.block_until_ready((self.state, metrics))
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(f"{self.figures.name}: loss {loss} at step "
                                     f"{self.steps_done}")
        return (time.perf_counter() - start) / steps

    def forward(self, steps: int) -> float:
        start = time.perf_counter()
        with self.trainer.mesh_context():
            for i in range(steps):
                out = self._forward(self.state.params, self.batches[i % len(self.batches)])
            jax.block_until_ready(out)
        return (time.perf_counter() - start) / steps


class OfficialSystem:
    """The official nanoMosaics model of the same sizes, run eagerly as its train.py does."""

    def __init__(self, official_dir: str, model_config, data_config, peak: float,
                 own_peak: float):
        import torch

        module_dir = os.path.join(official_dir, "nanoMosaics")
        if not os.path.isfile(os.path.join(module_dir, "mosaic_model.py")):
            raise FileNotFoundError(f"--official {official_dir}: no nanoMosaics/mosaic_model.py "
                                    "(expected a checkout of facebookresearch/MemoryMosaics)")
        if module_dir not in sys.path:
            sys.path.insert(0, module_dir)
        m, d = model_config, data_config
        sizes = dict(block_size=d.context_length, vocab_size=m.vocab_size, n_layer=m.num_layers,
                     n_head=m.num_heads, n_embd=m.embed_dim, dropout=0.0,
                     bias=bool(m.get("use_bias", False)))
        torch.manual_seed(0)
        with contextlib.redirect_stdout(None):  # the official constructors print counts
            self.model, name = self._build(m, sizes)
            self.optimizer = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
        gen = torch.Generator().manual_seed(0)
        tokens = [torch.randint(0, m.vocab_size, (d.batch_size, d.context_length + 1),
                                generator=gen) for _ in range(4)]
        # contiguous inputs and targets, as train.py's get_batch makes them
        self.batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
        self.figures = Figures(name, d.batch_size * d.context_length,
                               train_flops_per_token(m, d.context_length), peak, own_peak)
        self.steps_done = 0

    @staticmethod
    def _build(m, sizes):
        if m.name == "memory_mosaic":
            import mosaic_model

            return mosaic_model.MemoryMosaic(mosaic_model.MemoryMosaicConfig(
                pmem_size=m.pmem_size, pmem_count=m.pmem_count, **sizes)), "official MemoryMosaic"
        if m.name == "gpt2":
            import gpt_model

            return gpt_model.GPT(gpt_model.GPTConfig(**sizes)), "official GPT"
        raise ValueError(f"no official counterpart of model {m.name!r}")

    def train(self, steps: int) -> float:
        import torch

        self.model.train()
        start = time.perf_counter()
        for _ in range(steps):
            inputs, targets = self.batches[self.steps_done % len(self.batches)]
            _, loss = self.model(inputs, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps_done += 1
        return (time.perf_counter() - start) / steps

    def forward(self, steps: int) -> float:
        import torch

        self.model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(steps):
                self.model(*self.batches[i % len(self.batches)])
        return (time.perf_counter() - start) / steps


# ----------------------------------------------------------------------------- main


def measure(systems, *, rounds: int, steps: int, warmup: int) -> None:
    for s in systems:  # compilation (mmjax) and allocator warm-up (torch)
        s.train(warmup)
        s.forward(warmup)
    for _ in range(rounds):
        for s in systems:
            s.figures.train_s.append(s.train(steps))
            s.figures.forward_s.append(s.forward(steps))


def ratio_lines(figures: dict[str, Figures]) -> list[tuple[str, float]]:
    """The tracked ratios, where both sides were measured."""
    pairs = [("mmjax MM / official MM, train", "mmjax memory_mosaic", "official MemoryMosaic",
              "train"),
             ("mmjax MM / official MM, forward", "mmjax memory_mosaic",
              "official MemoryMosaic", "forward"),
             ("mmjax GPT2 / official GPT, train", "mmjax gpt2", "official GPT", "train"),
             ("mmjax GPT2 / official GPT, forward", "mmjax gpt2", "official GPT", "forward"),
             ("mmjax MM / mmjax GPT2, train", "mmjax memory_mosaic", "mmjax gpt2", "train"),
             ("official MM / official GPT, train", "official MemoryMosaic", "official GPT",
              "train"),
             ("mmjax MM / official MM, MFU (own peaks)", "mmjax memory_mosaic",
              "official MemoryMosaic", "own_mfu"),
             ("mmjax GPT2 / official GPT, MFU (own peaks)", "mmjax gpt2", "official GPT",
              "own_mfu"),
             ("mmjax MM v2 / mmjax LLaMA, train", "mmjax memory_mosaic_v2", "mmjax llama",
              "train"),
             ("mmjax MM v2 / mmjax LLaMA, MFU", "mmjax memory_mosaic_v2", "mmjax llama",
              "mfu")]

    def value(f: Figures, kind: str) -> float:
        if kind in ("mfu", "own_mfu"):
            return getattr(f, kind)()
        return f.tokens_per_s(kind)

    return [(label, value(figures[a], kind) / value(figures[b], kind))
            for label, a, b, kind in pairs if a in figures and b in figures]


def format_table(figures: list[Figures]) -> str:
    lines = [f"{'system':<24} {'train tok/s':>12} {'step ms':>9} {'fwd tok/s':>11} "
             f"{'fwd ms':>8} {'MFU':>6} {'own MFU':>8}"]
    for f in figures:
        lines.append(f"{f.name:<24} {f.tokens_per_s('train'):>12,.0f} "
                     f"{1e3 * f.median('train'):>9.1f} {f.tokens_per_s('forward'):>11,.0f} "
                     f"{1e3 * f.median('forward'):>8.1f} {f.mfu():>6.1%} {f.own_mfu():>8.1%}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[],
                   help="FILE[:preset] of an mmjax config (repeatable); default: the built-in "
                        "MM/GPT2 pair")
    p.add_argument("--official", default=None,
                   help="a checkout of facebookresearch/MemoryMosaics: add its nanoMosaics "
                        "MemoryMosaic and GPT (needs torch: the 'compare' extra)")
    p.add_argument("--pair", default="v1", choices=("v1", "v2"),
                   help="the built-in pair: v1 (Memory Mosaic, GPT2) or v2 (Memory Mosaic v2, "
                        "LLaMA)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--pmem", type=int, default=1024)
    p.add_argument("--mlp", type=int, default=704, help="SwiGLU width of the v2 pair")
    p.add_argument("--window", type=int, default=64,
                   help="v2's short-term window (its long-term skip: U[window/4, window])")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=10, help="steps per round and system")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gemm-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads (the official code); JAX uses every core")
    p.add_argument("--compile-for", default=None, metavar="TOPOLOGY",
                   help="compile for this TPU slice (e.g. v5e:2x2) and print XLA's FLOPs "
                        "against the model's and the temporaries, instead of timing")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for name in ("layers", "heads", "width", "vocab", "pmem", "mlp", "window", "context",
                 "batch", "steps",
                 "rounds", "warmup", "gemm_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.official is not None:
        if not os.path.isfile(os.path.join(args.official, "nanoMosaics", "mosaic_model.py")):
            p.error(f"--official {args.official}: no nanoMosaics/mosaic_model.py there "
                    "(expected a checkout of facebookresearch/MemoryMosaics)")
        if importlib.util.find_spec("torch") is None:
            p.error("--official needs torch: pip install -e '.[compare]'")
    return args


def compile_for(configs, args) -> dict:
    print(f"train step compiled for {args.compile_for} (Pallas kernels, unscanned, no remat); "
          f"batch {args.batch} x context {args.context}, {args.dtype}")
    print(f"{'system':<24} {'XLA FLOPs/chip':>15} {'model FLOPs/chip':>17} {'ratio':>6} "
          f"{'temp MiB':>9} {'total MiB':>10}")
    result = {}
    for c in configs:
        f = compiled_step_figures(c, args.compile_for)
        name = f"mmjax {c.model.name}"
        result[name] = f
        print(f"{name:<24} {f['xla_flops']:>15.4e} {f['model_flops']:>17.4e} "
              f"{f['ratio']:>6.3f} {f['temp_bytes'] / 2**20:>9.1f} "
              f"{f['total_bytes'] / 2**20:>10.1f}")
    if args.json:
        print(json.dumps(result))
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    configs = ([load_config(spec, args) for spec in args.config] if args.config
               else builtin_configs(args))
    if args.compile_for:
        return compile_for(configs, args)
    device = jax.devices()[0]
    gemm = jax_gemm_peak(args.gemm_size, args.dtype)
    chip = published_peak()
    print(f"device: {device.device_kind} x {jax.device_count()} ({jax.default_backend()}), "
          f"jax {jax.__version__}")
    print(f"measured {args.dtype} matmul {args.gemm_size}^3, JAX: {gemm / 1e9:,.1f} GFLOP/s"
          + (f"; published peak {chip / 1e12:,.0f} TFLOP/s" if chip else ""))
    torch_peak = None
    if args.official:
        import torch

        torch.set_num_threads(args.threads)
        torch_peak = torch_gemm_peak(args.gemm_size, args.dtype)
        print(f"measured {args.dtype} matmul {args.gemm_size}^3, torch {torch.__version__} "
              f"({args.threads} threads, CPU): {torch_peak / 1e9:,.1f} GFLOP/s")
    # One peak for every system, so that MFUs compare: the chip's published one, else the
    # best matmul measured here.
    peak = chip if chip is not None else max(gemm, torch_peak or 0.0)
    print(f"MFU below is against {peak / 1e9:,.1f} GFLOP/s")
    systems = [MmjaxSystem(c, peak, chip or gemm) for c in configs]
    if args.official:
        systems += [OfficialSystem(args.official, c.model, c.data, peak, torch_peak)
                    for c in configs if c.model.name in ("memory_mosaic", "gpt2")]
    c = configs[0]
    print(f"batch {c.data.batch_size} x context {c.data.context_length}, {args.dtype}; "
          f"{args.rounds} interleaved rounds of {args.steps} steps after {args.warmup} warm-up "
          "steps; medians")
    measure(systems, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    figures = {s.figures.name: s.figures for s in systems}
    print(format_table(list(figures.values())))
    ratios = ratio_lines(figures)
    for label, value in ratios:
        print(f"{label:<44} {value:.2f}x")
    result = {"device": device.device_kind, "gemm_flops": gemm, "torch_gemm_flops": torch_peak,
              "published_peak": chip, "mfu_peak": peak,
              "systems": {name: {"train_tokens_per_s": f.tokens_per_s("train"),
                                 "forward_tokens_per_s": f.tokens_per_s("forward"),
                                 "train_step_s": f.median("train"), "mfu": f.mfu(),
                                 "own_mfu": f.own_mfu()}
                          for name, f in figures.items()},
              "ratios": dict(ratios)}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    jnp.zeros(())  # initialise the backend before anything is timed
    main()
