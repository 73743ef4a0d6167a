"""The command-line convention (:mod:`mmjax.cli`): every ``python -m mmjax.*`` command prints a
user's mistake as one ``error: ...`` line, exits 1 for bad input and 2 for a bad flag, and 0
for ``--help`` (that one from a fresh install: tests/test_lint.py). The commands run as
subprocesses (one per case: each imports JAX)."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from mmjax import cli

REPO = pathlib.Path(__file__).resolve().parent.parent

# Every command, with a bad flag.
BAD_FLAGS = {
    "mmjax.train": ["--bogus"],
    "mmjax.flops": ["--bogus"],
    "mmjax.aot": ["--bogus"],
    "mmjax.data.prepare": ["--input", "x", "--tokenizer", "x", "--output", "x", "--bogus"],
    "mmjax.data.tokenizer": ["--input", "x", "--output", "x", "--bogus"],
    "mmjax.generate": ["--workdir", "x", "--prompt", "x", "--bogus"],
    "mmjax.eval": ["retrieval", "--workdir", "x", "--bogus"],
    "mmjax.kernels.compile_check": ["--bogus"],
    "mmjax.moons": ["--workdir", "x", "--bogus"],
}

# Bad input that a command finds before doing any work, and a piece of its message. (aot and
# compile_check exit 1 only after compiling: tests/test_aot.py, tests/test_compile_check.py.)
BAD_INPUT = {
    "mmjax.train": (["--config.train.log_every=0"], "train.log_every=0: must be >= 1"),
    "mmjax.flops": (["--config", str(REPO / "configs" / "mm_v1_small.py"),
                     "--config.model.name=nope"], "nope"),
    "mmjax.data.prepare": (["--input", "*.txt", "--tokenizer", "missing.model",
                            "--output", "unused"], "no tokenizer model at missing.model"),
    "mmjax.data.tokenizer": (["--input", "*.none", "--output", "unused"],
                             "no files match the input pattern '*.none'"),
    "mmjax.generate": (["--workdir", "missing", "--prompt", "x"],
                       "--workdir missing: no such directory"),
    "mmjax.eval": (["retrieval", "--workdir", "missing"], "--workdir missing: no such directory"),
    "mmjax.moons": (["--config", str(REPO / "configs" / "moons.py:tiny"), "--workdir",
                     "a_file"], "a_file"),
}


def _run(module, *args, cwd=REPO):
    """``python -m module args`` (on CPU, without MMJAX_TRACEBACK)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop(cli.TRACEBACK_VARIABLE, None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_error_line(result, status):
    assert result.returncode == status, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("module", sorted(BAD_FLAGS))
def test_a_bad_flag_is_one_line_and_exit_2(module):
    line = _one_error_line(_run(module, *BAD_FLAGS[module]), cli.EXIT_USAGE)
    assert "bogus" in line


def test_a_bad_flag_value_is_one_line_and_exit_2():
    """A vocabulary too small for byte fallback: refused before reading any text."""
    line = _one_error_line(_run("mmjax.data.tokenizer", "--input", "README.md", "--output",
                                "unused.model", "--vocab_size", "256"), cli.EXIT_USAGE)
    assert "vocab_size=256 is too small for byte fallback" in line


@pytest.mark.parametrize("module", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_1(module, tmp_path):
    args, message = BAD_INPUT[module]
    (tmp_path / "a_file").write_text("not a directory")
    line = _one_error_line(_run(module, *args, cwd=tmp_path), cli.EXIT_ERROR)
    assert message in line


def test_aot_without_libtpu_is_one_line_and_exit_1():
    """A missing dependency is an error, not a bad command line (as for compile_check)."""
    script = ("import runpy; from mmjax.kernels import compile_check; "
              "compile_check.libtpu_available = lambda: False; "
              "runpy.run_module('mmjax.aot', run_name='__main__')")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert "libtpu is not installed" in _one_error_line(result, cli.EXIT_ERROR)


# ------------------------------------------------------------------------- in one process


def test_run_turns_user_errors_into_one_line_and_a_status(capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)

    def failing(error):
        def command(argv):
            raise error
        return command

    assert cli.run(lambda argv: None) == cli.EXIT_OK
    assert cli.run(lambda argv: cli.EXIT_PREEMPTED) == 3
    assert cli.run(failing(FileNotFoundError("no such file: x"))) == cli.EXIT_ERROR
    assert capsys.readouterr().err == "error: no such file: x\n"
    assert cli.run(failing(cli.UsageError("--x must be >= 1"))) == cli.EXIT_USAGE
    assert capsys.readouterr().err == "error: --x must be >= 1\n"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.run(failing(KeyError("k")))
    monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")
    with pytest.raises(ValueError):
        cli.run(failing(ValueError("bad")))


def test_argparse_errors_are_the_same_line(capsys):
    parser = cli.ArgumentParser(prog="p")
    parser.add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--n", "x"])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert capsys.readouterr().err == "error: argument --n: invalid int value: 'x'\n"


def test_one_line():
    assert cli.one_line("invalid config:\n  a=0: must be >= 1\n  b=0: must be >= 1") == \
        "invalid config: a=0: must be >= 1; b=0: must be >= 1"
    quoted = ("flag --config=c.py:x: Error whilst parsing config file:\n\nTraceback (most "
              "recent call last):\n  File \"c.py\", line 3\n    raise ValueError\n"
              "ValueError: unknown preset 'x'\n")
    assert cli.one_line(quoted) == ("flag --config=c.py:x: Error whilst parsing config file: "
                                    "ValueError: unknown preset 'x'")


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_cli_imports_nothing_from_mmjax_and_no_module_imports_a_main():
    assert not [m for m in _imports(REPO / "mmjax" / "cli.py")
                if m.split(".")[0] in ("mmjax", "jax")]
    mains = [f"{path.relative_to(REPO)} imports {m}" for path in (REPO / "mmjax").rglob("*.py")
             for m in _imports(path) if m.endswith("__main__")]
    assert not mains
