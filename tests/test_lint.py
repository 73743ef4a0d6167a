"""The tree stays `ruff check` clean."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(REPO_ROOT / ".venv" / "bin"))
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    out = subprocess.run([ruff, "check", "--no-cache", str(REPO_ROOT)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


COMMANDS = ("mmjax.train", "mmjax.generate", "mmjax.eval", "mmjax.flops", "mmjax.aot",
            "mmjax.data.prepare", "mmjax.data.tokenizer", "mmjax.moons",
            "mmjax.kernels.compile_check")
ABSL_COMMANDS = ("mmjax.train", "mmjax.flops", "mmjax.aot", "mmjax.moons")


def test_the_wheel_ships_every_module_and_its_commands_run_from_a_fresh_venv(tmp_path):
    """A regular (non-editable) wheel, as ``pip install .`` or ``pip install git+...`` builds
    it, holds every module of the package, and every command starts from it alone."""
    import sysconfig
    import zipfile

    source = tmp_path / "source"  # a clean copy: a stale build/ would hide missing packages
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", ".jax_cache", "__pycache__", "tests",
        "notebooks", "docs", "benchmarks", "*.png"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mmjax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"mmjax/{p.relative_to(REPO_ROOT / 'mmjax').as_posix()}"
               for p in (REPO_ROOT / "mmjax").rglob("*.py")}
    assert sorted(sources - names) == []
    assert "mmjax/kernels/__init__.py" in names and not any(n.startswith("kernels/")
                                                             for n in names)

    # A fresh venv with the wheel; the dependencies come from this environment's
    # site-packages through a path file (its .pth files, the editable mmjax among them, are
    # not read from there), so nothing is downloaded.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    (pathlib.Path(site.stdout.strip()) / "_deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([python, "-c", "import mmjax.kernels; print(mmjax.kernels.__file__)"],
                           cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    assert where.stdout.startswith(str(venv)), where.stdout
    for command in COMMANDS:
        out = subprocess.run([python, "-m", command, "--help"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, f"{command} --help:\n{out.stdout}{out.stderr}"
        assert "--" in out.stdout and not out.stderr.strip(), (command, out.stderr[-500:])
        if command in ABSL_COMMANDS:
            assert "--config:" in out.stdout  # a key flag of the command, not of mmjax.config
