"""mmjax.config.load: specs by path and by name, presets, overrides as on the command line,
one-line errors; every config file and preset loads; the family files give the configs the
per-scale files gave (tests/fixtures/config_dicts.json, saved from them before the merge)."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from mmjax.config import (
    CONFIGS,
    DEFAULT,
    LM_KEYS,
    PAPER_SCALES,
    TINY_TEXT_VOCAB,
    config_module,
    default_config,
    define_flag,
    lm_config,
    load,
    validate_config,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "config_dicts.json"
CONFIG_FILES = sorted(p.name for p in CONFIGS.glob("*.py"))


def as_json(config) -> dict:
    """``config.to_dict()`` as JSON reads it back (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict()))


def cli_config(argv: list[str]):
    """The config a CLI's ``--config`` flag (:func:`define_flag`) gives for ``argv``."""
    values = flags.FlagValues()
    holder = define_flag(flag_values=values, sys_argv=["cli", *argv])
    values(["cli", *argv])
    return holder.value


# ---------------------------------------------------------------------------- specs


def test_load_by_path_relative_to_the_cwd_then_the_repository(tmp_path, monkeypatch):
    by_short_name = load("mmv2.py:tiny")
    monkeypatch.chdir(REPO)
    assert as_json(load("configs/mmv2.py:tiny")) == as_json(by_short_name)
    assert as_json(load(str(CONFIGS / "mmv2.py") + ":tiny")) == as_json(by_short_name)
    monkeypatch.chdir(tmp_path)
    assert as_json(load("configs/mmv2.py:tiny")) == as_json(by_short_name)
    (tmp_path / "mmv2.py").write_text(
        "from mmjax.config import make_config\n\n\n"
        "def get_config(arg=None):\n    return make_config(train=dict(seed=7), arg=arg)\n")
    mine = load("mmv2.py:mine")  # the working directory's file comes first
    assert (mine.train.seed, mine.arg) == (7, "mine")


def test_load_by_name_is_the_embedded_default():
    assert as_json(load("default")) == as_json(default_config())
    assert as_json(load(DEFAULT)) == as_json(load("mm_v1_small.py:tiny"))


