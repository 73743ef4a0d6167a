"""The tree stays `ruff check` clean."""

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
    out = subprocess.run([ruff, "check", str(REPO_ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_kernels_is_installed_as_mmjax_kernels():
    out = subprocess.run([sys.executable, "-c", "import mmjax.kernels, pathlib; "
                          "print(pathlib.Path(mmjax.kernels.__file__).parent.name)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "kernels"


def test_normal_install_maps_kernels_into_the_package(tmp_path):
    """A regular (non-editable) wheel ships kernels/ as mmjax/kernels/."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # a clean copy: a stale build/ would hide missing packages
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", ".jax_cache", "__pycache__", "tests",
        "notebooks", "docs", "benchmarks", "*.png"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mmjax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmjax/kernels/__init__.py" in names
    assert "mmjax/ops/retrieval.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    # every module of every subpackage ships (a package left out of setup.cfg is not)
    sources = {f"mmjax/{p.relative_to(REPO_ROOT / 'mmjax').as_posix()}"
               for p in (REPO_ROOT / "mmjax").rglob("*.py")}
    assert sorted(sources - set(names)) == []
