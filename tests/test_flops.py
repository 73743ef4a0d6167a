"""mmjax.flops: counts from parameter shapes, the paper's table, the CLI's last line."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
from config_loading import CONFIGS, load_config

from mmjax import flops

# "Memory Mosaics at Scale", table of model sizes: (parameters, forward FLOPs per token).
PAPER = {
    "llama.py:large": (8.8e9, 16.7e9),
    "mmv2.py:large": (9.9e9, 18.9e9),
    "mmv2.py:large,no_long_term": (8.3e9, 15.6e9),
}


@pytest.mark.parametrize("spec", sorted(PAPER))
def test_large_configs_match_paper_within_two_percent(spec):
    c = flops.count(load_config(spec).model)
    params, flops_per_token = PAPER[spec]
    assert abs(c.total_params / params - 1) < 0.02
    assert abs(c.total_flops / flops_per_token - 1) < 0.02


def test_counts_follow_parameter_shapes():
    tiny = load_config("mmv2.py:tiny").model
    base = flops.count(tiny)
    wider = flops.count({**tiny, "mlp_dim": tiny.mlp_dim + 8})
    extra = 3 * tiny.embed_dim * 8 * tiny.num_layers
    assert wider.params["persistent memory"] - base.params["persistent memory"] == extra
    assert wider.flops["persistent memory"] - base.flops["persistent memory"] == 2 * extra
    # untied head: lm_head counted in params and FLOPs; embedding has params, no FLOPs
    assert base.params["head"] == tiny.vocab_size * tiny.embed_dim
    assert base.flops["head"] == 2 * base.params["head"]
    assert base.flops["embedding"] == 0
    no_long = flops.count({**tiny, "long_term": False})
    assert no_long.params["memories"] < base.params["memories"]


def test_tied_head_counts_flops_but_no_parameters():
    c = flops.count(load_config("gpt2_small.py:tiny").model)
    assert c.params["head"] == 0
    assert c.flops["head"] == 2 * 256 * 64
    assert c.params["embedding"] == 256 * 64 + 64 * 64  # wte + wpe


def test_unknown_parameter_name_raises():
    with pytest.raises(ValueError, match="cannot classify parameter block_0/foo/kernel"):
        flops.group_of(("block_0", "foo", "kernel"))


def test_cli_last_line():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "mmjax.flops", "--config", str(CONFIGS / "mmv2.py:tiny"),
         "--baseline", str(CONFIGS / "llama.py:tiny")],
        capture_output=True, text=True, check=True, env=env)
    c = flops.count(load_config("mmv2.py:tiny").model)
    base = flops.count(load_config("llama.py:tiny").model)
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == f"params={c.total_params} flops_per_token={c.total_flops}"
    assert "persistent memory" in out.stdout and "vs llama" in out.stdout
    assert "retrieval/attention products at context 64" in out.stdout
    total_diff = [line for line in lines if line.split()[:1] == ["total"] and "+" in line]
    assert f"{c.total_params - base.total_params:+,}" in total_diff[0]


def test_memory_parts_split_tiers_and_fusion():
    tiny = load_config("mmv2.py:tiny").model
    c = flops.count(tiny)
    d, h, layers = tiny.embed_dim, tiny.num_heads, tiny.num_layers
    assert c.memory_parts["out"] == layers * 2 * d * d  # W_o fuses 2 H heads
    tier = 2 * d * d + 2 * d * h + 5 * h  # W_k, W_v, W_g, W_lam, 5 per-head scalars
    assert c.memory_parts["short_term"] == c.memory_parts["long_term"] == layers * tier
    assert sum(c.memory_parts.values()) == c.params["memories"]


def test_retrieval_flops_brute_force():
    """Average visible pairs per token, counted with loops, times 4 D L."""
    def brute(tiers, context, d, layers):
        total = 0
        for window, skip, offset in tiers:
            for t in range(context):
                q = t + offset
                total += sum(1 for i in range(context)
                             if i <= q - 1 - skip and (window is None or i >= q - window))
        return round(4 * d * layers * total / context)

    llama = {"name": "llama", "embed_dim": 8, "num_layers": 3}
    assert flops.retrieval_flops_per_token(llama, 20) == brute([(None, 0, 1)], 20, 8, 3)
    mm = {"name": "memory_mosaic_v2", "embed_dim": 8, "num_layers": 2, "short_term_window": 5,
          "inference_long_term_skip": 3, "long_term": True}
    assert flops.retrieval_flops_per_token(mm, 20) == brute([(5, 0, 0), (None, 3, 0)], 20, 8, 2)
    sl = {"name": "llama_short_long", "embed_dim": 8, "num_layers": 2, "short_term_window": 5,
          "inference_long_term_skip": 3}
    assert flops.retrieval_flops_per_token(sl, 20) == brute([(5, 0, 1), (None, 3, 1)], 20, 8, 2)
    with pytest.raises(ValueError, match="no retrieval layout"):
        flops.retrieval_flops_per_token({"name": "other"}, 20)


def test_a_paged_long_term_tier_counts_its_page_bounds_and_kept_pairs():
    """Per query: the pages it sees (one bound each) plus at most ``top x page`` pairs."""
    mm = {"name": "memory_mosaic_v2", "embed_dim": 8, "num_layers": 2, "short_term_window": 5,
          "inference_long_term_skip": 3, "long_term": True, "long_term_memory": "paged",
          "long_term_page": 4, "long_term_top_pages": 2}
    short = sum(min(q, 5) for q in range(40))
    long = sum(min(max(q - 3, 0), 8) + -(-max(q - 3, 0) // 4) for q in range(40))
    assert flops.retrieval_flops_per_token(mm, 40) == round(4 * 8 * 2 * (short + long) / 40)
    exact = dict(mm, long_term_memory="exact")
    assert flops.retrieval_flops_per_token(mm, 40) < flops.retrieval_flops_per_token(exact, 40)


def _run_cli(spec):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "mmjax.flops", "--config", str(CONFIGS / spec)],
                          capture_output=True, text=True, check=True, env=env).stdout


def _expected_lines(path):
    """``{preset: "params=... flops_per_token=..."}`` from a config file's docstring."""
    text = path.read_text()
    doc = text[: text.index('"""', 3)]
    out = {}
    for line in doc.splitlines():
        match = re.search(r"(:[\w,]+)?\s*(params=\d+ flops_per_token=\d+)", line)
        if match:
            out[(match.group(1) or ":").lstrip(":")] = match.group(2)
    return out