def test_without_a_checkout_only_registered_names_load(monkeypatch, tmp_path):
    """An installed wheel has no configs/: the embedded default still loads by name."""
    import mmjax.config

    monkeypatch.setattr(mmjax.config, "CONFIGS", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    assert as_json(load(DEFAULT)) == as_json(default_config())
    with pytest.raises(ValueError, match=r"config file 'mmv2.py' not found \(looked for mmv2.py\)"):
        load("mmv2.py")


def test_a_bare_family_file_is_the_small_scale():
    for family in ("mmv2", "llama"):
        bare, small = load(f"{family}.py"), load(f"{family}.py:small")
        assert as_json(bare) == as_json(small)
        assert bare.model.num_layers == PAPER_SCALES["small"]["num_layers"]
        assert load(f"{family}.py:large").model.num_layers == 32


@pytest.mark.parametrize("spec, message", [
    ("mmv2.py:small,large", "presets small, large exclude each other"),
    ("icll.py:mm,gpt2", "presets mm, gpt2 exclude each other"),
    ("recall.py:gpt2,mm", "presets mm, gpt2 exclude each other"),
])
def test_exclusive_presets_raise(spec, message):
    with pytest.raises(ValueError, match=message):
        load(spec)


def test_integer_presets():
    config = load("icll.py:gpt2,languages=100,steps=50,seed=2,width=32,context=64,"
                  "eval_languages=8")
    assert (config.model.name, config.model.embed_dim, config.data.context_length) == (
        "gpt2", 32, 64)
    assert config.data.corpus_options.to_dict() == {"num_languages": 100, "eval_languages": 8}
    assert (config.train.num_steps, config.train.seed) == (50, 2)


def test_llama_has_tiny_text():
    config = load("llama.py:tiny_text")
    assert config.model.vocab_size == TINY_TEXT_VOCAB
    assert config.data.corpus == "tokens" and config.data.allow_vocab_padding
    short_long = load("llama.py:tiny_text,short_long").model
    assert short_long.short_term_window == load("llama.py:tiny,short_long").model.short_term_window


# ------------------------------------------------------------------------ overrides


def test_overrides_as_flags_or_pairs():
    flags_given = load("default", ["--config.train.num_steps=5", "--config.sharding.mesh=(1,2,1)",
                                   "--config.train.skip_nonfinite_steps",
                                   "--config.optimizer.learning_rate=0.5",
                                   "--config.data.corpus_options.num_states=3"])
    pairs = load("default", [("train.num_steps", 5), ("sharding.mesh", (1, 2, 1)),
                             ("train.skip_nonfinite_steps", True),
                             ("optimizer.learning_rate", "0.5"),
                             ("data.corpus_options.num_states", 3)])
    assert as_json(flags_given) == as_json(pairs)
    assert flags_given.train.num_steps == 5 and tuple(flags_given.sharding.mesh) == (1, 2, 1)
    assert flags_given.train.skip_nonfinite_steps is True
    assert flags_given.optimizer.learning_rate == 0.5
    assert flags_given.data.corpus_options.num_states == 3
    flags_given.new_key = 1  # unlocked: a caller may add keys


@pytest.mark.parametrize("spec, overrides", [
    ("default", []),
    ("default", ["--config.train.num_steps=5", "--config.model.num_layers=1"]),
    ("mmv2.py:tiny", ["--config.sharding.mesh=(1,-1,1)", "--config.data.batch_size=4"]),
    ("llama.py:large,finetune", ["--config.train.skip_nonfinite_steps"]),
    ("icll.py:gpt2,steps=7", ["--noconfig.train.skip_nonfinite_steps"]),
])
def test_load_and_the_cli_flag_agree(spec, overrides):
    argv = overrides if spec == DEFAULT else [f"--config={spec}", *overrides]
    assert as_json(cli_config(argv)) == as_json(load(spec, overrides))


def test_a_cli_resolves_and_overrides_as_load(tmp_path):
    """``python -m mmjax.flops`` run outside the repository finds ``mmv2.py`` in its configs/
    and applies the override: the numbers of ``load`` with the same override."""
    from mmjax import flops

    spec, override = "mmv2.py:tiny", "--config.model.num_layers=1"
    out = subprocess.run([sys.executable, "-m", "mmjax.flops", "--config", spec, override],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    count = flops.count(load(spec, [override]).model)
    assert out.stdout.strip().splitlines()[-1] == (
        f"params={count.total_params} flops_per_token={count.total_flops}")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("spec, overrides, message", [
    ("nope.py", [], "config file 'nope.py' not found"),
    ("configs/mmv2.py:huge", [], "unknown preset 'huge'"),
    ("icll.py:languages=many", [], "preset languages must be an integer, got 'many'"),
    ("mmv2", [], "unknown config 'mmv2': give configs/FILE.py"),
    ("default:tiny", [], "unknown preset 'tiny'"),
    ("default", ["--config.train.nonexistent=1"],
     "unknown config key 'train.nonexistent' in --config.train.nonexistent=1"),
    ("default", [("nothing.here", 1)], "unknown config key 'nothing.here'"),
    ("default", ["--config.train.num_steps=many"], "bad override: flag --config.train.num_steps"),
    ("default", ["train.num_steps=3"], "override 'train.num_steps=3' is not --config.KEY=VALUE"),
])
def test_bad_specs_raise_one_line(spec, overrides, message):
    with pytest.raises(ValueError) as info:
        load(spec, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_file_without_get_config_is_named(tmp_path):
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match="has no get_config"):
        load(str(tmp_path / "empty.py"))


def test_lm_configs_name_the_shared_keys_the_same_way():
    with pytest.raises(ValueError, match="needs train.seed, data.batch_size"):
        lm_config(dict(name="gpt2"), optimizer={}, train=dict(num_steps=1, log_every=1),
                  data=dict(corpus="pfa", context_length=8, batch=4))


# --------------------------------------------------------------------- every config


def specs():
    for name in CONFIG_FILES:
        module = config_module(name)
        yield name
        yield from (f"{name}:{preset}" for preset in getattr(module, "PRESETS", ()))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_declares_presets_and_values(name):
    module = config_module(name)
    for attribute in ("PRESETS", "VALUES"):
        declared = getattr(module, attribute, None)
        assert isinstance(declared, tuple) and all(isinstance(p, str) for p in declared), (
            f"{name} must declare {attribute} as a tuple of names")


@pytest.mark.parametrize("spec", list(specs()))
def test_every_config_and_preset_loads_and_validates(spec):
    config = load(spec)
    validate_config(config)
    if "model" in config and "vocab_size" in config.model:  # a language model
        for section, keys in LM_KEYS.items():
            assert set(keys) <= set(config[section]), section


def test_every_benchmark_case_is_a_config(monkeypatch):
    """The AOT benchmarks name cases ``FILE.py[:presets]``; each loads, with the global batch
    and context ``aot_meshes`` plans for; lists of them split before each file name."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import aot_meshes
    import aot_paper_scales

    assert aot_paper_scales.config_spec("mmv2.py:large", finetune=True) == (
        "configs/mmv2.py:large,finetune")
    assert aot_paper_scales.config_spec("gpt2_small.py", finetune=True) == (
        "configs/gpt2_small.py:finetune")
    assert aot_paper_scales.split_configs("mmv2.py:small,finetune@v5e:4x4@1,-1,2,gpt2_small.py"
                                          ) == ["mmv2.py:small,finetune@v5e:4x4@1,-1,2",
                                                "gpt2_small.py"]
    for config in aot_paper_scales.CONFIGS:
        load(aot_paper_scales.config_spec(config))
    for config, *_ in aot_meshes.CASES:
        assert config in aot_meshes.BATCH, config
    for config, (batch, context) in aot_meshes.BATCH.items():
        loaded = load(aot_paper_scales.config_spec(config))
        assert (loaded.data.batch_size, loaded.data.context_length) == (batch, context), config


def _old_to_new(old: str) -> str:
    """``mmv2_large.py:tiny`` -> ``mmv2.py:large,tiny``; other specs stay."""
    path, _, arg = old.partition(":")
    family, _, scale = path.removesuffix(".py").rpartition("_")
    if family in ("mmv2", "llama") and scale in PAPER_SCALES:
        return f"{family}.py:" + ",".join([scale, *filter(None, [arg])])
    return old


@pytest.mark.parametrize("old", sorted(json.loads(FIXTURE.read_text())))
def test_configs_are_those_the_files_gave_before_the_merge(old):
    assert as_json(load(_old_to_new(old))) == json.loads(FIXTURE.read_text())[old]


# ------------------------------------------------------------------------- layering


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", [REPO / "mmjax" / "config.py",
                                  *(CONFIGS / name for name in CONFIG_FILES)],
                         ids=lambda p: p.name)
def test_configs_import_nothing_above_train(path):
    above = ("mmjax.eval", "mmjax.generate")
    wrong = sorted(n for n in _imports(path) if n.startswith(above))
    assert not wrong, f"{path.name} imports {wrong}"