def test_v1_cli_output_is_in_its_config_docstring():
    """``python -m mmjax.flops --config configs/mm_v1_small.py`` works and prints what the
    config's docstring says."""
    expected = _expected_lines(CONFIGS / "mm_v1_small.py")
    assert set(expected) == {"", "tiny"}
    assert _run_cli("mm_v1_small.py").strip().splitlines()[-1] == expected[""]
    tiny = flops.count(load_config("mm_v1_small.py:tiny").model)
    assert expected["tiny"] == f"params={tiny.total_params} flops_per_token={tiny.total_flops}"


@pytest.mark.parametrize("path", sorted(pathlib.Path(CONFIGS).glob("*.py")), ids=lambda p: p.stem)
def test_every_config_docstring_figure_is_what_flops_counts(path):
    """Every config with a language model counts, and the figures its docstring quotes are
    the counts; a config without one (three moons) raises ``NoLanguageModel``."""
    expected = _expected_lines(path)
    for preset, line in expected.items():
        c = flops.count(load_config(f"{path.name}:{preset}" if preset else path.name).model)
        assert line == f"params={c.total_params} flops_per_token={c.total_flops}", preset
    if not expected:
        config = load_config(path.name)
        with pytest.raises(flops.NoLanguageModel):
            flops.count(config.get("model", {}))


def test_cli_on_moons_says_there_is_no_language_model():
    lines = _run_cli("moons.py").strip().splitlines()
    assert len(lines) == 1 and "no language model" in lines[0]


def test_transformer_tables_say_attention_and_mlp():
    c = flops.count(load_config("gpt2_small.py:tiny").model)
    assert set(c.params) == {"embedding", "attention", "MLP", "norms", "head"}
    table = flops.format_count(c)
    assert "attention" in table and "MLP" in table and "memories" not in table
    v1 = flops.count(load_config("mm_v1_small.py:tiny").model)
    assert set(v1.params) == {"embedding", "memories", "persistent memory", "norms", "head"}
    assert v1.num_layers == 2 and v1.params["persistent memory"] > 0
    assert "memories / attention" in flops.format_comparison(v1, c)
